"""What a training run saves in a checkpoint and how it continues from one, exactly.

Saved: the backend's model and optimizer state (active + always-trained), the step, the sampler's period and active
layers, tokens seen, every rank's RNG states, the config and library versions. The data position and the learning
rate are pure functions of the step, so the step restores them.
"""
from __future__ import annotations

import json
import logging
import platform
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from lisa_dist import checkpoint
from lisa_dist.config import Config, ConfigError

if TYPE_CHECKING:
    from lisa_dist.trainer import Run

log = logging.getLogger(__name__)

# Changing any of these changes what the remaining steps compute: refused at resume unless checkpoint.override.
EXACTNESS_FIELDS = (
    "model.name", "model.preset_overrides", "model.layers_path", "model.dtype",
    "data.path", "data.format", "data.max_length", "data.text_field", "data.messages_field", "data.skip_bad_rows",
    "lisa.enabled", "lisa.gamma", "lisa.interval", "lisa.strategy", "lisa.weights", "lisa.fixed_layers", "lisa.seed",
    "lisa.importance_floor", "lisa.importance_decay",
    "lora.enabled", "lora.r", "lora.alpha", "lora.target_modules", "train.seed", "train.steps", "backend.name",
)


def root_of(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.train.output_dir) / "checkpoints")


def _shared_token() -> str:
    """Rank 0's temporary-folder token, on every rank."""
    box = [checkpoint.new_token()]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


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


def save(run: Run, steps_done: int) -> Path | None:
    """Collective: write checkpoint `step-<steps_done>`; returns its folder on the main rank."""
    cfg, backend = run.cfg, run.backend
    root = root_of(cfg)
    tmp = checkpoint.temp_dir(root, steps_done, _shared_token())
    if backend.is_main:
        (tmp / "rng").mkdir(parents=True)
    backend.barrier()
    backend.save_state(tmp / "state")
    torch.save(rng_state(), tmp / "rng" / f"rank{backend.rank}.pt")
    if backend.is_main:
        trainer = {"step": steps_done, "period": run.period, "active_layers": list(run.active),
                   "tokens_seen": run.tokens_seen, "switches": run.switches,
                   "layers_visited": sorted(run.layers_visited), "world_size": backend.world_size,
                   "epoch": run.batches.epoch_of(steps_done), "history": run.history[-1:],
                   "importance": run.importance.state_dict() if run.importance else None}
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (tmp / "versions.json").write_text(json.dumps(versions(), indent=1))
    backend.barrier()
    final = None
    if backend.is_main:
        final = checkpoint.finalize(tmp, root, steps_done, cfg.checkpoint.keep_last)
        log.info("saved checkpoint %s", final)
    backend.barrier()
    return final


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".")
    return cfg.get(section, {}).get(key)


def _global_batch(cfg: dict[str, Any], world: int) -> int:
    return cfg["train"]["micro_batch_size"] * cfg["train"]["grad_accum"] * world


def check_compatible(saved: dict[str, Any], cfg: Config, saved_world: int, world: int) -> list[str]:
    """The changes that would break exact resumption; raise unless checkpoint.override (then log them)."""
    now = cfg.to_dict()
    changes = [f"{f}: {_get(saved, f)!r} -> {_get(now, f)!r}"
               for f in EXACTNESS_FIELDS if _get(saved, f) != _get(now, f)]
    before, after = _global_batch(saved, saved_world), _global_batch(now, world)
    if before != after:
        changes.append(f"global batch (train.micro_batch_size x train.grad_accum x world size): {before} -> {after}")
    if changes and not cfg.checkpoint.override:
        raise ConfigError("the checkpoint was written with another config; resuming would not continue the same run: "
                          + "; ".join(changes) + " (set checkpoint.override=true to resume anyway)")
    for change in changes:
        log.warning("resuming with a changed config (checkpoint.override): %s", change)
    return changes


def choose(run: Run) -> Path | None:
    """The checkpoint to resume from (main rank verifies, every rank gets its answer), or None."""
    cfg = run.cfg
    explicit = None if cfg.checkpoint.resume in ("auto", "none") else Path(cfg.checkpoint.resume)
    box: list[Any] = [None]
    if run.backend.is_main:
        path, problems = checkpoint.find_resumable(root_of(cfg), explicit)
        for problem in problems:
            log.warning("checkpoint %s is unusable: %s; trying the one before it", problem.checkpoint, problem.reason)
        box = [(str(path) if path else None, [f"{p.checkpoint}: {p.reason}" for p in problems])]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    path, problems = box[0]
    if explicit is not None and path is None:
        raise ConfigError(f"checkpoint.resume={cfg.checkpoint.resume!r} is not a usable checkpoint: {problems[0]}")
    return Path(path) if path else None


def resume(run: Run) -> int:
    """Continue from the newest good checkpoint (if any, and unless checkpoint.resume=none); returns the next step."""
    if run.cfg.checkpoint.resume == "none":
        return 0
    path = choose(run)
    if path is None:
        return 0
    trainer = json.loads((path / "trainer.json").read_text())
    saved_cfg = yaml.safe_load((path / "config.yaml").read_text())
    check_compatible(saved_cfg, run.cfg, trainer["world_size"], run.backend.world_size)
    if trainer["world_size"] != run.backend.world_size and run.cfg.backend.name == "deepspeed":
        raise ConfigError(f"this DeepSpeed checkpoint was written by {trainer['world_size']} ranks and resumes only "
                          f"on {trainer['world_size']} (now {run.backend.world_size}); FSDP and local checkpoints "
                          "reshard onto any world size")
    step = trainer["step"]
    if run.sampler is not None:
        # The layers active when the checkpoint was written, then their state; the schedule goes on from there.
        run.period, run.active = trainer["period"], tuple(trainer["active_layers"])
        run.backend.activate(run.active)
        if run.importance is not None and trainer.get("importance"):
            run.importance.load_state_dict(trainer["importance"])
    run.backend.load_state(path / "state")
    rng = path / "rng" / f"rank{run.backend.rank}.pt"
    if rng.is_file() and trainer["world_size"] == run.backend.world_size:
        set_rng_state(torch.load(rng, weights_only=False))
    run.tokens_seen, run.switches = trainer["tokens_seen"], trainer["switches"]
    run.layers_visited = set(trainer["layers_visited"])
    if run.backend.is_main:
        log.info("resumed from %s at step %d (layers %s)", path, step, list(run.active))
    return step
