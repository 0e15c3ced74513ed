"""DeepSpeed ZeRO-1/2/3: the engine, and with it ZeRO's optimizer partitions, is rebuilt at every LISA switch.

ZeRO flattens each param group of the client optimizer into its own fp32 partition. The client AdamW has the
always-trained params in its first groups (a fixed order, so their partitions have the same layout at every
rebuild) and the active layers in the last ones. At a switch the always-trained groups' fp32 partitions and Adam
state are copied out, the engine is destroyed (with the forward hooks DeepSpeed leaves behind, which would keep
every old engine alive), `requires_grad` flips, a new engine is built over the new groups, and the copies go back
in: the embeddings and head keep exact fp32 masters and their moments; the layers that left lose theirs.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from lisa_dist.backends.build_locks import clear_stale_build_locks
from lisa_dist.backends.collective import ProcessGroupBackend
from lisa_dist.config import CAPABILITIES, Config, OptimConfig, backends_with, loss_chunk_tokens
from lisa_dist.dist import DistEnv
from lisa_dist.ds_config import fill_ds_config, read_ds_config, zero_stage
from lisa_dist.errors import ConfigError
from lisa_dist.method import (
    ALWAYS,
    TrainableSet,
    build_adamw,
    freeze_except_always,
    measured_state,
    moment_bytes,
    set_lr,
    set_requires_grad,
    storage_bytes,
)
from lisa_dist.models import Fetch, ModelLayout, WeightSource, lm_loss_sum, materialize_full, to_device

log = logging.getLogger(__name__)

Carried = list[tuple[torch.Tensor, dict[str, Any]]]
DS_TAG = "lisa"


class DeepSpeedBackend(ProcessGroupBackend):
    capabilities = CAPABILITIES["deepspeed"]

    @classmethod
    def from_config(cls, cfg: Config, env: DistEnv) -> DeepSpeedBackend:
        """The backend `cfg` describes (its ZeRO JSON backend.ds_config), over the process group of `env`."""
        t = cfg.train
        ds_config = cast(str, cfg.backend.ds_config)  # validated: required with backend.name=deepspeed
        return cls(
            env,
            ds_config,
            t.precision,
            cfg.optim,
            t.micro_batch_size,
            t.grad_accum,
            loss_chunk_tokens=loss_chunk_tokens(cfg),
        )

    def __init__(
        self,
        env: DistEnv,
        ds_config: str,
        precision: str,
        optim: OptimConfig,
        micro_batch_size: int,
        grad_accum: int,
        loss_chunk_tokens: int = 0,
    ) -> None:
        import deepspeed

        self.deepspeed = deepspeed
        self.rank, self.world_size, self.device = env.rank, env.world_size, env.device
        clear_stale_build_locks()  # a lock left by a killed op build would hang the op's load below, silently
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)
        unlink_shm_at_exit(env.rank)
        self.config = fill_ds_config(
            read_ds_config(ds_config),
            micro_batch_size=micro_batch_size,
            grad_accum=grad_accum,
            max_grad_norm=optim.max_grad_norm,
            precision=precision,
            world_size=env.world_size,
            source=f"backend.ds_config={ds_config}",
        )
        self.stage = zero_stage(self.config)
        self.grad_accum = grad_accum
        self.loss_chunk_tokens = loss_chunk_tokens
        self.optim_cfg = optim
        self.model: nn.Module | None = None
        self.trainable: TrainableSet | None = None
        self.engine: Any = None
        """The DeepSpeedEngine over the active layers (rebuilt at each switch), once activated."""
        self._micro = 0
        self.last_state: dict[str, int] = {}
        self.switch_phases: dict[str, float] = {}

    def empty_init(self) -> contextlib.AbstractContextManager:
        """ZeRO-3 builds the model partitioned from the start; the other stages build a meta-device skeleton."""
        if self.stage == 3:
            return self._zero3_init()
        from accelerate import init_empty_weights

        return init_empty_weights(include_buffers=False)

    @contextlib.contextmanager
    def _zero3_init(self) -> Iterator[None]:
        # While this object lives, transformers builds models under zero.Init, skipping its weight init (the
        # weights are loaded afterwards) and keeping RoPE buffers in fp32. Only the skeleton: rank 0's full copy of
        # the weights must be built normally.
        from transformers.integrations import HfDeepSpeedConfig

        hf_config = HfDeepSpeedConfig(self.config)
        try:
            yield
        finally:
            del hf_config

    def materialize(self, model: nn.Module, layout: ModelLayout, source: WeightSource) -> nn.Module:
        if self.stage < 3:
            return materialize_full(model, source, self.device)
        state = source.full_state_dict() if self.is_main else {}
        # One parameter at a time is gathered whole, filled by rank 0, and partitioned again on exit.
        with torch.no_grad():
            for name, param in model.named_parameters():
                with self.deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if self.is_main:
                        param.copy_(state[name].to(param.dtype))
        del state
        return model

    def prepare(self, model: nn.Module, trainable: TrainableSet) -> None:
        self.model, self.trainable = model, trainable
        model.train()
        freeze_except_always(model, trainable)
        # Every switch collects the old engine's reference cycles. The objects alive now (the model, the libraries)
        # live for the run: frozen out of the collector, a collection scans only what engines created since
        # (measured on the 4-layer test model: 0.30 s a switch before, 0.04 s after).
        gc.collect()
        gc.freeze()

    def activate(self, layers: Sequence[int]) -> None:
        """Rebuild the engine over `layers`; `switch_phases` keeps the seconds of each part of the rebuild."""
        phases = Phases()
        with phases("carry_out"):
            carried = carry_out(self.engine) if self.engine is not None else None
        if self.engine is not None:
            with phases("destroy"):
                destroy_engine(self.engine)
                self.engine = None
            with phases("gc"):
                gc.collect()  # the old engine's cycles: its partitions go before the new engine allocates its own
        self.engine = build_engine(self._model, self._trainable, layers, self.optim_cfg, self.config, carried, phases)
        self.switch_phases = phases.seconds

    # -- the step ------------------------------------------------------------------------------------------------

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        batch = to_device(batch, self.device, self.loss_chunk_tokens)
        loss_sum = lm_loss_sum(self.engine, batch, self.loss_chunk_tokens)
        # ZeRO averages gradients over ranks; the loss is already a mean over the global batch, so undo that.
        self.engine.backward(loss_sum * (scale * self.world_size), scale_wrt_gas=False)
        self._micro += 1
        if self._micro % self.grad_accum:
            self.engine.step()  # not a boundary: only advances DeepSpeed's micro-step count
        return loss_sum.detach().float()

    def eval_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = to_device(batch, self.device, self.loss_chunk_tokens)
        with torch.no_grad():
            return lm_loss_sum(self.engine, batch, self.loss_chunk_tokens).float()

    def layer_grad_norms(self, layers: Sequence[int]) -> list[float]:
        raise ConfigError(
            f"lisa.strategy='grad_norm' is not allowed: it runs on backend.name="
            f"{backends_with('grad_norm_sampling')} (ZeRO keeps gradients in flat partitions, not per "
            "layer)"
        )

    def step(self, lr: float, measure: bool = True) -> float:
        set_lr(self.engine.optimizer, lr)
        grads = self._grad_bytes() if measure else 0
        self.engine.step()
        if measure:
            self.last_state = measured_state(
                self._param_tensors(), grads, self._master_bytes(), self.optimizer_state_bytes()
            )
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def optimizer_state_bytes(self) -> int:
        return moment_bytes(self.engine.optimizer.optimizer)

    def state_bytes(self) -> dict[str, int]:
        """What ZeRO holds on this rank: params (ZeRO-3: partitions; ZeRO-1/2: whole, the trained ones flattened
        into padded group buffers), gradients (ZeRO-1: whole; ZeRO-2: the params of this partition; ZeRO-3: a flat
        partition buffer), fp32 master partitions and the Adam moments of the inner optimizer."""
        return dict(self.last_state)

    def _param_tensors(self) -> list[torch.Tensor]:
        params: list[Any] = list(self._model.parameters())  # ZeRO-3 gives each param its partition, ds_tensor
        return [p.ds_tensor for p in params] if self.stage == 3 else params

    def _grad_bytes(self) -> int:
        zero = self.engine.optimizer
        if self.stage == 3:
            return storage_bytes([zero.grad_partitions_flat_buffer])
        # After the boundary backward ZeRO-1/2 hold each group's gradient partition as a list of tensors (views into
        # the gradients of the params that overlap the partition, or into one contiguous buffer).
        partitions = [t for group in zero.averaged_gradients.values() if group is not None for t in group]
        return storage_bytes(
            [p.grad for p in self._model.parameters()] + partitions + [getattr(zero, "grads_in_partition", None)]
        )

    def _master_bytes(self) -> int:
        zero = self.engine.optimizer
        if self.stage < 3:
            return storage_bytes(zero.single_partition_of_fp32_groups)
        # fp32 training without offload: the fp32 partitions are the params' own partitions, not copies.
        own = {t.untyped_storage().data_ptr() for t in zero.fp16_partitioned_groups_flat if t is not None}
        return storage_bytes(t for t in zero.fp32_partitioned_groups_flat if t.untyped_storage().data_ptr() not in own)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model on rank 0 in CPU memory (ZeRO-3 gathers one parameter at a time); empty elsewhere."""
        if self.stage < 3:
            return {k: v.detach().cpu() for k, v in self._model.state_dict().items()} if self.is_main else {}
        model = self._model
        state = {}
        for name, param in model.named_parameters():
            with self.deepspeed.zero.GatheredParameters([param]):
                if self.is_main:
                    state[name] = param.detach().cpu().clone()
        if self.is_main:
            state.update({name: b.detach().cpu() for name, b in model.named_buffers() if name in model.state_dict()})
        return state

    def full_fetch(self) -> Fetch:
        """Each param asked for gathered whole (ZeRO-3: one at a time) onto rank 0's CPU; buffers as they are."""
        model = self._model
        params = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers(remove_duplicate=False))

        def fetch(names: list[str]) -> dict[str, torch.Tensor]:
            out = {}
            for name in names:
                if name not in params:
                    if self.is_main:
                        out[name] = buffers[name].detach().cpu()
                    continue
                with self.deepspeed.zero.GatheredParameters([params[name]], enabled=self.stage == 3):
                    if self.is_main:
                        out[name] = params[name].detach().cpu().clone()
            return out

        return fetch

    def save_state(self, folder: Path) -> None:
        """DeepSpeed's own sharded checkpoint of the current engine (model, active optimizer partitions)."""
        self.engine.save_checkpoint(str(folder), tag=DS_TAG)

    def load_state(self, folder: Path) -> None:
        """Load into an engine built for the same active layers and world size."""
        self.engine.load_checkpoint(str(folder), tag=DS_TAG)

    def close(self) -> None:
        if self.engine is not None:
            destroy_engine(self.engine)
            self.engine = None
        gc.unfreeze()
        gc.collect()
        self.close_process_group()


