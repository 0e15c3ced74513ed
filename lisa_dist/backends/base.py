"""The one small interface every backend implements; the trainer loop talks to nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from torch import nn

from lisa_dist.config import Capabilities
from lisa_dist.method import TrainableSet
from lisa_dist.models import FolderSpec, ModelLayout, WeightSource

T = TypeVar("T")


def required(value: T | None, what: str) -> T:
    """`value`, a field a backend sets up in `materialize`/`prepare`; a clear error where it is not set (yet)."""
    if value is None:
        raise RuntimeError(f"the backend's {what} is not set up (materialize and prepare set it, close drops it)")
    return value


class HoldsModel:
    """Checked reads of the model and trainable set a backend sets up: a clear RuntimeError, not an AttributeError
    on None, before they are set or after close."""

    model: nn.Module | None
    trainable: TrainableSet | None

    @property
    def _model(self) -> nn.Module:
        return required(self.model, "model")

    @property
    def _trainable(self) -> TrainableSet:
        return required(self.trainable, "trainable set")


class Backend(Protocol):
    """The local, FSDP2 and DeepSpeed (ZeRO-1/2/3) backends all provide these verbs (DDP exists only inside the
    transformers.Trainer integration, which drives its own loop).

    The trainer calls `materialize` and `prepare` once, `activate` at each LISA switch (and once at the start),
    then per step `forward_backward` for each micro-batch and `step`.
    """

    capabilities: Capabilities
    """What this backend supports (a class attribute: `lisa_dist.config.CAPABILITIES` under its name)."""
    rank: int
    world_size: int
    device: torch.device
    model: nn.Module | None
    """The model as this rank holds it (placed, sharded or partitioned), once materialized."""

    @property
    def is_main(self) -> bool: ...

    def empty_init(self) -> contextlib.AbstractContextManager:
        """The context the model skeleton is built under (meta device by default, ZeRO-3: partitioned)."""

    def materialize(self, model: nn.Module, layout: ModelLayout, source: WeightSource) -> nn.Module:
        """Turn a meta-device skeleton into the model this rank trains (placed, sharded, weights loaded)."""

    def prepare(self, model: nn.Module, trainable: TrainableSet) -> None:
        """Wrap or place the model and build the optimizer over `trainable.always` (no layer active yet)."""

    def activate(self, layers: Sequence[int]) -> None:
        """Train exactly `layers` from now on: only they and the always-trained params have grads and Adam state."""

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Backward of `scale` x the summed token loss of one micro-batch; returns the detached loss sum."""

    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed token loss of one micro-batch without gradients (the caller puts the model in eval mode)."""

    def layer_grad_norms(self, layers: Sequence[int]) -> list[float]:
        """After the backward passes of a step: the L2 norm of each layer's whole gradient (all ranks' shards),
        the same on every rank (lisa.strategy=grad_norm)."""

    def step(self, lr: float, measure: bool = True) -> float:
        """Clip the global grad norm, take one optimizer step at `lr`, clear grads; returns the pre-clip norm.
        `measure`: also record what `state_bytes` reports (the trainer asks on logging steps only)."""

    def optimizer_state_bytes(self) -> int:
        """Bytes of Adam moments this rank holds."""

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank held at the last measured step, by kind: params, grads (just before the update), fp32
        masters and Adam moments; what `lisa_dist.tools.memory` predicts."""

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (identity on one process)."""

    def barrier(self) -> None: ...

    def save_state(self, folder: Path) -> None:
        """Collective: this backend's model and optimizer state (active + always-trained) into `folder`."""

    def load_state(self, folder: Path) -> None:
        """Collective: restore `save_state`'s folder; the layers active at save time must be active now."""

    def save_model(self, path: str, spec: FolderSpec) -> None:
        """Collective: the full model as a Hugging Face folder in `spec.dtype`, shards of at most
        `spec.max_shard_bytes`, written by the main rank a shard at a time."""

    def close(self) -> None: ...
