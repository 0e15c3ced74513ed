"""DeepSpeed JSON configs with lisa_dist's settings as the one source of truth.

Fields set to "auto" are filled from the lisa_dist config (as Hugging Face's integration does); a value written in
the JSON that contradicts lisa_dist's is an error naming both. lisa_dist builds the optimizer and the learning-rate
schedule itself, so a JSON `optimizer` or `scheduler` section is refused.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from lisa_dist.errors import ConfigError

STAGES = (1, 2, 3)


def read_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"backend.ds_config={str(path)!r} does not exist (shipped configs are in ds_configs/)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"backend.ds_config={str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"backend.ds_config={str(path)!r} must hold a JSON object")
    return raw


def fill_ds_config(
    raw: dict[str, Any],
    *,
    micro_batch_size: int,
    grad_accum: int,
    max_grad_norm: float,
    precision: str,
    world_size: int | None,
    source: str = "ds_config",
) -> dict[str, Any]:
    """A copy of `raw` with every "auto" filled and every explicit value checked against lisa_dist's.

    `world_size` None (not known yet) leaves `train_batch_size` unchecked.
    """
    cfg = copy.deepcopy(raw)
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ConfigError(
                f"{source}: remove the '{section}' section: lisa_dist builds the optimizer and the "
                "schedule from its optim.* settings"
            )
    if cfg.get("fp16", {}).get("enabled") not in (None, False):
        raise ConfigError(f"{source}: fp16.enabled is not supported: use train.precision=bf16")
    stage = cfg.get("zero_optimization", {}).get("stage")
    if stage not in STAGES:
        raise ConfigError(f"{source}: zero_optimization.stage={stage!r} is not allowed: expected one of 1, 2, 3")
    pairs = [
        ("train_micro_batch_size_per_gpu", micro_batch_size, "train.micro_batch_size"),
        ("gradient_accumulation_steps", grad_accum, "train.grad_accum"),
        ("gradient_clipping", max_grad_norm, "optim.max_grad_norm"),
    ]
    if world_size is not None:
        pairs.append(
            (
                "train_batch_size",
                micro_batch_size * grad_accum * world_size,
                f"train.micro_batch_size x train.grad_accum x world size "
                f"({micro_batch_size} x {grad_accum} x {world_size})",
            )
        )
    for key, ours, field in pairs:
        _fill(cfg, key, ours, field, source)
    bf16 = cfg.setdefault("bf16", {})
    _fill(bf16, "enabled", precision == "bf16", "(train.precision == bf16)", f"{source}: bf16")
    cfg["zero_allow_untested_optimizer"] = True  # the client optimizer is torch's AdamW
    return cfg


def _fill(section: dict[str, Any], key: str, ours: Any, field: str, source: str) -> None:
    theirs = section.get(key, "auto")
    if theirs == "auto":
        section[key] = ours
    elif theirs != ours:
        raise ConfigError(
            f'{source}: {key}={theirs!r} contradicts {field}={ours!r}; set it to "auto" or make them agree'
        )


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg["zero_optimization"]["stage"])
