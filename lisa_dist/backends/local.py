"""One process, one device: the reference every distributed backend is compared against."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn

from lisa_dist.backends.eager import EagerCore
from lisa_dist.config import CAPABILITIES, Config, OptimConfig, loss_chunk_tokens
from lisa_dist.dist import DistEnv, resolve_device
from lisa_dist.method import (
    FrozenStore,
    TrainableSet,
    clip_grad_norm,
    layer_sq_norms,
    load_named_optimizer_state,
    measured_state,
    moment_bytes,
    named_optimizer_state,
    set_lr,
    storage_bytes,
)
from lisa_dist.models import (
    FolderSpec,
    ModelLayout,
    WeightSource,
    is_adapter_model,
    materialize_full,
    save_hf_folder,
)


class LocalBackend(EagerCore):
    capabilities = CAPABILITIES["local"]
    rank = 0
    world_size = 1

    def __init__(
        self,
        device: str,
        precision: str,
        optim: OptimConfig,
        frozen_storage: str = "float32",
        host_dtype: str = "float32",
        loss_chunk_tokens: int = 0,
    ) -> None:
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

    @classmethod
    def from_config(cls, cfg: Config, env: DistEnv | None = None) -> LocalBackend:
        """The backend `cfg` describes (one process: no `env`)."""
        t, lisa = cfg.train, cfg.lisa
        return cls(
            t.device,
            t.precision,
            cfg.optim,
            frozen_storage=lisa.frozen_storage,
            host_dtype=lisa.host_dtype,
            loss_chunk_tokens=loss_chunk_tokens(cfg),
        )

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

    def _placed(self, model: nn.Module) -> nn.Module:
        return model if self.store else model.to(self.device)  # a frozen store placed the model block by block

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def layer_grad_norms(self, layers: Sequence[int]) -> list[float]:
        return layer_sq_norms(self._trainable, layers).sqrt().tolist()

    def trainable_params(self) -> list[nn.Parameter]:
        return [p for group in self._optimizer.param_groups for p in group["params"]]

    def step(self, lr: float, measure: bool = True) -> float:
        model, optimizer = self._model, self._optimizer
        norm = clip_grad_norm(self.trainable_params(), self.optim_cfg.max_grad_norm)
        grads = storage_bytes(p.grad for p in model.parameters()) if measure else 0
        set_lr(optimizer, lr)
        optimizer.step()
        if measure:
            self.last_state = measured_state(
                model.parameters(),
                grads,
                self.master_bytes(),
                self.optimizer_state_bytes(),
                self.store.host_bytes() if self.store else 0,
            )
        optimizer.zero_grad(set_to_none=True)
        return norm

    def master_bytes(self) -> int:
        """AdamW updates the params themselves: no separate fp32 copy."""
        return 0

    def optimizer_state_bytes(self) -> int:
        return moment_bytes(self._optimizer)

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
        torch.save(named_optimizer_state(self._optimizer, self._trainable), folder / "optim.pt")

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote; the same layers must be active."""
        # To host memory (mapped, not read whole), then copied into the params: with int8/NF4 frozen storage the
        # exact model does not fit the device, which is why that storage was chosen.
        state = torch.load(folder / "model.pt", map_location="cpu", mmap=True)
        if self.store is None:
            self._model.load_state_dict(state)
        else:
            result = self._model.load_state_dict(self.store.load_exact(state), strict=False)
            if result.unexpected_keys or set(result.missing_keys) != set(self.store.quantized_names()):
                raise KeyError(
                    f"{folder / 'model.pt'} does not match the model: missing {result.missing_keys}, "
                    f"unexpected {result.unexpected_keys}"
                )
        saved = torch.load(folder / "optim.pt", map_location=self.device)
        optimizer = self._optimizer
        optimizer.state.clear()  # nothing of an earlier, failed load stays
        load_named_optimizer_state(optimizer, self._trainable, saved)

    def exact_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state with exact weights: a quantized frozen block's come from its host copies."""
        state = self._model.state_dict()
        return self.store.exact_state_dict(state) if self.store else state

    def save_model(self, path: str, spec: FolderSpec) -> None:
        """The model as a Hugging Face folder, a shard at a time (a LoRA model: its adapters, as peft saves them)."""
        state = self.exact_state_dict()
        model: Any = self._model  # a transformers / peft model: save_pretrained is not nn.Module's
        if is_adapter_model(model):
            model.save_pretrained(path, state_dict=state)
            return
        save_hf_folder(Path(path), model, lambda names: {name: state[name] for name in names}, spec)

    def close(self) -> None:
        self.optimizer = None
