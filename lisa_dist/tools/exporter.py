"""`lisa-dist export CHECKPOINT OUT_DIR`: a Hugging Face folder from any backend's checkpoint, in one process.

Only this process holds the model: local checkpoints are read directly, FSDP ones through torch.distributed.checkpoint
without a process group (resharded onto one full copy), DeepSpeed ones with DeepSpeed's zero_to_fp32 consolidation.
`load_checkpoint` gives the same model in memory, without writing a folder (`lisa-dist generate`).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from lisa_dist.config import from_dict
from lisa_dist.data import use_chat_template
from lisa_dist.errors import ConfigError, first_line
from lisa_dist.method import apply_lora
from lisa_dist.models import allocate, open_model, require_complete
from lisa_dist.run import checkpoint, outputs

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


def _prepare_out(out: Path, overwrite: bool, sources: tuple[Path, ...]) -> Path:
    """Where to write: `out` itself when new or empty, else (with `overwrite`) a folder beside it that replaces it
    once complete, so that no file of what was there survives to change how the folder loads. Never a folder that
    is, holds or lies inside what is exported, nor one that holds a run's checkpoints: --overwrite replaces an
    earlier export, never the training it came from."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export: {out} is a file, not a folder")
    for source in sources:
        if outputs.overlap(out, source):
            raise ConfigError(f"export: the output folder {out} {_relation(out, source)} {source}, what is exported: "
                              "writing there would change or replace the checkpoint it reads. Choose a folder outside "
                              "the run")
    # A step folder, a checkpoints folder or a run folder (checkpoints/step-N), as the trainer lays them out.
    found = [p.parent for pattern in ("trainer.json", "*/trainer.json", "*/*/trainer.json")
             for p in (out.glob(pattern) if out.is_dir() else ()) if p.parent.name.startswith("step-")]
    if found:
        raise ConfigError(f"export: {out} holds the training checkpoint {found[0]}: --overwrite replaces an earlier "
                          "export, never a run's checkpoints. Choose another folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"export: {out} is not empty: writing into it would mix the export with its files "
                              "(a stale model.safetensors.index.json changes how the folder loads). Choose an empty "
                              "folder, or pass --overwrite to replace it whole")
        tmp = out.with_name(f".{out.name}.export-{checkpoint.new_token()}")
        return tmp
    return out


def _relation(out: Path, source: Path) -> str:
    out, source = out.resolve(), source.resolve()
    return "is" if out == source else ("holds" if out in source.parents else "lies inside")


def _refuse_base_model(out: Path, ckpt: Path) -> None:
    """The local model folder (or a .gguf file's folder) the checkpoint was trained from is read by the export (its
    config and tokenizer): `out` must not be it or hold it (a folder inside it is fine)."""
    try:
        name = yaml.safe_load((ckpt / "config.yaml").read_text())["model"]["name"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return
    base = Path(str(name)).expanduser()
    base = base.parent if base.suffix == ".gguf" else base
    if base.exists() and (out.resolve() == base.resolve() or out.resolve() in base.resolve().parents):
        raise ConfigError(f"export: the output folder {out} {_relation(out, base)} {base}, the model the checkpoint "
                          "was trained from (its config and tokenizer are read from there): choose another folder")


def _state_dict(backend: str, state: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    if backend == "local":
        return torch.load(state / "model.pt", map_location="cpu")
    if backend == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        wanted = {"model": {k: torch.empty_like(v) for k, v in model.state_dict().items()}}
        try:
            dcp.load(wanted, checkpoint_id=str(state), no_dist=True)
        except CheckpointException as exc:  # a BaseException: it would pass every `except Exception`
            raise ConfigError(f"checkpoint {state.parent} does not load into its model: {first_line(exc)}") from None
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
    use_chat_template(tokenizer, cfg.data.chat_template)  # the template the run trained with
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
    _refuse_base_model(out, ckpt)
    target = _prepare_out(out, overwrite, (source, ckpt))
    model, tokenizer, backend = _load(ckpt)
    try:
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        outputs.replace_dir(target, out)
    finally:
        if target != out and target.exists():
            shutil.rmtree(target, ignore_errors=True)
    log.info("exported %s (%s backend) to %s", ckpt, backend, out)
    return ckpt