# -- rebuilding an engine at a LISA switch (also used by lisa_dist.integrations.hf) -------------------------------


class Phases:
    """Seconds spent in named parts of a rebuild: `with phases("name"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def build_engine(
    model: nn.Module,
    trainable: TrainableSet,
    layers: Sequence[int],
    optim_cfg: OptimConfig,
    config: dict[str, Any],
    carried: Carried | None = None,
    phases: Phases | None = None,
):
    """A new engine over the always-trained params and `layers` (the others frozen); `carried`, from the previous
    engine's `carry_out` (destroyed and dropped by the caller first, so two never coexist), goes back in."""
    import deepspeed

    phases = phases or Phases()
    with phases("requires_grad"):
        own_storage(set_requires_grad(trainable, layers), zero_stage(config))
        client = build_adamw(trainable.always, trainable.layer_params(layers), optim_cfg, drop_empty=True)
    with phases("initialize"), _no_param_broadcast(carried is not None):  # flattening, partitioning
        engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=config)
    if carried is not None:
        with phases("carry_in"):
            carry_in(engine, carried)
    return engine


@contextlib.contextmanager
def _no_param_broadcast(rebuild: bool) -> Iterator[None]:
    """A rebuild skips the engine's broadcast of every param from rank 0 (ZeRO-1/2; ZeRO-3 never does it): the
    first engine made the ranks' params equal and ZeRO's steps keep them so (each step all-gathers the updated
    partitions into every rank's params), so it would send the whole model (1.5 GB at 374M params) for nothing."""
    if not rebuild:
        yield
        return
    from deepspeed.runtime.engine import DeepSpeedEngine

    broadcast = DeepSpeedEngine._broadcast_model
    DeepSpeedEngine._broadcast_model = lambda self: None
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = broadcast


