"""What a training run saves in a checkpoint and how it continues from one, exactly.

Saved: the backend's model and optimizer state (active + always-trained), the step, the sampler's period and active
layers, tokens seen, the training time so far, every rank's RNG states, the config and library versions. The data
position and the learning rate are pure functions of the step, so the step restores them.

Where a run starts is decided before anything is written (`plan`): from the newest checkpoint that verifies (every
byte hashed, the hashing shared out among the ranks), or from step 0, but never over another run's outputs: a fresh
start in a folder that holds checkpoints, metrics or a summary is refused unless `train.overwrite=true`, and a run
that already completed says so and leaves everything as it is.
"""

from __future__ import annotations

import difflib
import json
import logging
import platform
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import yaml
from torch.distributed.checkpoint.api import CheckpointException

from lisa_dist.config import Config, backends_with, capabilities, config_overrides_of
from lisa_dist.data import data_fingerprint
from lisa_dist.dist import all_gather_objects, from_main, raise_together, run_together
from lisa_dist.errors import CheckpointError, ConfigError
from lisa_dist.run import checkpoint, outputs

if TYPE_CHECKING:
    from lisa_dist.backends import Backend
    from lisa_dist.run.state import Run

log = logging.getLogger(__name__)

# What a failed save or load can raise: torch.distributed.checkpoint's CheckpointException (every rank's failures,
# a full disk among them) derives from BaseException, so `except Exception` alone would skip the cleanup.
CHECKPOINT_FAILURES = (Exception, CheckpointException)

# Changing any of these changes what the remaining steps compute: refused at resume unless checkpoint.override. The
# run's length too: its optimizer steps (train.steps, or what train.epochs resolves to), which the schedule spans.
EXACTNESS_FIELDS = (
    "model.name",
    "model.config_overrides",
    "model.layers_path",
    "model.dtype",
    "data.path",
    "data.format",
    "data.max_length",
    "data.text_field",
    "data.messages_field",
    "data.skip_bad_rows",
    "data.conversations_field",
    "data.chat_template",
    "data.mixture",
    "data.subset",
    "data.revision",
    "data.packing",
    "data.eval_fraction",
    "lisa.enabled",
    "lisa.gamma",
    "lisa.interval",
    "lisa.strategy",
    "lisa.weights",
    "lisa.fixed_layers",
    "lisa.seed",
    "lisa.importance_floor",
    "lisa.importance_decay",
    "lisa.frozen_storage",
    "lisa.host_dtype",
    "lisa.train_embeddings",
    "lora.enabled",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "optim.lr",
    "optim.weight_decay",
    "optim.betas",
    "optim.eps",
    "optim.schedule",
    "optim.warmup_steps",
    "optim.min_lr_ratio",
    "optim.max_grad_norm",
    "optim.adam_8bit",
    "optim.always_lr_scale",
    "train.seed",
    "train.precision",
    "backend.name",
)


@dataclass
class Start:
    """Where a run starts: `path` (None: step 0) at `step`; `completed` when nothing is left to train."""

    path: Path | None = None
    step: int = 0
    completed: bool = False
    older: list[Path] = field(default_factory=list)
    """The checkpoints before `path`, newest first: the fallbacks if it fails to load."""
    changes: list[str] = field(default_factory=list)
    """What checkpoint.override let through against `path`'s config."""


def root_of(cfg: Config) -> Path:
    return outputs.checkpoint_root(cfg)


