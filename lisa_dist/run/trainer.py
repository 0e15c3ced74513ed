"""The one training loop: build -> train -> train_step (`lisa-dist train` calls `train`). It never asks which
backend runs it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lisa_dist.backends import Backend, build_backend
from lisa_dist.config import Config, always_lr_scale_of, parse_size, validate_for_model
from lisa_dist.data import (
    MixtureOrder,
    ShardedBatches,
    data_fingerprint,
    fill_rate,
    load_examples,
    load_mixture,
    pack_examples,
    split_heldout,
    use_chat_template,
)
from lisa_dist.dist import (
    PeerReport,
    broadcast_seed,
    collective_failure,
    is_collective_failure,
    raise_together,
    rank_table,
    run_together,
)
from lisa_dist.errors import CheckpointError, ConfigError, DataError, DistError, Preempted
from lisa_dist.method import GradNormImportance, LayerSampler, apply_lora, lisa_trainable, lr_at
from lisa_dist.models import (
    CompileWatch,
    FolderSpec,
    apply_activation_checkpointing,
    compile_blocks,
    compiled_graphs,
    export_dtype,
    find_layout,
    generation_config,
    lookup_without_grad,
    open_model,
    source_dtype,
    supervised_tokens,
)
from lisa_dist.run import outputs
from lisa_dist.run.evaluation import EvalSet, evaluate
from lisa_dist.run.metrics import (
    ConsoleSink,
    JsonlSink,
    MetricsLogger,
    TensorBoardSink,
    WandbSink,
    read_jsonl,
    truncate_jsonl,
)
from lisa_dist.run.preemption import STOP, stop_on_signals
from lisa_dist.run.resume import Start, plan, restore
from lisa_dist.run.resume import save as save_checkpoint
from lisa_dist.run.state import Run

log = logging.getLogger(__name__)


def build(cfg: Config, backend: Backend | None = None, start: Start | None = None) -> Run:
    """Everything a run needs, on `cfg.backend` (or on `backend`, a baseline's optimizer: `benchmarks.lib.baselines`),
    resumed from `start` (default: where `resume.plan` says this run starts)."""
    backend = backend or build_backend(cfg)
    start = start or plan(cfg, backend)
    ranks = rank_table()
    if backend.is_main and backend.world_size > 1:
        log.info("%d ranks (rank=host:pid): %s", backend.world_size, ranks)
    # Rank 0's seeds on every rank: model init, data order and the layer schedule must agree.
    seed = broadcast_seed(cfg.train.seed)
    sampler_seed = seed if cfg.lisa.seed is None else broadcast_seed(cfg.lisa.seed)
    torch.manual_seed(seed)
    if cfg.model.attn_implementation == "flex_attention" and backend.device.type == "cpu":
        raise ConfigError(
            "model.attn_implementation='flex_attention' trains on CUDA only (torch's FlexAttention has "
            "no backward on CPU): use sdpa or eager here"
        )
    if backend.is_main and backend.device.type == "cuda" and cfg.train.precision == "fp32" and not cfg.train.tf32:
        log.info(
            "train.precision=fp32 runs exact fp32 matmuls, several times slower than bf16 on this GPU: "
            "train.tf32=true uses its TF32 tensor cores, train.precision=bf16 autocasts"
        )
    skeleton, tokenizer, weights = open_model(cfg.model, seed=seed, empty_init=backend.empty_init)
    layout = find_layout(skeleton, cfg.model.layers_path)
    validate_for_model(cfg, layout.num_layers, layout.learned_positions())
    if backend.is_main:
        log.info("model: %s", layout.describe())
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(skeleton)  # before sharding: FSDP then wraps the checkpointed blocks
    if cfg.train.compile:
        compile_blocks(layout.layers)  # in place, before sharding too (FSDP's hooks stay outside the graphs)
    model = backend.materialize(skeleton, layout, weights)
    if cfg.lora.enabled:
        model, trainable = apply_lora(model, cfg.lora)
    else:
        trainable = lisa_trainable(layout, cfg.lisa.train_embeddings, always_lr_scale_of(cfg))
        if not cfg.lisa.train_embeddings and layout.embedding is not None and layout.head is None:
            lookup_without_grad(layout.embedding)  # tied: the shared matrix learns as the head only
    data = load_data(cfg, tokenizer, backend, seed)
    held_out = data.held_out
    batches = _batches(cfg, data, backend, tokenizer.pad_token_id, seed)
    backend.prepare(model, trainable)
    sampler = (
        _build_sampler(cfg, layout.num_layers, sampler_seed) if cfg.lisa.enabled and not cfg.lora.enabled else None
    )
    if sampler is None:
        backend.activate(range(len(trainable.layers)))
    # train.epochs: as `train` resolved it before planning the resume; here too for callers of build alone.
    steps = cfg.train.epochs * batches.steps_per_epoch if cfg.train.epochs else cfg.train.steps
    run = Run(
        cfg,
        backend,
        layout,
        trainable,
        batches,
        sampler,
        MetricsLogger([]),
        tokenizer,
        steps=steps,
        seed=seed,
        sampler_seed=sampler_seed,
    )
    run.peers = PeerReport() if backend.world_size > 1 else None
    run.compile_watch = CompileWatch() if cfg.train.compile else None
    run.data_files = data_fingerprint(cfg.data) if backend.is_main else {}
    run.data_sources = data.sources
    if held_out is not None:
        run.eval_set = EvalSet(
            held_out,
            cfg.train.micro_batch_size,
            backend.rank,
            backend.world_size,
            tokenizer.pad_token_id,
            cfg.train.eval_batches,
            flatten=_flatten(cfg),
        )
    if sampler is not None and cfg.lisa.strategy == "grad_norm":
        run.importance = GradNormImportance(layout.num_layers, cfg.lisa.importance_floor, cfg.lisa.importance_decay)
    run.start_step = restore(run, start) if not (start.completed and start.path is None) else start.step
    run.metrics = _build_metrics(cfg, backend.is_main, run.start_step, done=run.start_step >= run.steps)
    return run


@dataclasses.dataclass
class TrainingData:
    train: Any
    held_out: Any = None
    order: MixtureOrder | None = None
    """data.mixture's weighted draws per epoch (None: every example once per epoch)."""
    sources: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """data.mixture: what each source gave (logged at start, written to summary.json)."""


def load_data(cfg: Config, tokenizer: Any, backend: Backend, seed: int | None = None) -> TrainingData:
    """The training examples and the evaluation examples or None: data.path less the held-out data.eval_fraction,
    or data.eval_path, or data.mixture's sources; packed into rows with data.packing (the held-out examples are
    drawn before packing). `seed` (default train.seed) draws the held-out share and the mixture."""
    seed = cfg.train.seed if seed is None else seed
    use_chat_template(tokenizer, cfg.data.chat_template)  # before tokenizing; saved with the tokenizer
    data = cfg.data
    if data.mixture:
        mixture = load_mixture(data, tokenizer, seed, is_main=backend.is_main, barrier=backend.barrier)
        out = TrainingData(mixture.train, mixture.held_out, mixture.order, mixture.sources)
        if data.eval_path:
            out.held_out = _eval_file(cfg, tokenizer, backend)
            out.held_out = pack_examples(out.held_out, data.max_length) if data.packing else out.held_out
        return out
    dataset = load_examples(data, tokenizer, is_main=backend.is_main, barrier=backend.barrier)
    held_out = None
    if data.eval_fraction:
        dataset, held_out = split_heldout(dataset, data.eval_fraction, seed)
    elif data.eval_path:
        held_out = _eval_file(cfg, tokenizer, backend)
    if data.packing:
        examples = len(dataset)
        dataset = pack_examples(dataset, data.max_length)
        held_out = pack_examples(held_out, data.max_length) if held_out is not None else None
        if backend.is_main:
            log.info(
                "data.packing: %d examples in %d rows of up to %d tokens (best-fit decreasing), %.1f%% full",
                examples,
                len(dataset),
                data.max_length,
                100 * fill_rate(dataset, data.max_length),
            )
    return TrainingData(dataset, held_out)


def _eval_file(cfg: Config, tokenizer: Any, backend: Backend) -> Any:
    data = cfg.data
    try:
        return load_examples(
            dataclasses.replace(data, path=data.eval_path, mixture=[]),
            tokenizer,
            is_main=backend.is_main,
            barrier=backend.barrier,
        )
    except DataError as exc:  # the loader names the field it reads, data.path: here it read data.eval_path
        raise DataError(str(exc).replace("data.path", "data.eval_path")) from None


def steps_from_epochs(cfg: Config, backend: Backend) -> int:
    """train.epochs x the optimizer steps of one pass over the training examples (as `build` will load them)."""
    _, tokenizer, _ = open_model(cfg.model, seed=cfg.train.seed)
    data = load_data(cfg, tokenizer, backend)
    return cfg.train.epochs * _batches(cfg, data, backend, tokenizer.pad_token_id, cfg.train.seed).steps_per_epoch


def _batches(cfg: Config, data: TrainingData, backend: Backend, pad_id: int, seed: int) -> ShardedBatches:
    return ShardedBatches(
        data.train,
        seed=seed,
        rank=backend.rank,
        world_size=backend.world_size,
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum,
        pad_id=pad_id,
        flatten=_flatten(cfg),
        order=data.order,
        epoch_size=data.order.size if data.order else 0,
    )


def _flatten(cfg: Config) -> bool:
    """Packed micro-batches of several rows go to flash attention as one row (its varlen boundaries)."""
    return cfg.data.packing and cfg.model.attn_implementation == "flash_attention_2"


def _build_sampler(cfg: Config, num_layers: int, seed: int) -> LayerSampler:
    lisa = cfg.lisa
    return LayerSampler(
        num_layers,
        lisa.gamma,
        lisa.interval,
        seed=seed,
        strategy=lisa.strategy,
        weights=lisa.weights,
        fixed_layers=lisa.fixed_layers,
    )


def _build_metrics(cfg: Config, is_main: bool, start_step: int, done: bool = False) -> MetricsLogger:
    if not is_main or done:  # a completed run's metrics stay as they are
        return MetricsLogger([])
    path = outputs.metrics_path(cfg)
    if start_step:  # resumed: keep the records up to the checkpoint, the steps after it are run again
        truncate_jsonl(path, start_step)
    sinks: list = [JsonlSink(path, append=start_step > 0), ConsoleSink(cfg.logging.console_every)]
    out = Path(cfg.train.output_dir)
    if cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(out / "tensorboard", start_step=start_step))
    if cfg.logging.wandb:
        sinks.append(
            WandbSink(cfg.logging.wandb_project, out, cfg.to_dict(), mode=cfg.logging.wandb_mode, name=out.name)
        )
    return MetricsLogger(sinks)


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
        log.info(
            "step %d: LISA period %d trains layers %s (%d of %d)",
            step + 1,
            period,
            list(run.active),
            len(run.active),
            run.layout.num_layers,
        )
    return True


