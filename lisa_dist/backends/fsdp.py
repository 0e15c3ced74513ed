"""FSDP2 (`fully_shard`): every decoder block is a unit, then [final norm, LM head], then the root.

Parameters are sharded over the mesh's shard dimension; gradients, fp32 masters and Adam moments exist only for the
always-trained params and the active layers, sharded the same way. A switch flips `requires_grad` on the DTensor
shards and swaps the optimizer's layer groups; frozen blocks then get no gradient and send no reduce-scatter.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from accelerate import init_empty_weights
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lisa_dist.backends.collective import ProcessGroupBackend
from lisa_dist.backends.eager import EagerCore
from lisa_dist.backends.fsdp_frozen import ShardedFrozenStore
from lisa_dist.config import CAPABILITIES, QUANTIZED, Config, OptimConfig, loss_chunk_tokens
from lisa_dist.dist import DistEnv, io_group
from lisa_dist.errors import ConfigError
from lisa_dist.method import (
    FrozenStore,
    TrainableSet,
    clip_grad_norm,
    layer_sq_norms,
    measured_state,
    moment_bytes,
    set_lr,
    storage_bytes,
)
from lisa_dist.models import (
    Fetch,
    ModelLayout,
    SafetensorsWeights,
    WeightSource,
    allocate,
    load_rows_into,
)

log = logging.getLogger(__name__)


def build_mesh(env: DistEnv, replicate: int) -> DeviceMesh:
    """1-D (shard) mesh, or 2-D (replicate x shard) for HSDP: nodes replicate, a node's GPUs shard."""
    if env.world_size % replicate:
        raise ConfigError(
            f"backend.replicate={replicate} is not allowed: expected a divisor of the world size "
            f"{env.world_size} (HSDP: replicas of {env.world_size} // replicate ranks each)"
        )
    if replicate == 1:
        return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(
        env.device.type, (replicate, env.world_size // replicate), mesh_dim_names=("replicate", "shard")
    )


def apply_fsdp(
    model: nn.Module,
    layout: ModelLayout,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool = True,
) -> None:
    """Shard each decoder block, then [final norm, LM head] (when untied), then the root (embeddings); a module
    frozen always (a vision tower) is a unit of its own."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in layout.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for module in layout.frozen.values():
        # Training on text never runs it, so its own unit is never gathered; in the root's it would be, every step.
        fully_shard(module, mesh=mesh, mp_policy=mp)
    tail = [m for m in (layout.final_norm, layout.head) if m is not None]
    if layout.head is not None:
        # The root runs the head last: resharding it right after forward would only re-gather it for backward.
        fully_shard(tail, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def unit_signature(module: FSDPModule) -> tuple:
    """What FSDP2's lazy initialisation of a unit reads: its params' trainability and dtype."""
    group = module._get_fsdp_state()._fsdp_param_group
    return tuple((fp.sharded_param.requires_grad, fp.sharded_param.dtype) for fp in group.fsdp_params) if group else ()


def rerun_lazy_init(model: nn.Module, skip: Sequence[nn.Module] = (), seen: dict[int, tuple] | None = None) -> None:
    """After `requires_grad` flipped: FSDP2 fixes a group's compute/reduce dtypes at its first forward from its
    then-trainable params, so a block frozen then fails when unfrozen. unshard() re-runs that lazy init: only for
    the units whose trainability or dtypes changed since `seen` (their signatures, updated here; None: every unit),
    and not for `skip`, blocks that are out of their units while frozen."""
    for module in fsdp_modules(model):
        if any(module is s for s in skip):
            if seen is not None:
                seen.pop(id(module), None)  # out of its unit now: re-run when it is back
            continue
        signature = unit_signature(module)
        if seen is not None and seen.get(id(module)) == signature:
            continue
        module.unshard()
        module.reshard()
        if seen is not None:
            seen[id(module)] = signature


class FSDPBackend(EagerCore, ProcessGroupBackend):
    capabilities = CAPABILITIES["fsdp"]

    @classmethod
    def from_config(cls, cfg: Config, env: DistEnv) -> FSDPBackend:
        """The backend `cfg` describes, over the process group of `env`."""
        b, lisa = cfg.backend, cfg.lisa
        return cls(
            env,
            cfg.train.precision,
            cfg.optim,
            replicate=b.replicate,
            frozen_storage=lisa.frozen_storage,
            reshard_after_forward=b.reshard_after_forward,
            loss_chunk_tokens=loss_chunk_tokens(cfg),
            host_dtype=lisa.host_dtype,
        )

    def __init__(
        self,
        env: DistEnv,
        precision: str,
        optim: OptimConfig,
        replicate: int = 1,
        frozen_storage: str = "float32",
        reshard_after_forward: bool = True,
        loss_chunk_tokens: int = 0,
        host_dtype: str = "float32",
    ) -> None:
        self.env = env
        self.rank, self.world_size, self.device = env.rank, env.world_size, env.device
        self.mesh = build_mesh(env, replicate)
        self.param_dtype = torch.bfloat16 if precision == "bf16" else None
        self.frozen_storage, self.host_dtype = frozen_storage, host_dtype
        self.store: FrozenStore | ShardedFrozenStore | None = None
        self.reshard_after_forward = reshard_after_forward
        self.precision = precision
        self.loss_chunk_tokens = loss_chunk_tokens
        self.optim_cfg = optim
        self.model: nn.Module | None = None
        self.layout: ModelLayout | None = None
        self.trainable: TrainableSet | None = None
        self.optimizer: torch.optim.AdamW | None = None
        self.active: tuple[int, ...] = ()
        self.last_state: dict[str, int] = {}
        self.unit_signatures: dict[int, tuple] = {}
        """Per FSDP unit, its params' (requires_grad, dtype) when its lazy init last ran."""

    def empty_init(self) -> contextlib.AbstractContextManager:
        return init_empty_weights(include_buffers=False)

    def materialize(self, model: nn.Module, layout: ModelLayout, source: WeightSource) -> nn.Module:
        """Shard the meta-device skeleton, allocate only this rank's shards, then load them."""
        apply_fsdp(model, layout, self.mesh, self.param_dtype, self.reshard_after_forward)
        allocate(model, self.device)
        if isinstance(source, SafetensorsWeights):
            load_rows_into(model, source)
            how = "each rank read its own rows"
        else:
            full: dict[str, Any] = source.full_state_dict() if self.is_main else {}
            set_model_state_dict(
                model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
            )
            del full
            how = "rank 0 loaded and broadcast"
        if self.frozen_storage in QUANTIZED:  # exact shards on the host, quantized on the device
            self.store = ShardedFrozenStore(
                layout,
                self.frozen_storage,
                getattr(torch, self.host_dtype),
                self.device,
                self.mesh.get_group("shard"),
                self.param_dtype or torch.float32,
            )
            self.store.freeze_all()
        elif self.frozen_storage != "float32":
            # bfloat16: block.to(dtype) goes through FSDP2's _apply, which re-registers the sharded params.
            self.store = FrozenStore(layout, self.frozen_storage, "float32", self.device)
            self.store.freeze_all()
        if self.is_main:
            log.info("materialized %s over mesh %s (%s)", source.description, tuple(self.mesh.shape), how)
        self.model, self.layout = model, layout
        return model

    def _before_optimizer(self, model: nn.Module) -> None:
        for module in fsdp_modules(model):
            # The loss is already scaled by 1 / (global supervised tokens): gradients must be summed, not averaged.
            # A plain SUM (no PREMUL_SUM, which gloo lacks) with nothing to divide afterwards.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)

    def activate(self, layers: Sequence[int]) -> None:
        super().activate(layers)  # the params of blocks whose storage dtype changed are re-created there
        self.active = tuple(layers)
        rerun_lazy_init(self._model, self._out_of_units(), self.unit_signatures)

    def _out_of_units(self) -> list[nn.Module]:
        return self.store.frozen_units() if isinstance(self.store, ShardedFrozenStore) else []

    def step(self, lr: float, measure: bool = True) -> float:
        optimizer = self._optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = clip_grad_norm(params, self.optim_cfg.max_grad_norm, self._sum_over_shards, self.device)
        grads = storage_bytes(p.grad for p in self._model.parameters()) if measure else 0
        set_lr(optimizer, lr)
        optimizer.step()
        if measure:
            self._measure(grads)
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _measure(self, grads: int) -> None:
        params: list[torch.Tensor] = list(self._model.parameters())
        host = 0
        if isinstance(self.store, ShardedFrozenStore):  # the frozen matrices: quantized on the device, exact on host
            hosted = {id(p) for p in self.store.hosted()}
            params = [p for p in params if id(p) not in hosted] + self.store.device_tensors()
            host = self.store.host_bytes()
        self.last_state = measured_state(params, grads, 0, moment_bytes(self._optimizer), host)

    def layer_grad_norms(self, layers: Sequence[int]) -> list[float]:
        return self._sum_over_shards(layer_sq_norms(self._trainable, layers, self.device)).cpu().sqrt().tolist()

    def _sum_over_shards(self, value: torch.Tensor) -> torch.Tensor:
        # Replicas (HSDP) hold the same shards: add up only the ranks of one shard group.
        dist.all_reduce(value, group=self.mesh.get_group("shard"))
        return value

    def optimizer_state_bytes(self) -> int:
        return moment_bytes(self._optimizer)

    def state_bytes(self) -> dict[str, int]:
        """The sharded params (their padded storage), grads and moments this rank holds; the params are the
        masters."""
        return dict(self.last_state)

    def save_state(self, folder: Path) -> None:
        """Sharded model and optimizer state through torch.distributed.checkpoint (optimizer state keyed by
        parameter name, so it reshards onto another world size)."""
        import torch.distributed.checkpoint as dcp

        model_state, optim_state = get_state_dict(self._model, self._optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder), process_group=io_group())

    def load_state(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        model, optimizer = self._model, self._optimizer
        model_state, optim_state = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(folder), process_group=io_group())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if isinstance(self.store, ShardedFrozenStore):
            self.store.refresh()  # the exact shards were loaded: quantize them again

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model gathered on rank 0 in CPU memory (empty on other ranks)."""
        # Gathered in full: plain tensors, not the DTensors, lists or sharded tensors the stub's ValueType allows.
        return cast(
            "dict[str, torch.Tensor]",
            get_model_state_dict(self._model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)),
        )

    def full_fetch(self) -> Fetch:
        """Each tensor asked for all-gathered from its shards (a frozen block's host-kept shards on the device
        first: NCCL gathers device memory) and kept on rank 0's CPU."""
        state = self._model.state_dict()

        def fetch(names: list[str]) -> dict[str, torch.Tensor]:
            out = {}
            for name in names:
                tensor = state[name]
                if isinstance(tensor, DTensor):
                    tensor = cast(DTensor, tensor.to(self.device)).full_tensor()  # .to keeps a DTensor
                if self.is_main:
                    out[name] = tensor.detach().cpu()
            return out

        return fetch

    def close(self) -> None:
        self.optimizer = None
        self.close_process_group()