def own_storage(leaving: list[nn.Parameter], stage: int) -> None:
    """Give the params that leave training their own storage.

    ZeRO made each trained param (ZeRO-3: its partition) a view into the engine's flat group buffer: that buffer,
    with the old always-trained params, would stay alive as long as the layer.
    """
    with torch.no_grad():
        for param in leaving:
            if stage < 3:
                param.data = param.data.clone()
            else:
                param.ds_tensor.data = param.ds_tensor.data.clone()  # type: ignore[attr-defined]  # set by ZeRO-3


def unlink_shm_at_exit(rank: int) -> None:
    """Remove, at exit, the shared-memory buffer DeepSpeed's CPU all-reduce (its shm comm op) creates for this rank,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (69 MB), which DeepSpeed never
    removes: every CPU run left one per rank, until /dev/shm (RAM) filled and the OOM killer stopped runs. The peers
    map it when the op starts, so unlinking it at exit frees it once every rank has exited; absent on GPUs."""
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
        f"{os.environ.get('MASTER_PORT')}_{rank}"
    )
    atexit.register(lambda: (Path("/dev/shm") / name).unlink(missing_ok=True))


def always_partitions(engine) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions of the always-trained groups, in a fixed order."""
    zero = engine.optimizer
    groups = zero.optimizer.param_groups
    if engine.zero_optimization_stage() == 3:
        # ZeRO-3 empties the groups between steps; its sub-groups remember their source group.
        return [
            flat
            for i, flat in enumerate(zero.fp32_partitioned_groups_flat)
            if groups[zero.sub_group_to_group_id[i]]["role"] == ALWAYS
        ]
    return [g["params"][0] for g in groups if g["role"] == ALWAYS]


def carry_out(engine) -> Carried:
    """Copies of the always-trained fp32 partitions and their Adam state, to outlive `engine`."""
    state = engine.optimizer.optimizer.state
    return [
        (flat.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in state.get(flat, {}).items()})
        for flat in always_partitions(engine)
    ]


def carry_in(engine, carried: Carried) -> None:
    """Put `carry_out`'s copies into a new engine built with the same always-trained groups."""
    state = engine.optimizer.optimizer.state
    partitions = always_partitions(engine)
    if [t.shape for t, _ in carried] != [p.shape for p in partitions]:
        raise RuntimeError(
            "the always-trained partitions changed layout across a LISA switch: "
            f"{[t.shape for t, _ in carried]} -> {[p.shape for p in partitions]}"
        )
    with torch.no_grad():
        for flat, (saved, saved_state) in zip(partitions, carried, strict=True):
            flat.copy_(saved)
            if saved_state:
                state[flat] = saved_state


def destroy_engine(engine) -> None:
    """Destroy `engine` and remove what would keep it, and its optimizer, alive once the caller drops it."""
    engine.destroy()
    # destroy() leaves the engine's two forward hooks on the module: they would keep every old engine (and its
    # optimizer) alive.
    for hook in (engine.module_forward_pre_hook, engine.module_forward_post_hook):
        if hook is not None:
            hook.remove()
    # ZeRO-3 points every param at its optimizer (`param._z3_optimizer`), which holds the engine: until the next
    # engine overwrote it, the old engine, its fp32 partitions and Adam state lived on beside the new one.
    for param in engine.module.parameters():
        if getattr(param, "_z3_optimizer", None) is engine.optimizer:
            del param._z3_optimizer