def versions() -> dict[str, str]:
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import deepspeed

        found["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return found


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- saving -------------------------------------------------------------------------------------------------------


def save(run: Run, steps_done: int) -> Path | None:
    """Collective: write checkpoint `step-<steps_done>`; returns its folder on the main rank.

    A failure on any rank (no space left, a read-only folder, ...) stops every rank with CheckpointError naming the
    folder and the cause; the temporary folder is removed and the previous checkpoint stays as it was.
    """
    cfg, backend = run.cfg, run.backend
    root = root_of(cfg)
    tmp = checkpoint.temp_dir(root, steps_done, from_main(checkpoint.new_token()))
    try:
        _write(run, tmp, steps_done)
        sizes = checkpoint.files_of(tmp)
        hashed = checkpoint.digests(tmp, checkpoint.share(sizes, backend.rank, backend.world_size))
        error = None
    except CHECKPOINT_FAILURES as exc:  # every rank must learn of it, whatever it is
        hashed, error = {}, exc
    try:
        raise_together(error)
        merged = {name: digest for part in all_gather_objects(hashed) for name, digest in part.items()}
        final = None
        if backend.is_main:
            final = checkpoint.finalize(
                tmp, root, steps_done, cfg.checkpoint.keep_last, merged, cfg.checkpoint.keep_best
            )
            log.info("saved checkpoint %s", final)
        backend.barrier()
    except CHECKPOINT_FAILURES as exc:
        if backend.is_main:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"saving checkpoint step-{steps_done} into {root} failed: {_cause(exc, root)}; the "
            "previous checkpoint is intact and its temporary folder was removed"
        ) from exc
    return final


