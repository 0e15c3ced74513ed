"""The methods lisa_dist is measured against, run through the same trainer loop on one process.

- Naive LISA, the reference implementations' way (LMFlow's DynamicLayerActivationCallback, axolotl's copy): one
  AdamW over every param, created up front; a switch only flips `requires_grad`. AdamW skips params without a
  gradient but keeps the moments of every layer it ever updated, so the state grows toward full fine-tuning's.
- BAdam (the `badam` package's BlockOptimizer): one decoder block trains at a time, switched every K steps in a
  random order; its fp32 copy of the active block is the "master". By the package's default the embeddings and
  head stay frozen.

Both are a local backend with another optimizer: `trainer.build(cfg, backend=NaiveLisaBackend(...))`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from lisa_dist.backends import LocalBackend, loss_chunk_tokens
from lisa_dist.config import Config
from lisa_dist.method import TrainableSet, adamw_kernel, build_adamw, moment_bytes, set_requires_grad, storage_bytes

BASELINES = ("naive_lisa", "badam")


class NaiveLisaBackend(LocalBackend):
    def prepare(self, model: nn.Module, trainable: TrainableSet) -> None:
        super().prepare(model, trainable)
        self.optimizer = build_adamw(
            trainable.always, trainable.layer_params(range(len(trainable.layers))), self.optim_cfg
        )

    def activate(self, layers: Sequence[int]) -> None:
        set_requires_grad(self.trainable, layers)

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]


class BAdamBackend(LocalBackend):
    """BAdam picks its block itself: run it with `lisa.enabled=false` (the trainer then activates every layer once,
    which this backend ignores)."""

    def __init__(self, device: str, precision: str, cfg: Config, layers_path: str, num_layers: int) -> None:
        super().__init__(device, precision, cfg.optim, loss_chunk_tokens=loss_chunk_tokens(cfg))
        self.switch_every = cfg.lisa.interval
        self.blocks = [[f"{layers_path}.{i}."] for i in range(num_layers)]

    def prepare(self, model: nn.Module, trainable: TrainableSet) -> None:
        import torch
        from badam import BlockOptimizer

        super().prepare(model, trainable)
        cfg = self.optim_cfg
        base = torch.optim.AdamW(
            model.parameters(),
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            **adamw_kernel(cfg.implementation, next(model.parameters()).device),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns that fp32 weights cost memory: measured here on purpose
            self.optimizer = BlockOptimizer(
                base,
                list(model.named_parameters()),
                block_prefix_list=self.blocks,
                switch_block_every=self.switch_every,
                switch_mode="random",
                verbose=0,
            )

    def activate(self, layers: Sequence[int]) -> None:
        pass

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def master_bytes(self) -> int:
        return storage_bytes(self.optimizer.param_idx2hp.values())

    def optimizer_state_bytes(self) -> int:
        return moment_bytes(self.optimizer.base_optimizer)

    @property
    def active_block(self) -> str:
        return self.optimizer.active_param_prefixs[0]


def build_baseline(name: str, cfg: Config, layers_path: str, num_layers: int) -> LocalBackend:
    if name == "naive_lisa":
        return NaiveLisaBackend(
            cfg.train.device, cfg.train.precision, cfg.optim, loss_chunk_tokens=loss_chunk_tokens(cfg)
        )
    if name == "badam":
        return BAdamBackend(cfg.train.device, cfg.train.precision, cfg, layers_path, num_layers)
    raise ValueError(f"baseline {name!r}: allowed values are {', '.join(BASELINES)}")