def train_step(run: Run, step: int) -> dict[str, Any] | None:
    """One optimizer step over the global batch; returns the metrics record on logging steps.

    If any rank was asked to stop (a signal), no rank runs this step: `run.preempted` is set and the step before
    is the last one, the one to checkpoint."""
    backend, cfg = run.backend, run.cfg
    start = time.perf_counter()
    if run.peers is not None:
        run.peers.started(step + 1)
    run.doing = f"step {step + 1}: the token-count reduction"
    micro_batches = run.batches.step_batches(step)
    local_counts = torch.tensor(
        [
            sum(supervised_tokens(b) for b in micro_batches),
            sum(int(b["attention_mask"].sum()) for b in micro_batches),
            int(STOP.requested),
        ],
        dtype=torch.int64,
    )
    # The loss is a mean over the supervised tokens of the whole global batch, whatever its split over ranks and
    # micro-batches: every rank scales its summed loss by the same global count. The same reduction tells every
    # rank whether any of them was asked to stop.
    counts = backend.all_reduce_sum(local_counts)
    if counts[2]:
        run.preempted = True
        return None
    run.doing = f"step {step + 1}: the LISA switch"
    due = run.sampler is not None and run.sampler.period_of(step) != run.period
    if due:
        _synchronize(backend.device)  # the switch's time, not the queued work of the step before
    switch_start = time.perf_counter()
    switched = maybe_switch(run, step)
    if due:
        _synchronize(backend.device)
    switch_end = time.perf_counter()
    switch_s = switch_end - switch_start
    run.doing = f"step {step + 1}: forward and backward"
    # Summed on the device and read on logging steps only: no host sync per micro-batch (the scale comes from the
    # host's token counts), so the host queues the next micro-batch while the device works.
    loss_sum = torch.zeros((), dtype=torch.float64, device=backend.device)
    scale = 1.0 / max(1, int(counts[0]))
    for batch in micro_batches:
        loss_sum += backend.forward_backward(batch, scale).double()
    if run.compile_watch is not None and backend.is_main:
        for warning in run.compile_watch.news():
            log.warning(warning)
    if run.importance is not None:
        run.importance.observe(run.active, backend.layer_grad_norms(run.active))
    run.doing = f"step {step + 1}: the optimizer step"
    lr = lr_at(step, cfg.optim, run.steps)
    done = step + 1
    logging_step = not done % cfg.logging.log_every or done == run.steps
    grad_norm = backend.step(lr, measure=logging_step)  # the memory it holds: only what a record reports
    run.tokens_seen += int(counts[1])
    if not logging_step:
        return None
    # Cross-rank reduction of the loss only on logging steps.
    run.doing = f"step {step + 1}: the loss reduction"
    loss = float(backend.all_reduce_sum(loss_sum)) / max(1, int(counts[0]))
    compiled = {"compiled_graphs": compiled_graphs()} if cfg.train.compile else {}
    return {
        **compiled,
        "step": done,
        "epoch": run.batches.epoch_of(step),
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": run.tokens_seen,
        "tokens_per_s": int(counts[1]) / (switch_start - start + time.perf_counter() - switch_end),
        "elapsed_s": run.elapsed_s(),
        "active_layers": list(run.active),
        "switched": switched,
        "switch_s": switch_s,
        "trainable_params": run.trainable.num_params(run.active),
        "optimizer_state_bytes": backend.optimizer_state_bytes(),
        "state_bytes": backend.state_bytes(),
        **device_memory(backend.device),
    }


