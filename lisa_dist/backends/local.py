"""One process, one device: the reference every distributed backend is compared against."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn

from lisa_dist.config import OptimConfig
from lisa_dist.dist import resolve_device
from lisa_dist.method import (
    TrainableSet,
    build_adamw,
    clip_grad_norm,
    freeze_except_always,
    layer_sq_norms,
    load_named_optimizer_state,
    measured_state,
    moment_bytes,
    named_optimizer_state,
    set_active_params,
    set_lr,
    storage_bytes,
)
from lisa_dist.models import ModelLayout, WeightSource, lm_loss_sum, materialize_full


class LocalBackend:
    rank = 0
    world_size = 1

    def __init__(self, device: str, precision: str, optim: OptimConfig) -> None:
        self.device = resolve_device(device)
        self.precision = precision
        self.optim_cfg = optim
        self.model: nn.Module | None = None
        self.trainable: TrainableSet | None = None
        self.optimizer: torch.optim.AdamW | None = None
        self.last_state: dict[str, int] = {}

    @property
    def is_main(self) -> bool:
        return True

    def empty_init(self) -> contextlib.AbstractContextManager:
        return init_empty_weights(include_buffers=False)

    def materialize(self, model: nn.Module, layout: ModelLayout, source: WeightSource) -> nn.Module:
        return materialize_full(model, source, self.device)

    def prepare(self, model: nn.Module, trainable: TrainableSet) -> None:
        self.model = model.to(self.device)
        self.model.train()
        self.trainable = trainable
        freeze_except_always(model, trainable)
        self.optimizer = build_adamw(trainable.always, [], self.optim_cfg)

    def activate(self, layers: Sequence[int]) -> None:
        set_active_params(self.optimizer, self.trainable, layers)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self._autocast():
            loss_sum = lm_loss_sum(self.model, batch)
        (loss_sum * scale).backward()
        return loss_sum.detach()

    def layer_grad_norms(self, layers: Sequence[int]) -> list[float]:
        return layer_sq_norms(self.trainable, layers).sqrt().tolist()

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, lr: float) -> float:
        norm = clip_grad_norm(self.trainable_params(), self.optim_cfg.max_grad_norm)
        grads = storage_bytes(p.grad for p in self.model.parameters())
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.last_state = measured_state(self.model.parameters(), grads, self.master_bytes(),
                                         self.optimizer_state_bytes())
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def master_bytes(self) -> int:
        """AdamW updates the params themselves: no separate fp32 copy."""
        return 0

    def optimizer_state_bytes(self) -> int:
        return moment_bytes(self.optimizer)

    def state_bytes(self) -> dict[str, int]:
        return dict(self.last_state)

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def barrier(self) -> None:
        pass

    def save_state(self, folder: Path) -> None:
        """Model and optimizer state (keyed by parameter name) into `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), folder / "model.pt")
        torch.save(named_optimizer_state(self.optimizer, self.trainable), folder / "optim.pt")

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote; the same layers must be active."""
        self.model.load_state_dict(torch.load(folder / "model.pt", map_location=self.device))
        saved = torch.load(folder / "optim.pt", map_location=self.device)
        self.optimizer.state.clear()  # nothing of an earlier, failed load stays
        load_named_optimizer_state(self.optimizer, self.trainable, saved)

    def save_model(self, path: str) -> None:
        self.model.save_pretrained(path)

    def close(self) -> None:
        self.optimizer = None
