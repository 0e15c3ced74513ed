"""`lisa-dist export CHECKPOINT OUT_DIR`: a Hugging Face folder from any backend's checkpoint, in one process.

Only this process holds the model: local checkpoints are read directly, FSDP ones through torch.distributed.checkpoint
without a process group (resharded onto one full copy), DeepSpeed ones with DeepSpeed's zero_to_fp32 consolidation.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml
from torch import nn

from lisa_dist import checkpoint
from lisa_dist.config import ConfigError, from_dict
from lisa_dist.methods import apply_lora
from lisa_dist.models import open_model
from lisa_dist.models.weights import allocate, require_complete

log = logging.getLogger(__name__)


def resolve(path: Path) -> Path:
    """A step-N folder as given, or the newest good one under a checkpoints folder."""
    if (path / "trainer.json").is_file():
        problem = checkpoint.verify(path)
        if problem:
            raise ConfigError(f"checkpoint {path} is unusable: {problem}")
        return path
    found, problems = checkpoint.find_resumable(path)
    if found is None:
        detail = "; ".join(f"{p.checkpoint.name}: {p.reason}" for p in problems) or "no step-N folder"
        raise ConfigError(f"{path} holds no usable checkpoint ({detail})")
    return found


def _state_dict(backend: str, state: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    if backend == "local":
        return torch.load(state / "model.pt", map_location="cpu")
    if backend == "fsdp":
        import torch.distributed.checkpoint as dcp

        wanted = {"model": {k: torch.empty_like(v) for k, v in model.state_dict().items()}}
        dcp.load(wanted, checkpoint_id=str(state), no_dist=True)
        return wanted["model"]
    if backend == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from lisa_dist.backends.deepspeed import DS_TAG

        return get_fp32_state_dict_from_zero_checkpoint(str(state), tag=DS_TAG)
    raise ConfigError(f"cannot export a checkpoint of backend {backend!r}")


def export(source: Path, out: Path) -> Path:
    """Write `out` (safetensors, config, tokenizer) from checkpoint `source`; returns the checkpoint used."""
    ckpt = resolve(source)
    cfg = from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()), source=str(ckpt / "config.yaml"))
    model, tokenizer, _ = open_model(cfg.model, seed=cfg.train.seed)
    allocate(model, "cpu")
    if cfg.lora.enabled:
        model, _ = apply_lora(model, cfg.lora)
    state = _state_dict(cfg.backend.name, ckpt / "state", model)
    result = model.load_state_dict(state, strict=False)
    require_complete(model, result.missing_keys, f"checkpoint {ckpt}")
    if cfg.lora.enabled:
        model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("exported %s (%s backend) to %s", ckpt, cfg.backend.name, out)
    return ckpt