def device_memory(device: torch.device) -> dict[str, int]:
    """CUDA: what the caching allocator holds now and at its peak (host-side counters: no sync); {} elsewhere."""
    if device.type != "cuda":
        return {}
    return {
        "cuda_allocated": torch.cuda.memory_allocated(device),
        "cuda_reserved": torch.cuda.memory_reserved(device),
        "cuda_max_allocated": torch.cuda.max_memory_allocated(device),
        "cuda_max_reserved": torch.cuda.max_memory_reserved(device),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(cfg: Config, backend: Backend | None = None) -> dict[str, Any]:
    """Run `cfg.train.steps` optimizer steps; returns the summary (also written to <output_dir>/summary.json).

    `backend`: one built by the caller (a baseline's, or to use its model afterwards); by default the one `cfg`
    names. The output folders are checked before anything runs and locked for the run's life; a run that already
    completed returns its summary and leaves its outputs as they are."""
    backend = backend or build_backend(cfg)
    lock = None
    try:
        error = None
        try:
            outputs.check_outputs(cfg)
            if backend.is_main:
                lock = _lock_outputs(cfg)
        except Exception as exc:  # noqa: BLE001 - raised on every rank
            error = exc
        raise_together(error)
        steps = steps_from_epochs(cfg, backend) if cfg.train.epochs else cfg.train.steps
        if cfg.train.epochs and backend.is_main:
            log.info("train.epochs=%d: %d optimizer steps", cfg.train.epochs, steps)
        start = plan(cfg, backend, steps)
        if start.completed:
            summary = _completed(cfg, backend, start, steps)
            backend.close()
            return summary
        return _train(build(cfg, backend, start))
    finally:
        for held in lock or ():
            held.release()


def _lock_outputs(cfg: Config) -> list[outputs.OutputLock]:
    # Every folder the run writes and prunes, its default checkpoints/ included: a second job pointing its
    # checkpoint.dir there is refused. One lock per folder (checkpoint.dir may be train.output_dir itself).
    out, root = Path(cfg.train.output_dir).resolve(), outputs.checkpoint_root(cfg).resolve()
    field = "checkpoint.dir" if cfg.checkpoint.dir else "train.output_dir (its checkpoints/ folder)"
    locks = [outputs.OutputLock(out, "train.output_dir")]
    if root != out:
        locks.append(outputs.OutputLock(root, field))
    taken = []
    try:
        for lock in locks:
            lock.acquire()
            taken.append(lock)
    except Exception:
        for lock in taken:
            lock.release()
        raise
    return taken


def _completed(cfg: Config, backend: Backend, start: Start, steps: int) -> dict[str, Any]:
    path = Path(cfg.train.output_dir) / outputs.SUMMARY
    summary = {"steps": start.step}
    try:
        summary = json.loads(path.read_text()) if path.is_file() else summary
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        if backend.is_main:
            log.warning("%s does not read (%s): reporting the completed run from its checkpoint", path, exc)
    if backend.is_main:
        log.info(
            "this run already completed its %d steps (%s): its outputs are left as they are; raise "
            "train.steps to continue it",
            steps,
            path if path.is_file() else start.path,
        )
    return summary


def _train(run: Run) -> dict[str, Any]:
    cfg, out = run.cfg, Path(run.cfg.train.output_dir)
    if run.backend.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log.info("data: %d examples, %d steps per epoch", run.batches.num_examples, run.batches.steps_per_epoch)
    bar = tqdm(
        total=run.steps,
        initial=run.start_step,
        desc="train",
        disable=not (run.backend.is_main and cfg.logging.progress),
    )
    run.segment_start = time.perf_counter()
    try:
        with logging_redirect_tqdm(), stop_on_signals(cfg.checkpoint.on_signal):
            if run.start_step == 0 and cfg.train.eval_at_start:
                _evaluate(run, 0)
            for step in range(run.start_step, run.steps):
                record = train_step(run, step)
                if run.preempted:  # the step before this one was the last: checkpoint it and stop
                    raise Preempted(step, _checkpoint(run, step) if step > run.start_step else None)
                if record is not None:
                    run.metrics.log(record)
                    run.history.append(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", layers=record["active_layers"], refresh=False)
                bar.update(1)
                every = cfg.train.eval_every
                if (every and (step + 1) % every == 0) or step + 1 == run.steps:
                    _evaluate(run, step + 1)
                _maybe_checkpoint(run, step + 1)
        summary = _finish(run, out)
    except Preempted:
        run.backend.close()  # every rank stopped at the same step: leave together
        raise
    except RuntimeError as exc:
        if run.backend.world_size > 1 and is_collective_failure(exc):
            raise collective_failure(exc, run.doing, cfg.backend.timeout_s, run.peers) from exc
        raise
    finally:
        bar.close()
        run.metrics.close()
    # Only on success: a rank that failed alone must exit at once (its launcher then stops the others), not wait
    # in a closing barrier for peers that are still computing.
    run.backend.close()
    return summary


def _evaluate(run: Run, done: int) -> None:
    """The eval loss after `done` steps (with evaluation data), logged like a training record."""
    if run.eval_set is None:
        return
    run.doing = f"the evaluation after step {done}"
    record = evaluate(run, done)
    run.metrics.log(record)
    run.evals.append(record)


def _maybe_checkpoint(run: Run, done: int) -> None:
    every = run.cfg.checkpoint.every
    if every and (done % every == 0 or done == run.steps):
        _checkpoint(run, done)


def _checkpoint(run: Run, done: int) -> Path | None:
    run.doing = f"the checkpoint save after step {done}"
    return save_checkpoint(run, done)


def folder_spec(cfg: Config) -> FolderSpec:
    """How save_final writes: checkpoint.export_dtype (default: the source model's), checkpoint.max_shard_size."""
    c = cfg.checkpoint
    dtype = export_dtype(c.export_dtype, "checkpoint.export_dtype") if c.export_dtype else source_dtype(cfg.model)
    return FolderSpec(
        dtype,
        parse_size(c.max_shard_size, "checkpoint.max_shard_size"),
        generation_config(cfg.model),
        progress=cfg.logging.progress,
    )


def _save_final(run: Run, final: Path) -> None:
    """checkpoint.save_final: the model and tokenizer written beside `final` (the same name on every rank), then put
    in its place whole, so no file of an earlier final/ (a stale safetensors index) changes how it loads."""
    staging = final.with_name(f".{final.name}.saving")
    main = run.backend.is_main

    def clear() -> None:
        if main and staging.exists():
            shutil.rmtree(staging)  # left by a launch that died while saving, or by this one failing

    def finish() -> None:
        if main:
            run.tokenizer.save_pretrained(str(staging))
            if final.exists():
                log.info("checkpoint.save_final: replacing the earlier %s", final)
            outputs.replace_dir(staging, final)

    try:
        run_together(clear)
        run.backend.save_model(str(staging), folder_spec(run.cfg))
        run_together(finish)
    except DistError:
        raise  # a peer died: not a write that failed
    except Exception as exc:
        with contextlib.suppress(Exception):
            clear()
        cause = outputs.describe_os_error(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(
            f"checkpoint.save_final: writing {final} failed: {cause}; the checkpoints are intact "
            "(`lisa-dist export` writes the same folder from the last one)"
        ) from exc


def _finish(run: Run, out: Path) -> dict[str, Any]:
    cfg = run.cfg
    if cfg.checkpoint.save_final:
        _save_final(run, out / "final")
    # The whole run, earlier launches included: their records are in the metrics file.
    path = outputs.metrics_path(cfg)
    history = read_jsonl(path) if run.backend.is_main and path.is_file() else run.history + run.evals
    train = [r for r in history if "loss" in r]
    wall_s = run.elapsed_s()
    summary = {
        "method": "lora" if cfg.lora.enabled else ("lisa" if run.sampler else "full"),
        "backend": cfg.backend.name,
        "world_size": run.backend.world_size,
        "steps": run.steps,
        "first_loss": train[0]["loss"] if train else None,
        "last_loss": train[-1]["loss"] if train else None,
        "tokens": run.tokens_seen,
        "wall_s": wall_s,
        "tokens_per_s": run.tokens_seen / wall_s if wall_s else 0.0,
        "switches": run.switches,
        "layers_visited": sorted(run.layers_visited),
        "resumed_at_step": run.start_step or None,
        "max_optimizer_state_bytes": max((r["optimizer_state_bytes"] for r in train), default=0),
        **({"data_sources": run.data_sources} if run.data_sources else {}),
        **{
            f"peak_{k[len('cuda_max_') :]}_bytes": v
            for k, v in device_memory(run.backend.device).items()
            if k.startswith("cuda_max_")
        },
    }
    evals = [r for r in history if "eval_loss" in r]
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        summary.update(
            first_eval_loss=evals[0]["eval_loss"],
            last_eval_loss=evals[-1]["eval_loss"],
            last_eval_ppl=evals[-1]["eval_ppl"],
            best_eval_loss=best["eval_loss"],
            best_eval_step=best["step"],
        )
    if not run.backend.is_main:
        return summary
    (out / outputs.SUMMARY).write_text(json.dumps(summary, indent=2))
    log.info(
        "done: %d steps in %.1f s | loss %.4f -> %.4f | %.0f tok/s | %d switches, layers visited %s",
        summary["steps"],
        wall_s,
        summary["first_loss"],
        summary["last_loss"],
        summary["tokens_per_s"],
        summary["switches"],
        summary["layers_visited"],
    )
    return summary
