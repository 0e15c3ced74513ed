"""The eager core the local and FSDP backends share: the model runs as plain PyTorch modules (FSDP2's hooks inside
them), its frozen parts set apart by `lisa_dist.method`, one torch AdamW over the always-trained params and the
active layers. DeepSpeed wraps the model in its own engine instead."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from lisa_dist.backends.base import HoldsModel, required
from lisa_dist.config import OptimConfig
from lisa_dist.method import (
    FrozenStore,
    TrainableSet,
    build_adamw,
    freeze_except_always,
    freeze_outside,
    layer_named_params,
    set_active_params,
)
from lisa_dist.models import ModelLayout, lm_loss_sum, to_device

if TYPE_CHECKING:
    from lisa_dist.backends.fsdp_frozen import ShardedFrozenStore


class EagerCore(HoldsModel):
    """prepare, activate, forward_backward and eval_loss_sum; a backend sets the fields below and may refine
    `_placed` (where the model goes), `_before_optimizer` (its wrapping's settings) and `_autocast`."""

    device: torch.device
    precision: str
    frozen_storage: str
    loss_chunk_tokens: int
    optim_cfg: OptimConfig
    model: nn.Module | None
    layout: ModelLayout | None
    store: FrozenStore | ShardedFrozenStore | None
    trainable: TrainableSet | None
    optimizer: torch.optim.Optimizer | None

    # Checked reads of those fields (HoldsModel: the model and the trainable set).
    @property
    def _layout(self) -> ModelLayout:
        return required(self.layout, "layout")

    @property
    def _optimizer(self) -> torch.optim.Optimizer:
        return required(self.optimizer, "optimizer")

    def _placed(self, model: nn.Module) -> nn.Module:
        return model

    def _before_optimizer(self, model: nn.Module) -> None:
        """Settings of the model's wrapping, after its params are frozen and before the optimizer is built."""

    def _autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module, trainable: TrainableSet) -> None:
        self.model, self.trainable = self._placed(model), trainable
        self.model.train()
        freeze_except_always(self.model, trainable)
        if trainable.layers:  # LISA or full fine-tuning: a frozen embedding is stored like the frozen layers
            freeze_outside(self.model, trainable, self.frozen_storage, self.precision)
        self._before_optimizer(self.model)
        self.optimizer = build_adamw(trainable.always, [], self.optim_cfg)

    def activate(self, layers: Sequence[int]) -> None:
        # First drop the state of leaving layers while the optimizer still knows their params...
        optimizer, trainable = self._optimizer, self._trainable
        set_active_params(optimizer, trainable, layers)
        if self.store is not None and self.store.set_active(layers):
            # ...then hand it the params of the blocks that moved (new objects when their storage changed).
            trainable.layers[:] = layer_named_params(self._layout)
            set_active_params(optimizer, trainable, layers)

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        batch = to_device(batch, self.device, self.loss_chunk_tokens)
        with self._autocast():
            loss_sum = lm_loss_sum(self._model, batch, self.loss_chunk_tokens)
        (loss_sum * scale).backward()
        return loss_sum.detach()

    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = to_device(batch, self.device, self.loss_chunk_tokens)
        with torch.no_grad(), self._autocast():
            return lm_loss_sum(self._model, batch, self.loss_chunk_tokens).float()
