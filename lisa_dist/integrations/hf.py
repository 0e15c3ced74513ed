"""LISA inside `transformers.Trainer`, right on one device, DDP, FSDP2 (accelerate) and DeepSpeed ZeRO-1/2/3.

    args = TrainingArguments(...)      # deepspeed=... or fsdp=... as usual (ZeRO-3: before the model is loaded)
    trainer = LisaTrainer(model=model, args=args, train_dataset=data,
                          callbacks=[LisaCallback(gamma=2, interval=20)])
    trainer.train()                    # or train(resume_from_checkpoint=...)

`LisaCallback` decides when and what: at the first step of every period of `interval` optimizer steps it draws the
period's layers with lisa_dist's `LayerSampler` (seeded by `seed`, default `args.seed`, so every rank draws the same
set, and an all-gather proves it). `LisaTrainer` does what a callback cannot reach:
- its optimizer is lisa_dist's AdamW with four role-tagged groups (always-trained / active layers, each with and
  without weight decay): the LR scheduler sees a fixed set of groups while the layer groups' params change;
- a switch drops the Adam state of the layers that leave (they also lose their gradients), then per backend:
  one device: nothing more; DDP: the reducer is rebuilt over the params that now require grad, so frozen layers have
  no gradient buckets and send nothing; FSDP2: every unit re-runs its lazy init (`fsdp.rerun_lazy_init`); DeepSpeed:
  the engine is rebuilt over the new groups with the always-trained fp32 masters and moments carried over (the
  same code as lisa_dist's DeepSpeed backend), and Trainer's handles to the engine are pointed at the new one;
- the optimizer is built with the current period's layers active (on resume: the layers active when the checkpoint
  was written, a pure function of its global step), so Trainer's own checkpoints load into an optimizer, or a ZeRO
  partitioning, of the same shape, and the run continues with the same schedule.

Written against transformers 5.24 / accelerate 1.15; it overrides `Trainer.create_optimizer` and
`Trainer._prepare_for_training` (the latter only under DeepSpeed).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback

from lisa_dist.backends import build_engine, carry_out, destroy_engine, rerun_lazy_init, unlink_shm_at_exit
from lisa_dist.config import LISA_ALWAYS_LR_SCALE, OptimConfig
from lisa_dist.method import (
    LayerSampler,
    TrainableSet,
    build_adamw,
    lisa_trainable,
    set_active_params,
    set_requires_grad,
)
from lisa_dist.models import find_layout
from lisa_dist.teardown import guard_exit

log = logging.getLogger(__name__)

HF_STRATEGIES = ("uniform", "weighted", "fixed")
ADAMW = ("adamw_torch", "adamw_torch_fused")


class LisaCallback(TrainerCallback):
    """Which layers train, and when they switch: `gamma` of the decoder layers, redrawn every `interval` steps.

    `layers_path` names the decoder layers' ModuleList when lisa_dist's model families do not know the model
    (e.g. "model.layers"); `strategy` is uniform (the paper), weighted (with `weights`) or fixed (`fixed_layers`).
    Driven by `LisaTrainer`; `schedule` lists (first step, layers) of every period trained so far.
    """

    def __init__(
        self,
        gamma: int = 2,
        interval: int = 20,
        *,
        seed: int | None = None,
        strategy: str = "uniform",
        weights: Sequence[float] | None = None,
        fixed_layers: Sequence[int] | None = None,
        layers_path: str | None = None,
    ) -> None:
        if strategy not in HF_STRATEGIES:
            raise ValueError(
                f"LisaCallback(strategy={strategy!r}): allowed values are {', '.join(HF_STRATEGIES)}"
                " (grad_norm runs in lisa_dist's own trainer)"
            )
        self.gamma, self.interval, self.seed = gamma, interval, seed
        self.strategy, self.weights, self.fixed_layers = strategy, weights, fixed_layers
        self.layers_path = layers_path
        self.trainer: LisaTrainer | None = None
        self.sampler: LayerSampler | None = None
        self.period: int | None = None
        self.active: tuple[int, ...] = ()
        self.schedule: list[tuple[int, tuple[int, ...]]] = []

    def bind(self, trainer: LisaTrainer, num_layers: int) -> None:
        try:
            self.sampler = LayerSampler(
                num_layers,
                self.gamma,
                self.interval,
                seed=trainer.args.seed if self.seed is None else self.seed,
                strategy=self.strategy,
                weights=self.weights,
                fixed_layers=self.fixed_layers,
            )
        except ValueError as exc:
            raise ValueError(f"LisaCallback: {exc}") from None
        self.trainer = trainer

    def _bound(self) -> tuple[LayerSampler, LisaTrainer]:
        if self.sampler is None or self.trainer is None:
            raise RuntimeError("LisaCallback is not bound: LisaTrainer binds it when it is built")
        return self.sampler, self.trainer

    def layers_at(self, step: int) -> tuple[int, ...]:
        """Make the period of optimizer step `step` (0-based) current; returns its layers, the same on every rank."""
        sampler, _ = self._bound()
        self.period = sampler.period_of(step)
        self.active = sampler.agreed_layers(self.period)
        self.schedule.append((step, self.active))
        return self.active

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        if self.trainer is None:
            raise RuntimeError(
                "LisaCallback needs lisa_dist.integrations.hf.LisaTrainer: a plain Trainer's "
                "optimizer keeps no per-layer groups, and a callback cannot rebuild DDP's reducer "
                "or the DeepSpeed engine. Use LisaTrainer(..., callbacks=[LisaCallback(...)])."
            )

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        sampler, trainer = self._bound()
        if sampler.period_of(state.global_step) == self.period:
            return
        trainer.activate_layers(self.layers_at(state.global_step))
        if state.is_world_process_zero:
            log.info(
                "step %d: LISA period %d trains layers %s (%d of %d)",
                state.global_step + 1,
                self.period,
                list(self.active),
                len(self.active),
                sampler.num_layers,
            )


class LisaTrainer(Trainer):
    """`Trainer` whose optimizer state exists only for the always-trained params and the active layers.

    Needs exactly one `LisaCallback` in `callbacks`. Builds torch AdamW itself from TrainingArguments (learning_rate,
    weight_decay, adam_beta1/2, adam_epsilon); the LR schedule, clipping, accumulation, logging and checkpoints are
    Trainer's own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        guard_exit()  # accelerate started the process group: the same wait at exit as lisa_dist's own runs
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, LisaCallback)]
        if len(found) != 1:
            raise ValueError(f"LisaTrainer needs exactly one LisaCallback in callbacks=[...], got {len(found)}")
        self.lisa = found[0]
        self._check_supported()
        self.lisa.bind(self, find_layout(self._plain_model, self.lisa.layers_path).num_layers)

    @property
    def _plain_model(self) -> nn.Module:
        """The model being trained (Trainer's `model`, set from construction on)."""
        if self.model is None:
            raise RuntimeError("LisaTrainer has no model")
        return self.model

    def _check_supported(self) -> None:
        if self.optimizer is not None or self.lr_scheduler is not None:
            raise ValueError("LisaTrainer builds its own AdamW, with per-layer groups: do not pass optimizers=(...)")
        if hasattr(self.model, "peft_config"):
            raise ValueError("LisaTrainer trains whole layers: the model is a peft model (LoRA trains adapters)")
        optim = getattr(self.args.optim, "value", self.args.optim)
        if optim not in ADAMW:
            raise ValueError(
                f"TrainingArguments.optim={optim!r}: LisaTrainer runs torch AdamW (allowed: {', '.join(ADAMW)})"
            )
        if self.is_deepspeed_enabled:
            unlink_shm_at_exit(self.args.process_index)
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            for section in ("optimizer", "scheduler"):
                if section in config:
                    raise ValueError(
                        f"DeepSpeed config {self.args.deepspeed!r} has a {section!r} section: remove it"
                        " (LisaTrainer gives DeepSpeed its AdamW; the schedule is TrainingArguments'"
                        " lr_scheduler_type)"
                    )
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError("fsdp_config fsdp_version=1: LisaTrainer switches layers on FSDP2 (set fsdp_version: 2)")

    # -- the optimizer ---------------------------------------------------------------------------------------------

    def _optim_config(self) -> OptimConfig:
        a = self.args
        return OptimConfig(
            lr=a.learning_rate,
            weight_decay=a.weight_decay,
            betas=[a.adam_beta1, a.adam_beta2],
            eps=a.adam_epsilon,
            always_lr_scale=LISA_ALWAYS_LR_SCALE,  # the loop's LISA default: the same run either way
        )

    def _trainable(self) -> TrainableSet:
        # Read again at every switch: FSDP2 and ZeRO-3 replace or partition the params after the optimizer is built.
        return lisa_trainable(find_layout(self._plain_model, self.lisa.layers_path))

    def create_optimizer(self, model: nn.Module | None = None):
        """AdamW over the always-trained params and the layers of the current period (on resume: of the step before
        the checkpoint's global step, the layers its optimizer state belongs to)."""
        if self.optimizer is None:
            trainable = self._trainable()
            layers = self.lisa.layers_at(max(self.state.global_step - 1, 0))
            set_requires_grad(trainable, layers)
            self.optimizer = build_adamw(
                trainable.always,
                trainable.layer_params(layers),
                self._optim_config(),
                drop_empty=self.is_deepspeed_enabled,
            )
        return self.optimizer

    def activate_layers(self, layers: Sequence[int]) -> None:
        """Train exactly `layers` from now on (LisaCallback calls this at the first step of each period)."""
        trainable = self._trainable()
        if self.is_deepspeed_enabled:
            self._rebuild_engine(trainable, layers)
            return
        optimizer: Any = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper, or torch's
        set_active_params(optimizer, trainable, layers)
        if isinstance(self.model_wrapped, DistributedDataParallel):
            rebuild_reducer(self.model_wrapped)
        if self.is_fsdp_enabled:
            rerun_lazy_init(self._plain_model)

    # -- DeepSpeed ---------------------------------------------------------------------------------------------------

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self.is_deepspeed_enabled:
            # The training loop keeps what this returns for the whole run; the engine is rebuilt at every switch.
            model = CurrentEngine(self)
        return model, train_dataloader

    def _rebuild_engine(self, trainable: TrainableSet, layers: Sequence[int]) -> None:
        old: Any = self.model_wrapped  # the DeepSpeed engine
        wrapper: Any = self.optimizer  # accelerate's DeepSpeedOptimizerWrapper
        lrs = [group["lr"] for group in old.optimizer.param_groups]  # set by the LR scheduler for this step
        counters = {name: getattr(old, name) for name in ("global_steps", "global_samples", "micro_steps")}
        carried = carry_out(old)
        destroy_engine(old)
        self.accelerator._models = [m for m in self.accelerator._models if m is not old]
        wrapper.optimizer = None
        self.model_wrapped = self.deepspeed = self.accelerator.deepspeed_engine_wrapped.engine = None  # type: ignore[assignment]
        del old
        gc.collect()
        engine = build_engine(
            self._plain_model, trainable, layers, self._optim_config(), self.accelerator.deepspeed_config, carried
        )
        groups = engine.optimizer.param_groups  # ZeRO steps with its client optimizer's groups
        if len(groups) != len(lrs):
            raise RuntimeError(f"LISA switch changed the number of optimizer groups: {len(lrs)} -> {len(groups)}")
        for group, lr in zip(groups, lrs, strict=True):
            group["lr"] = lr
        for name, value in counters.items():
            setattr(engine, name, value)
        # Trainer's scheduler and the loop reach ZeRO through these (DeepSpeedOptimizerWrapper, the engine wrapper).
        wrapper.optimizer = engine.optimizer
        self.model_wrapped = self.deepspeed = self.accelerator.deepspeed_engine_wrapped.engine = engine
        self.accelerator._models.append(engine)


class CurrentEngine:
    """What Trainer's loop holds as its model under DeepSpeed: the engine of the current LISA period."""

    def __init__(self, trainer: LisaTrainer) -> None:
        self._trainer = trainer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer.model_wrapped, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._trainer.model_wrapped(*args, **kwargs)


def rebuild_reducer(ddp: DistributedDataParallel) -> None:
    """DDP buckets and hooks the params that required grad when its reducer was built: build the reducer again over
    those that do now (the steps of DDP's own `__setstate__`). Frozen layers then hold no gradient buffer and send
    nothing; newly active ones are all-reduced."""
    if ddp.static_graph:
        raise ValueError("TrainingArguments.ddp_static_graph=True: LISA changes the trained params every period")
    parameters, expect_sparse_gradient = ddp._build_params_for_reducer()
    ddp._ddp_init_helper(
        parameters, expect_sparse_gradient, ddp._build_debug_param_to_name_mapping(parameters), ddp.static_graph
    )
