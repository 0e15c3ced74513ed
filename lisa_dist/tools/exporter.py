"""`lisa-dist export CHECKPOINT OUT_DIR`: a Hugging Face folder from any backend's checkpoint, a shard at a time.

The model is built as a skeleton (no weights) and `save_hf_folder` asks the checkpoint for one module's tensors at a
time (`lisa_dist.tools.readers`): local checkpoints are mapped and copied from tensor by tensor, FSDP ones read
through torch.distributed.checkpoint without a process group, DeepSpeed ones through zero_to_fp32 (lazy mode). The
process holds about one output shard (`--max-shard-size`), written in `--dtype` (default: the dtype the source model
is published in). `load_checkpoint` gives the same model whole in memory, without writing (`lisa-dist generate`).
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import PreTrainedTokenizerBase

from lisa_dist.config import Config, capabilities, from_dict, parse_size
from lisa_dist.data import use_chat_template
from lisa_dist.errors import ConfigError
from lisa_dist.method import apply_lora
from lisa_dist.models import (
    Fetch,
    FolderSpec,
    allocate,
    export_dtype,
    generation_config,
    human_bytes,
    open_model,
    require_complete,
    save_hf_folder,
    saved_names,
    source_dtype,
)
from lisa_dist.run import checkpoint, outputs
from lisa_dist.tools.readers import CheckpointReader, DcpReader, DeepSpeedReader, LocalReader, LoraMerge

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
    for skipped in problems:
        log.warning(
            "not exporting %s, the newer checkpoint: %s; exporting %s instead",
            skipped.checkpoint,
            skipped.reason,
            found.name,
        )
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
            raise ConfigError(
                f"export: the output folder {out} {_relation(out, source)} {source}, what is exported: "
                "writing there would change or replace the checkpoint it reads. Choose a folder outside "
                "the run"
            )
    # A step folder, a checkpoints folder or a run folder (checkpoints/step-N), as the trainer lays them out.
    found = [
        p.parent
        for pattern in ("trainer.json", "*/trainer.json", "*/*/trainer.json")
        for p in (out.glob(pattern) if out.is_dir() else ())
        if p.parent.name.startswith("step-")
    ]
    if found:
        raise ConfigError(
            f"export: {out} holds the training checkpoint {found[0]}: --overwrite replaces an earlier "
            "export, never a run's checkpoints. Choose another folder"
        )
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"export: {out} is not empty: writing into it would mix the export with its files "
                "(a stale model.safetensors.index.json changes how the folder loads). Choose an empty "
                "folder, or pass --overwrite to replace it whole"
            )
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
        raise ConfigError(
            f"export: the output folder {out} {_relation(out, base)} {base}, the model the checkpoint "
            "was trained from (its config and tokenizer are read from there): choose another folder"
        )


def _reader(backend: str, state: Path) -> CheckpointReader:
    """The reader of a `backend` checkpoint's model state, by the format the backend declares it writes."""
    fmt = capabilities(backend).checkpoint_format
    if fmt == "torch":
        return LocalReader(state / "model.pt")
    if fmt == "dcp":
        return DcpReader(state)
    if fmt == "deepspeed":
        return DeepSpeedReader(state)
    raise ConfigError(f"cannot export a checkpoint of backend {backend!r} (its format {fmt!r} has no reader)")


def _open(ckpt: Path) -> tuple[Config, nn.Module, PreTrainedTokenizerBase, Fetch]:
    """The run's config, its model as a skeleton (LoRA merged: the base model's names), its tokenizer, and the
    fetch that reads the checkpoint's tensors under the skeleton's names."""
    cfg = from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()), source=str(ckpt / "config.yaml"))
    model, tokenizer, _ = open_model(cfg.model, seed=cfg.train.seed)
    use_chat_template(tokenizer, cfg.data.chat_template)  # the template the run trained with
    reader = _reader(cfg.backend.name, ckpt / "state")
    if cfg.lora.enabled:
        with torch.device("meta"):  # peft builds the adapters beside the base weights: nothing is allocated
            adapted, _ = apply_lora(copy.deepcopy(model), cfg.lora)  # peft wraps in place: the plan keeps the base
        fetch: Fetch = LoraMerge(reader, adapted)
    else:
        fetch = reader
    wanted = saved_names(model)
    missing = [
        name
        for name in (fetch.source_names(wanted) if isinstance(fetch, LoraMerge) else wanted)
        if name not in reader.names()
    ]
    if missing:
        raise ConfigError(
            f"checkpoint {ckpt} does not match its model: it lacks {len(missing)} tensor(s), e.g. "
            f"{', '.join(missing[:3])}"
        )
    return cfg, model, tokenizer, fetch


def load_checkpoint(source: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model (on the CPU, LoRA merged) and tokenizer of checkpoint `source`, as `export` would write them."""
    _, model, tokenizer, fetch = _open(resolve(source))
    allocate(model, "cpu")
    result = model.load_state_dict(fetch(saved_names(model)), strict=False)
    require_complete(model, result.missing_keys, f"checkpoint {source}")
    return model, tokenizer


def export(
    source: Path, out: Path, overwrite: bool = False, dtype: str | None = None, max_shard_size: str | int | None = None
) -> Path:
    """Write `out` (safetensors shards of at most `max_shard_size`, default the run's checkpoint.max_shard_size, in
    `dtype`, default the source model's; config; tokenizer) from checkpoint `source`, one shard at a time; returns
    the checkpoint used.

    A non-empty `out` is refused unless `overwrite`: then the export is written beside it and replaces it whole."""
    wanted = export_dtype(dtype, "--dtype") if dtype else None
    max_bytes = parse_size(max_shard_size, "--max-shard-size") if max_shard_size is not None else None
    ckpt = resolve(source)
    _refuse_base_model(out, ckpt)
    target = _prepare_out(out, overwrite, (source, ckpt))
    cfg, model, tokenizer, fetch = _open(ckpt)
    wanted = wanted or source_dtype(cfg.model)
    max_bytes = max_bytes or parse_size(cfg.checkpoint.max_shard_size, "checkpoint.max_shard_size")
    try:
        spec = FolderSpec(wanted, max_bytes, generation_config(cfg.model))
        plan = save_hf_folder(target, model, fetch, spec)
        tokenizer.save_pretrained(target)
        outputs.replace_dir(target, out)
    finally:
        if target != out and target.exists():
            shutil.rmtree(target, ignore_errors=True)
    log.info(
        "exported %s (%s backend) to %s: %s of %s in %d shard(s)",
        ckpt,
        cfg.backend.name,
        out,
        human_bytes(plan.total_size),
        str(wanted).removeprefix("torch."),
        len(plan.shards),
    )
    return ckpt
