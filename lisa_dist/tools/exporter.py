"""`lisa-dist export CHECKPOINT OUT_DIR`: a Hugging Face folder from any backend's checkpoint, in one process.

Only this process holds the model: local checkpoints are read directly, FSDP ones through torch.distributed.checkpoint
without a process group (resharded onto one full copy), DeepSpeed ones with DeepSpeed's zero_to_fp32 consolidation.
`load_checkpoint` gives the same model in memory, without writing a folder (`lisa-dist generate`).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from lisa_dist.config import from_dict
from lisa_dist.errors import ConfigError
from lisa_dist.method import apply_lora
from lisa_dist.models import allocate, open_model, require_complete
from lisa_dist.run import checkpoint

log = logging.getLogger(__name__)


def resolve(path: Path) -> Path:
    """A step-N folder as given, or the newest good one under a checkpoints folder (every byte hashed; a newer
    broken one is named, with what is wrong with it)."""
    if (path / "trainer.json").is_file():
        problem = checkpoint.verify(path)
        if problem:
            raise ConfigError(f"checkpoint {path} is unusable: {problem}")
        return path
    if not path.is_dir():
        raise ConfigError(f"{path} holds no usable checkpoint (no such folder)")
    found, problems = checkpoint.find_resumable(path)
    if found is None:
        detail = "; ".join(f"{p.checkpoint.name}: {p.reason}" for p in problems) or "no step-N folder"
        raise ConfigError(f"{path} holds no usable checkpoint ({detail})")
    for problem in problems:
        log.warning("not exporting %s, the newer checkpoint: %s; exporting %s instead", problem.checkpoint,
                    problem.reason, found.name)
    return found


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """Where to write: `out` itself when new or empty, else (with `overwrite`) a folder beside it that replaces it
    once complete, so that no file of what was there survives to change how the folder loads."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"export: {out} is not empty: writing into it would mix the export with its files "
                              "(a stale model.safetensors.index.json changes how the folder loads). Choose an empty "
                              "folder, or pass --overwrite to replace it whole")
        tmp = out.with_name(f".{out.name}.export-{checkpoint.new_token()}")
        return tmp
    return out


def _replace(tmp: Path, out: Path) -> None:
    if tmp == out:
        return
    old = out.with_name(f".{out.name}.replaced-{checkpoint.new_token()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)


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

        from lisa_dist.backends import DS_TAG

        return get_fp32_state_dict_from_zero_checkpoint(str(state), tag=DS_TAG)
    raise ConfigError(f"cannot export a checkpoint of backend {backend!r}")


def _load(ckpt: Path) -> tuple[nn.Module, PreTrainedTokenizerBase, str]:
    """The model of checkpoint folder `ckpt` on the CPU (LoRA merged), its tokenizer and the backend that saved it."""
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
    return model, tokenizer, cfg.backend.name


def load_checkpoint(source: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model (on the CPU, LoRA merged) and tokenizer of checkpoint `source`, as `export` would write them."""
    model, tokenizer, _ = _load(resolve(source))
    return model, tokenizer


def export(source: Path, out: Path, overwrite: bool = False) -> Path:
    """Write `out` (safetensors, config, tokenizer) from checkpoint `source`; returns the checkpoint used.

    A non-empty `out` is refused unless `overwrite`: then the export is written beside it and replaces it whole."""
    ckpt = resolve(source)
    target = _prepare_out(out, overwrite)
    model, tokenizer, backend = _load(ckpt)
    try:
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        _replace(target, out)
    finally:
        if target != out and target.exists():
            shutil.rmtree(target, ignore_errors=True)
    log.info("exported %s (%s backend) to %s", ckpt, backend, out)
    return ckpt
