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
    FrozenStore,
    TrainableSet,
    build_adamw,
    clip_grad_norm,
    freeze_except_always,
    freeze_outside,
    layer_named_params,
    layer_sq_norms,
    load_named_optimizer_state,
    measured_state,
    moment_bytes,
    named_optimizer_state,
    set_active_params,
    set_lr,
    storage_bytes,
)
from lisa_dist.models import (
    FolderSpec,
    ModelLayout,
    WeightSource,
    is_adapter_model,
    lm_loss_sum,
    materialize_full,
    save_hf_folder,
    to_device,
)


class LocalBackend:
    rank = 0
    world_size = 1

    def __init__(self, device: str, precision: str, optim: OptimConfig, frozen_storage: str = "float32",
                 host_dtype: str = "float32", loss_chunk_tokens: int = 0) -> None:
        self.device = resolve_device(device)
        self.precision = precision
        self.optim_cfg = optim
        self.frozen_storage, self.host_dtype = frozen_storage, host_dtype
        self.loss_chunk_tokens = loss_chunk_tokens
        self.model: nn.Module | None = None
        self.layout: ModelLayout | None = None
        self.store: FrozenStore | None = None
        self.trainable: TrainableSet | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_state: dict[str, int] = {}

    @property
    def is_main(self) -> bool:
        return True

    def empty_init(self) -> contextlib.AbstractContextManager:
        return init_empty_weights(include_buffers=False)

    def materialize(self, model: nn.Module, layout: ModelLayout, source: WeightSource) -> nn.Module:
        self.layout = layout
        if self.frozen_storage == "float32":
            return materialize_full(model, source, self.device)
        # Loaded on the host, then placed block by block in its frozen storage (lisa_dist.method.frozen).
        materialize_full(model, source, torch.device("cpu"))
        self.store = FrozenStore(layout, self.frozen_storage, self.host_dtype, self.device)
        self.store.place(model)
        return model

    def prepare(self, model: nn.Module, trainable: TrainableSet) -> None:
        self.model = model if self.store else model.to(self.device)
        self.model.train()
        self.trainable = trainable
        freeze_except_always(model, trainable)
        if trainable.layers:  # LISA or full fine-tuning: a frozen embedding is stored like the frozen layers
            freeze_outside(model, trainable, self.frozen_storage, self.precision)
        self.optimizer = build_adamw(trainable.always, [], self.optim_cfg)

    def activate(self, layers: Sequence[int]) -> None:
        # First drop the state of leaving layers while the optimizer still knows their params...
        set_active_params(self.optimizer, self.trainable, layers)
        if self.store is not None and self.store.set_active(layers):
            # ...then hand it the params of the blocks that moved (new objects when they were quantized).
            self.trainable.layers[:] = layer_named_params(self.layout)
            set_active_params(self.optimizer, self.trainable, layers)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        batch = to_device(batch, self.device, self.loss_chunk_tokens)
        with self._autocast():
            loss_sum = lm_loss_sum(self.model, batch, self.loss_chunk_tokens)
        (loss_sum * scale).backward()
        return loss_sum.detach()

    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = to_device(batch, self.device, self.loss_chunk_tokens)
        with torch.no_grad(), self._autocast():
            return lm_loss_sum(self.model, batch, self.loss_chunk_tokens).float()

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
                                         self.optimizer_state_bytes(), self.store.host_bytes() if self.store else 0)
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
        torch.save(self.exact_state_dict(), folder / "model.pt")
        torch.save(named_optimizer_state(self.optimizer, self.trainable), folder / "optim.pt")

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote; the same layers must be active."""
        # To host memory (mapped, not read whole), then copied into the params: with int8/NF4 frozen storage the
        # exact model does not fit the device, which is why that storage was chosen.
        state = torch.load(folder / "model.pt", map_location="cpu", mmap=True)
        if self.store is None:
            self.model.load_state_dict(state)
        else:
            result = self.model.load_state_dict(self.store.load_exact(state), strict=False)
            if result.unexpected_keys or set(result.missing_keys) != set(self.store.quantized_names()):
                raise KeyError(f"{folder / 'model.pt'} does not match the model: missing {result.missing_keys}, "
                               f"unexpected {result.unexpected_keys}")
        saved = torch.load(folder / "optim.pt", map_location=self.device)
        self.optimizer.state.clear()  # nothing of an earlier, failed load stays
        load_named_optimizer_state(self.optimizer, self.trainable, saved)

    def exact_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state with exact weights: a quantized frozen block's come from its host copies."""
        state = self.model.state_dict()
        return self.store.exact_state_dict(state) if self.store else state

    def save_model(self, path: str, spec: FolderSpec) -> None:
        """The model as a Hugging Face folder, a shard at a time (a LoRA model: its adapters, as peft saves them)."""
        state = self.exact_state_dict()
        if is_adapter_model(self.model):
            self.model.save_pretrained(path, state_dict=state)
            return
        save_hf_folder(Path(path), self.model, lambda names: {name: state[name] for name in names}, spec)

    def close(self) -> None:
        self.optimizer = None