def _write(run: Run, tmp: Path, steps_done: int) -> None:
    """Collective. Between the collectives, a rank's own writes end in `raise_together`, not a barrier: a rank that
    failed alone (the main rank's mkdir in a folder made read-only mid-run) would otherwise wait in the error's
    all-gather while the others wait in the barrier, every rank blocked until the I/O timeout."""
    cfg, backend = run.cfg, run.backend
    _together(lambda: (tmp / "rng").mkdir(parents=True) if backend.is_main else None)
    backend.save_state(tmp / "state")  # torch.distributed.checkpoint and DeepSpeed raise on every rank together

    def own_files() -> None:
        torch.save(rng_state(), tmp / "rng" / f"rank{backend.rank}.pt")
        if backend.is_main:
            trainer = {"step": steps_done, "epoch": run.batches.epoch_of(steps_done), **run.state_dict()}
            (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
            if run.evals:  # what checkpoint.keep_best ranks by
                (tmp / checkpoint.EVAL).write_text(json.dumps(run.evals[-1]))
            (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            (tmp / "versions.json").write_text(json.dumps(versions(), indent=1))

    _together(own_files)


def _together(work: Callable[[], object]) -> None:
    run_together(work, CHECKPOINT_FAILURES)


def _cause(exc: BaseException, root: Path) -> str:
    """The OSError behind `exc` (DCP wraps every rank's failure), in words; else what writing into `root` says now
    (torch.save reports a full disk without its errno); else `exc` itself."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or current in seen:
            continue
        seen.append(current)
        if isinstance(current, OSError):
            where = f" ({current.filename})" if current.filename else ""
            return f"{outputs.describe_os_error(current)}{where}"
        todo += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):  # each a (exception, traceback summary) pair in torch 2.x
            todo += [_exception_in(f) for f in failures.values()]
    try:
        outputs.check_writable(root, "checkpoint folder", probe_bytes=1 << 20)
    except ConfigError as probe:
        return str(probe).split(" is not writable: ", 1)[-1]
    text = " ".join(str(e) for e in seen)
    if "unexpected pos" in text or "file write failed" in text:  # torch.save's writer on a short write
        return f"no space left on the device: a write was cut short (the disk is full or over quota; {_free(root)})"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _exception_in(failure: object) -> BaseException | None:
    if isinstance(failure, BaseException):
        return failure
    if isinstance(failure, tuple):
        return next((part for part in failure if isinstance(part, BaseException)), None)
    found = getattr(failure, "exc", None)
    return found if isinstance(found, BaseException) else None


def _free(folder: Path) -> str:
    import shutil

    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free there now"
    except OSError:
        return "its free space unknown"


# -- deciding where to start ---------------------------------------------------------------------------------------


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".")
    if dotted == "model.config_overrides":  # under its old name in earlier runs' configs
        return config_overrides_of(cfg.get("model", {}))
    return cfg.get(section, {}).get(key)


def _global_batch(cfg: dict[str, Any], world: int) -> int:
    return cfg["train"]["micro_batch_size"] * cfg["train"]["grad_accum"] * world


def config_changes(
    saved: dict[str, Any],
    cfg: Config,
    saved_world: int,
    world: int,
    saved_step: int | None = None,
    saved_steps: int | None = None,
    steps: int | None = None,
) -> list[str]:
    """The changes against a saved config that would break exact continuation.

    The run's length compares the resolved steps: `saved_steps` (default: the saved train.steps, which earlier runs
    saved resolved) against `steps` (default: train.steps). Raising it is no change when the saved run had completed
    (`saved_step` == its steps): that run continues, its learning-rate schedule stretched over the new total."""
    now = cfg.to_dict()
    changes = [
        f"{name}: {_get(saved, name)!r} -> {_get(now, name)!r}"
        for name in EXACTNESS_FIELDS
        if _get(saved, name) != _get(now, name)
    ]
    before = _get(saved, "train.steps") if saved_steps is None else saved_steps
    after = cfg.train.steps if steps is None else steps
    if before != after:
        if saved_step is not None and saved_step == before and after > before:
            log.info(
                "continuing a completed run of %d steps to train.steps=%d: the learning-rate schedule now "
                "spans %d steps",
                before,
                after,
                after,
            )
        else:
            changes.append(f"train.steps: {before!r} -> {after!r}")
    before, after = _global_batch(saved, saved_world), _global_batch(now, world)
    if before != after:
        changes.append(f"global batch (train.micro_batch_size x train.grad_accum x world size): {before} -> {after}")
    return changes


def check_compatible(
    saved: dict[str, Any],
    cfg: Config,
    saved_world: int,
    world: int,
    saved_step: int | None = None,
    saved_steps: int | None = None,
    steps: int | None = None,
) -> list[str]:
    """The changes that would break exact resumption; raise unless checkpoint.override (then log them)."""
    changes = config_changes(saved, cfg, saved_world, world, saved_step, saved_steps, steps)
    if changes and not cfg.checkpoint.override:
        raise ConfigError(
            "the checkpoint was written with another config; resuming would not continue the same run: "
            + "; ".join(changes)
            + " (set checkpoint.override=true to resume anyway)"
        )
    for change in changes:
        log.warning("resuming with a changed config (checkpoint.override): %s", change)
    return changes


def _verified(path: Path, backend: Backend) -> str | None:
    """Collective: `path` hashed against its manifest, each rank hashing its share; None when every rank agrees."""
    try:
        names = checkpoint.share(checkpoint.manifest_files(path), backend.rank, backend.world_size)
        problem = checkpoint.verify(path, names)
    except OSError as exc:
        problem = f"unreadable ({outputs.describe_os_error(exc)})"
    return next((p for p in all_gather_objects(problem) if p), None)


def _candidates(cfg: Config) -> list[Path]:
    """The checkpoints to try, newest first: the one checkpoint.resume names, or every step-N of the folder."""
    mode = cfg.checkpoint.resume
    if mode in ("auto", "latest"):
        return [path for _, path in checkpoint.checkpoints(root_of(cfg))]
    return [Path(mode)]


def plan(cfg: Config, backend: Backend, steps: int | None = None) -> Start:
    """Collective: where a run of `steps` optimizer steps (default train.steps; `train` resolves train.epochs) starts.
    Raises ConfigError for a start that would lose or mix up saved outputs."""
    steps = cfg.train.steps if steps is None else steps
    error: Exception | None = None
    start = Start()
    if backend.is_main:
        try:
            start = _plan_main(cfg, backend, steps)
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            error = exc
    raise_together(error)
    start = from_main(start)
    if start.path is not None and start.completed is False:
        return _first_verified(cfg, backend, start, steps)
    return start


def _plan_main(cfg: Config, backend: Backend, steps: int) -> Start:
    mode = cfg.checkpoint.resume
    if cfg.train.overwrite:
        if mode not in ("auto", "none"):
            raise ConfigError(f"train.overwrite=true starts afresh: it cannot resume checkpoint.resume={mode!r}")
        outputs.remove_earlier_outputs(cfg)
        return Start()
    earlier = outputs.earlier_run(cfg)
    if mode == "none":
        if earlier.checkpoints:
            raise ConfigError(
                f"checkpoint.resume=none, but {root_of(cfg)} holds the checkpoints {', '.join(earlier.checkpoints)} "
                "of an earlier run: a fresh start there would prune them or be resumed from them later. Resume it "
                "(checkpoint.resume=auto), choose another train.output_dir or checkpoint.dir, or set "
                "train.overwrite=true to delete them"
            )
        return _fresh(cfg, earlier, steps)
    candidates = _candidates(cfg)
    if mode not in ("auto", "latest"):
        _, problem = checkpoint.read_manifest(candidates[0])
        if problem:
            close = difflib.get_close_matches(mode, ("auto", "latest", "none"), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close and not Path(mode).exists() else ""
            raise ConfigError(
                f"checkpoint.resume={mode!r} is not a usable checkpoint: {problem}{hint}; expected auto, "
                "latest, none or a step-N folder"
            )
    if not candidates:
        if mode == "latest":
            raise ConfigError(f"checkpoint.resume=latest, but {root_of(cfg)} holds no checkpoint")
        return _fresh(cfg, earlier, steps)
    _check_data(cfg, candidates[0])
    return Start(path=candidates[0], older=candidates[1:])


def _check_data(cfg: Config, path: Path) -> None:
    """Refuse to resume on data files whose bytes changed since checkpoint `path` (unless checkpoint.override):
    the remaining steps would draw other examples than the run was drawing."""
    try:
        saved = json.loads((path / "trainer.json").read_text()).get("data_files") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return  # an unreadable checkpoint is reported when it is verified
    if not saved:
        return  # written before checkpoints recorded their data
    now = data_fingerprint(cfg.data)
    if sorted(saved.values()) == sorted(now.values()):
        return  # the same bytes, even if the files were moved or are reached by another path now
    changed = [name for name in sorted(saved.keys() | now.keys()) if saved.get(name) != now.get(name)]
    detail = "; ".join(f"{name}: {_data_change(saved.get(name), now.get(name))}" for name in changed)
    if not cfg.checkpoint.override:
        raise ConfigError(
            f"the training data changed since checkpoint {path} was written ({detail}): resuming "
            "would not continue the same run. Restore the data, or set checkpoint.override=true to "
            "resume on the new data anyway"
        )
    log.warning("resuming on changed data (checkpoint.override): %s", detail)


def _data_change(before: str | None, after: str | None) -> str:
    if before is None:
        return "not in the checkpoint's data"
    if after is None:
        return "no longer among the data files"
    return f"its content changed (sha256 {before[:12]} -> {after[:12]})"


def _first_verified(cfg: Config, backend: Backend, start: Start, steps: int) -> Start:
    """Collective: the newest candidate that verifies; the unusable ones reported on the way."""
    candidates = [cast(Path, start.path), *start.older]  # a candidate was found: its path is set
    problems = []
    for i, path in enumerate(candidates):
        problem = _verified(path, backend)
        if problem is None:
            return _read_step(cfg, Start(path=path, older=candidates[i + 1 :]), backend, steps)
        problems.append(f"{path}: {problem}")
        if backend.is_main:
            log.warning("checkpoint %s is unusable: %s; trying the one before it", path, problem)
    return _none_usable(cfg, backend, problems)


def _none_usable(cfg: Config, backend: Backend, problems: list[str]) -> Start:
    mode = cfg.checkpoint.resume
    if mode != "auto":
        raise ConfigError(f"checkpoint.resume={mode!r} is not a usable checkpoint: {'; '.join(problems)}")
    if backend.is_main:
        log.warning("no usable checkpoint in %s (%s): starting from step 0", root_of(cfg), "; ".join(problems))
        outputs.set_aside_metrics(cfg)
    backend.barrier()
    return Start()


def _read_step(cfg: Config, start: Start, backend: Backend, steps: int) -> Start:
    path = cast(Path, start.path)  # a verified candidate
    trainer = json.loads((path / "trainer.json").read_text())
    saved_cfg = yaml.safe_load((path / "config.yaml").read_text())
    start.changes = check_compatible(
        saved_cfg,
        cfg,
        trainer["world_size"],
        backend.world_size,
        saved_step=trainer["step"],
        saved_steps=trainer.get("steps"),
        steps=steps,
    )
    if trainer["world_size"] != backend.world_size and not capabilities(cfg.backend.name).reshards_checkpoints:
        raise ConfigError(
            f"this {cfg.backend.name} checkpoint was written by {trainer['world_size']} ranks and "
            f"resumes only on {trainer['world_size']} (now {backend.world_size}); "
            f"{backends_with('reshards_checkpoints')} checkpoints reshard onto any world size"
        )
    if trainer["step"] > steps:
        raise ConfigError(f"train.steps={steps} is below the step of checkpoint {start.path} ({trainer['step']})")
    start.step = trainer["step"]
    start.completed = start.step >= steps
    return start


def _fresh(cfg: Config, earlier: outputs.EarlierRun, steps: int) -> Start:
    """Step 0, unless the output folder holds another run's results (then refused) or this very run, completed."""
    out = cfg.train.output_dir
    if earlier.summary is not None:
        saved = _saved_config(Path(out) / "config.yaml")
        world = earlier.summary.get("world_size", 1)
        same = saved is not None and not config_changes(
            saved, cfg, world, world, saved_steps=earlier.summary.get("steps"), steps=steps
        )
        if same and earlier.summary.get("steps") == steps:
            return Start(completed=True, step=steps)
        raise ConfigError(
            f"train.output_dir={out!r} holds a finished run ({outputs.SUMMARY}, {earlier.summary.get('steps')} "
            f"steps{'' if same else ', another config'}) and no checkpoint to continue it from: its outputs are "
            "kept. Choose another train.output_dir, or set train.overwrite=true to replace them (checkpoint.every "
            "lets a later run continue a finished one)"
        )
    if earlier.metrics_records:
        raise ConfigError(
            f"train.output_dir={out!r} holds the metrics of an earlier run ({outputs.metrics_path(cfg)}) but no "
            "checkpoint to resume from: a fresh start would overwrite them. Choose another train.output_dir, or "
            "set train.overwrite=true to start afresh there"
        )
    return Start()


def _saved_config(path: Path) -> dict[str, Any] | None:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


# -- restoring ------------------------------------------------------------------------------------------------------


def restore(run: Run, start: Start) -> int:
    """Load `start`'s checkpoint into `run`, falling back to older ones if it fails to load; returns the step."""
    while start.path is not None:
        error = None
        try:
            _load(run, start.path)
        except ConfigError:
            raise
        except CHECKPOINT_FAILURES as exc:  # a file that does not unpickle, a shard that does not fit, ...
            error = exc
        failures = [e for e in all_gather_objects(None if error is None else f"{type(error).__name__}: {error}") if e]
        if not failures:
            if run.backend.is_main:
                log.info("resumed from %s at step %d (layers %s)", start.path, start.step, list(run.active))
            return start.step
        reason = _load_failure(failures[0])
        if run.backend.is_main:
            log.warning("checkpoint %s does not load (%s); trying the one before it", start.path, reason)
        if not start.older:
            raise _unloadable(start, reason)
        start = _first_verified(run.cfg, run.backend, Start(path=start.older[0], older=start.older[1:]), run.steps)
    return 0


def _load_failure(text: str, limit: int = 600) -> str:
    """A load error in one line, its detail kept (torch's "Error(s) in loading state_dict for X:" puts the missing and
    unexpected keys on the lines after the colon)."""
    joined = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return joined if len(joined) <= limit else joined[:limit] + " ..."


def _unloadable(start: Start, reason: str) -> ConfigError:
    """No checkpoint loads. They verified byte for byte, so they are good: what changed is this run's config (or a
    library), and the checkpoints stay. The model may hold part of what failed to load, so step 0 is no fallback."""
    changed = f"; checkpoint.override let these changes through: {'; '.join(start.changes)}" if start.changes else ""
    return ConfigError(
        f"checkpoint {start.path} does not load into this run's model ({reason}){changed}. The "
        "checkpoints verify and are kept as they are: resume with the config they were written with "
        f"({Path(str(start.path)) / 'config.yaml'}), or start this config in another train.output_dir"
    )


def _load(run: Run, path: Path) -> None:
    trainer = json.loads((path / "trainer.json").read_text())
    run.load_state_dict(trainer)
    if run.sampler is not None:
        # The layers active when the checkpoint was written, then their state; the schedule goes on from there.
        run.backend.activate(run.active)
    run.backend.load_state(path / "state")
    rng = path / "rng" / f"rank{run.backend.rank}.pt"
    if rng.is_file() and trainer["world_size"] == run.backend.world_size:
        set_rng_state(torch.load(rng, weights_only=False))
