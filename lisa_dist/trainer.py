"""The one training loop: main -> build -> train -> train_step. It never asks which backend runs it."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lisa_dist.ac import apply_activation_checkpointing
from lisa_dist.backends import Backend, build_backend
from lisa_dist.config import Config, validate_for_model
from lisa_dist.data import ShardedBatches, load_examples
from lisa_dist.dist import broadcast_seed, rank_table
from lisa_dist.importance import GradNormImportance
from lisa_dist.loss import supervised_tokens
from lisa_dist.methods import apply_lora, lisa_trainable
from lisa_dist.metrics import ConsoleSink, JsonlSink, MetricsLogger, truncate_jsonl
from lisa_dist.models import ModelLayout, find_layout, open_model
from lisa_dist.optim import TrainableSet, lr_at
from lisa_dist.preemption import STOP, Preempted, stop_on_signals
from lisa_dist.resume import resume
from lisa_dist.resume import save as save_checkpoint
from lisa_dist.sampler import LayerSampler

log = logging.getLogger("lisa_dist.trainer")


@dataclass
class Run:
    """Everything a training run holds, built once by `build()`."""

    cfg: Config
    backend: Backend
    layout: ModelLayout
    trainable: TrainableSet
    batches: ShardedBatches
    sampler: LayerSampler | None
    metrics: MetricsLogger
    tokenizer: Any
    importance: GradNormImportance | None = None
    """lisa.strategy=grad_norm: the per-layer gradient norms the sampler draws with."""
    active: tuple[int, ...] = ()
    period: int | None = None
    start_step: int = 0
    preempted: bool = False
    tokens_seen: int = 0
    switches: int = 0
    layers_visited: set[int] = field(default_factory=set)
    history: list[dict[str, Any]] = field(default_factory=list)


def build(cfg: Config, backend: Backend | None = None) -> Run:
    """Everything a run needs, on `cfg.backend` (or on `backend`, a baseline's optimizer: `lisa_dist.baselines`)."""
    backend = backend or build_backend(cfg)
    ranks = rank_table()
    if backend.is_main and backend.world_size > 1:
        log.info("%d ranks (rank=host:pid): %s", backend.world_size, ranks)
    # Rank 0's seeds on every rank: model init, data order and the layer schedule must agree.
    cfg.train.seed = broadcast_seed(cfg.train.seed)
    if cfg.lisa.seed is not None:
        cfg.lisa.seed = broadcast_seed(cfg.lisa.seed)
    torch.manual_seed(cfg.train.seed)
    skeleton, tokenizer, weights = open_model(cfg.model, seed=cfg.train.seed, empty_init=backend.empty_init)
    layout = find_layout(skeleton, cfg.model.layers_path)
    validate_for_model(cfg, layout.num_layers)
    if backend.is_main:
        log.info("model: %s", layout.describe())
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(skeleton)  # before sharding: FSDP then wraps the checkpointed blocks
    model = backend.materialize(skeleton, layout, weights)
    if cfg.lora.enabled:
        model, trainable = apply_lora(model, cfg.lora)
    else:
        trainable = lisa_trainable(layout)
    dataset = load_examples(cfg.data, tokenizer, is_main=backend.is_main, barrier=backend.barrier)
    batches = ShardedBatches(
        dataset, seed=cfg.train.seed, rank=backend.rank, world_size=backend.world_size,
        micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
        pad_id=tokenizer.pad_token_id,
    )
    backend.prepare(model, trainable)
    sampler = _build_sampler(cfg, layout.num_layers) if cfg.lisa.enabled and not cfg.lora.enabled else None
    if sampler is None:
        backend.activate(range(len(trainable.layers)))
    run = Run(cfg, backend, layout, trainable, batches, sampler, MetricsLogger([]), tokenizer)
    if sampler is not None and cfg.lisa.strategy == "grad_norm":
        run.importance = GradNormImportance(layout.num_layers, cfg.lisa.importance_floor, cfg.lisa.importance_decay)
    run.start_step = resume(run)
    run.metrics = _build_metrics(cfg, backend.is_main, run.start_step)
    return run


def _build_sampler(cfg: Config, num_layers: int) -> LayerSampler:
    lisa = cfg.lisa
    return LayerSampler(
        num_layers, lisa.gamma, lisa.interval, seed=cfg.train.seed if lisa.seed is None else lisa.seed,
        strategy=lisa.strategy, weights=lisa.weights, fixed_layers=lisa.fixed_layers,
    )


def _build_metrics(cfg: Config, is_main: bool, start_step: int) -> MetricsLogger:
    if not is_main:
        return MetricsLogger([])
    path = cfg.logging.jsonl or Path(cfg.train.output_dir) / "metrics.jsonl"
    if start_step:  # resumed: keep the records up to the checkpoint, the steps after it are run again
        truncate_jsonl(path, start_step)
    return MetricsLogger([JsonlSink(path, append=start_step > 0), ConsoleSink(cfg.logging.console_every)])


def maybe_switch(run: Run, step: int) -> bool:
    """At the first step of a new period, activate that period's layers on every rank."""
    if run.sampler is None:
        run.active = tuple(range(len(run.trainable.layers)))
        return False
    period = run.sampler.period_of(step)
    if period == run.period:
        return False
    run.period = period
    run.active = run.sampler.agreed_layers(period, run.importance.weights() if run.importance else None)
    run.backend.activate(run.active)
    run.switches += 1
    run.layers_visited.update(run.active)
    if run.backend.is_main:
        log.info("step %d: LISA period %d trains layers %s (%d of %d)", step + 1, period, list(run.active),
                 len(run.active), run.layout.num_layers)
    return True


def train_step(run: Run, step: int) -> dict[str, Any] | None:
    """One optimizer step over the global batch; returns the metrics record on logging steps."""
    backend, cfg = run.backend, run.cfg
    start = time.perf_counter()
    switched = maybe_switch(run, step)
    switch_s = time.perf_counter() - start
    start = time.perf_counter()
    micro_batches = run.batches.step_batches(step)
    local_counts = torch.tensor([sum(supervised_tokens(b) for b in micro_batches),
                                 sum(int(b["attention_mask"].sum()) for b in micro_batches),
                                 int(STOP.requested)], dtype=torch.int64)
    # The loss is a mean over the supervised tokens of the whole global batch, whatever its split over ranks and
    # micro-batches: every rank scales its summed loss by the same global count. The same reduction tells every
    # rank whether any of them was asked to stop.
    counts = backend.all_reduce_sum(local_counts)
    run.preempted = bool(counts[2])
    loss_sum = torch.zeros((), dtype=torch.float64)
    for batch in micro_batches:
        loss_sum += backend.forward_backward(batch, 1.0 / max(1, int(counts[0]))).double().cpu()
    if run.importance is not None:
        run.importance.observe(run.active, backend.layer_grad_norms(run.active))
    lr = lr_at(step, cfg.optim, cfg.train.steps)
    grad_norm = backend.step(lr)
    run.tokens_seen += int(counts[1])
    done = step + 1
    if done % cfg.logging.log_every and done != cfg.train.steps:
        return None
    # Cross-rank reduction of the loss only on logging steps.
    loss = float(backend.all_reduce_sum(loss_sum)) / max(1, int(counts[0]))
    return {
        "step": done, "epoch": run.batches.epoch_of(step), "loss": loss, "lr": lr, "grad_norm": grad_norm,
        "tokens": run.tokens_seen, "tokens_per_s": int(counts[1]) / (time.perf_counter() - start),
        "active_layers": list(run.active), "switched": switched, "switch_s": switch_s,
        "trainable_params": run.trainable.num_params(run.active),
        "optimizer_state_bytes": backend.optimizer_state_bytes(), "state_bytes": backend.state_bytes(),
    }


def train(cfg: Config) -> dict[str, Any]:
    """Run `cfg.train.steps` optimizer steps; returns the summary (also written to <output_dir>/summary.json)."""
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = build(cfg)
    if run.backend.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log.info("data: %d examples, %d steps per epoch", run.batches.num_examples, run.batches.steps_per_epoch)
    start = time.perf_counter()
    bar = tqdm(total=cfg.train.steps, initial=run.start_step, desc="train",
               disable=not (run.backend.is_main and cfg.logging.progress))
    try:
        with logging_redirect_tqdm(), stop_on_signals(cfg.checkpoint.on_signal):
            for step in range(run.start_step, cfg.train.steps):
                record = train_step(run, step)
                if record is not None:
                    run.metrics.log(record)
                    run.history.append(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", layers=record["active_layers"], refresh=False)
                bar.update(1)
                _maybe_checkpoint(run, step + 1)
        summary = _finish(run, out, time.perf_counter() - start)
    except Preempted:
        run.backend.close()  # every rank stopped at the same step: leave together
        raise
    finally:
        bar.close()
        run.metrics.close()
    # Only on success: a rank that failed alone must exit at once (its launcher then stops the others), not wait
    # in a closing barrier for peers that are still computing.
    run.backend.close()
    return summary


def _maybe_checkpoint(run: Run, done: int) -> None:
    every = run.cfg.checkpoint.every
    if run.preempted or (every and (done % every == 0 or done == run.cfg.train.steps)):
        path = save_checkpoint(run, done)
        if run.preempted:
            raise Preempted(done, path)


def _finish(run: Run, out: Path, wall_s: float) -> dict[str, Any]:
    cfg = run.cfg
    if cfg.checkpoint.save_final:
        run.backend.save_model(str(out / "final"))
        if run.backend.is_main:
            run.tokenizer.save_pretrained(str(out / "final"))
    history = run.history
    summary = {
        "method": "lora" if cfg.lora.enabled else ("lisa" if run.sampler else "full"),
        "backend": cfg.backend.name, "world_size": run.backend.world_size, "steps": cfg.train.steps,
        "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None,
        "tokens": run.tokens_seen, "wall_s": wall_s, "tokens_per_s": run.tokens_seen / wall_s if wall_s else 0.0,
        "switches": run.switches, "layers_visited": sorted(run.layers_visited),
        "max_optimizer_state_bytes": max((r["optimizer_state_bytes"] for r in history), default=0),
    }
    if run.backend.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info(
            "done: %d steps in %.1f s | loss %.4f -> %.4f | %.0f tok/s | %d switches, layers visited %s",
            summary["steps"], wall_s, summary["first_loss"], summary["last_loss"], summary["tokens_per_s"],
            summary["switches"], summary["layers_visited"],
        )
    return summary
