"""A Hugging Face model folder written one shard at a time, in the dtype asked for, from tensors fetched as it goes.

`save_hf_folder` plans the shards from the model's shapes alone (a skeleton on the meta device, a live model, FSDP2's
DTensors or ZeRO-3's partitioned params alike), then asks `fetch` for one module's tensors at a time, casts them and
writes each shard as soon as it is full: the writer holds one shard of tensors at most, never the model. The rest is
what `save_pretrained` does: tied weights written once, transformers' weight conversions reverted (MoE experts back
to the hub's per-expert layout), `config.json` with the dtype and the architecture, the generation config, and
`model.safetensors.index.json` when there is more than one shard.

Private transformers API, checked with transformers 5.25 (`tests/unit/test_export.py` breaks when it changes):
`core_model_loading.revert_weight_conversion` and `modeling_utils.remove_tied_weights_from_state_dict`, the two
steps of `save_pretrained` that decide which names a checkpoint holds.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from lisa_dist import config
from lisa_dist.errors import ConfigError

Fetch = Callable[[list[str]], dict[str, torch.Tensor]]
"""Names of the model's state dict -> those tensors (any device, the model's dtype); called on every rank of a
collective save, in the same order."""
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
EXPORT_DTYPES = {name: getattr(torch, name) for name in config.EXPORT_DTYPES}


@dataclass(frozen=True)
class Group:
    """One module's tensors, fetched, cast and converted together (a conversion may need all of them)."""

    sources: tuple[str, ...]
    """Their names in the model's state dict."""
    names: tuple[str, ...]
    """Their names in the folder, after transformers' conversions are reverted."""
    nbytes: int
    """Their bytes in the folder's dtype."""


@dataclass
class ShardPlan:
    shards: list[list[Group]] = field(default_factory=list)
    total_size: int = 0
    total_parameters: int = 0

    def files(self) -> list[str]:
        n = len(self.shards)
        return [WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def weight_map(self) -> dict[str, str]:
        return {
            name: file
            for file, shard in zip(self.files(), self.shards, strict=True)
            for group in shard
            for name in group.names
        }


def is_adapter_model(model: nn.Module) -> bool:
    """A peft model: its folder holds the adapters alone (peft's save_pretrained), not a shard plan of the model."""
    return hasattr(model, "peft_config")


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def export_dtype(name: str, field_name: str = "dtype") -> torch.dtype:
    if name not in EXPORT_DTYPES:
        raise ConfigError(f"{field_name}={name!r}: allowed values are {', '.join(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[name]


def plan_shards(model: nn.Module, dtype: torch.dtype, max_shard_bytes: int) -> ShardPlan:
    """The folder's shards, filled in state-dict order, a module at a time (a module larger than `max_shard_bytes`
    gets a shard of its own, as in `save_pretrained`)."""
    plan = ShardPlan(shards=[[]], total_parameters=_num_parameters(model))
    size = 0
    for sources in _module_groups(_meta_state(model)):
        converted = _revert(
            model, {name: torch.empty(shape, dtype=dt, device="meta") for name, (shape, dt) in sources.items()}
        )
        nbytes = sum(t.numel() * _out_dtype(t, dtype).itemsize for t in converted.values())
        group = Group(tuple(sources), tuple(converted), nbytes)
        if plan.shards[-1] and size + nbytes > max_shard_bytes:
            plan.shards.append([])
            size = 0
        plan.shards[-1].append(group)
        size += nbytes
        plan.total_size += nbytes
    return plan


@dataclass(frozen=True)
class FolderSpec:
    """How a Hugging Face folder is written: checkpoint.export_dtype and checkpoint.max_shard_size, or export's
    --dtype and --max-shard-size."""

    dtype: torch.dtype
    max_shard_bytes: int
    generation_config: Any = None
    """The model's published generation config (eos ids, sampling defaults); None: the one the model has."""
    progress: bool = True
    """A tqdm bar over the bytes written."""


def save_hf_folder(folder: Path, model: nn.Module, fetch: Fetch, spec: FolderSpec, write: bool = True) -> ShardPlan:
    """Write `model`'s weights (from `fetch`), config and generation config into `folder` as `spec.dtype`
    safetensors of at most `spec.max_shard_bytes` each. With `write` False (a collective save's other ranks) only
    `fetch` is called, in the same order. A failed write stops the writing, not the fetching, so that ranks fetching
    collectively all reach the end; the error is raised then."""
    plan = plan_shards(model, spec.dtype, spec.max_shard_bytes)
    error = _attempt(partial(_write_config, folder, model, spec)) if write else None
    bar = tqdm(
        total=plan.total_size, unit="B", unit_scale=True, desc="writing shards", disable=not (write and spec.progress)
    )
    for file, shard in zip(plan.files(), plan.shards, strict=True):
        tensors: dict[str, torch.Tensor] = {}
        for group in shard:
            fetched = fetch(list(group.sources))
            if write:
                tensors.update(_revert(model, {name: _cast(fetched.pop(name), spec.dtype) for name in group.sources}))
            del fetched
        if write and error is None:
            error = _attempt(partial(save_file, tensors, str(folder / file), metadata={"format": "pt"}))
        bar.update(sum(group.nbytes for group in shard))
        del tensors
    bar.close()
    if write and error is None and len(plan.shards) > 1:
        index = {
            "metadata": {"total_parameters": plan.total_parameters, "total_size": plan.total_size},
            "weight_map": plan.weight_map(),
        }
        error = _attempt(partial((folder / INDEX).write_text, json.dumps(index, indent=2, sort_keys=True) + "\n"))
    if error is not None:
        raise error
    return plan


def _attempt(action: Callable[[], object]) -> Exception | None:
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - raised by the caller once every fetch is done
        return exc
    return None


def _write_config(folder: Path, model: Any, spec: FolderSpec) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.dtype = str(spec.dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    config.save_pretrained(folder)
    generation = spec.generation_config or (model.generation_config if model.can_generate() else None)
    if generation is not None:
        generation.save_pretrained(folder)


def _meta_state(model: nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """The state dict's names, shapes and dtypes, tied weights once (the name transformers keeps) and the keys it
    never saves left out."""
    meta = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        shape = getattr(tensor, "ds_shape", None) or tensor.shape  # a ZeRO-3 param keeps its real shape there
        meta[name] = torch.empty(shape, dtype=tensor.dtype, device="meta")
    for pattern in getattr(model, "_keys_to_ignore_on_save", None) or ():
        meta.pop(pattern, None)
    kept = remove_tied_weights_from_state_dict(meta, model)  # type: ignore[arg-type]  # any PreTrainedModel
    return {name: (t.shape, t.dtype) for name, t in kept.items()}


def saved_names(model: nn.Module) -> list[str]:
    """The names of `model`'s state dict a folder holds (before conversions): a tied weight once."""
    return list(_meta_state(model))


def _module_groups(state: dict[str, tuple[torch.Size, torch.dtype]]) -> list[dict[str, tuple]]:
    """Consecutive names of one module, together."""
    groups: list[dict[str, tuple]] = []
    owner = None
    for name, spec in state.items():
        module = name.rsplit(".", 1)[0]
        if module != owner or not groups:
            groups.append({})
            owner = module
        groups[-1][name] = spec
    return groups


def _revert(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not hasattr(model, "config"):
        return tensors
    return revert_weight_conversion(model, tensors)  # type: ignore[arg-type]  # any PreTrainedModel


def _out_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if tensor.is_floating_point() else tensor.dtype


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """In the folder's dtype on the CPU, contiguous and owning its storage (safetensors refuses tensors that share
    memory): a copy only where the cast or the move made none and the tensor is a view of something larger."""
    out = tensor.detach().to(device="cpu", dtype=_out_dtype(tensor, dtype))
    if not out.is_contiguous() or out.untyped_storage().nbytes() != out.numel() * out.itemsize:
        out = out.clone(memory_format=torch.contiguous_format)
    return out


def _num_parameters(model: nn.Module) -> int:
    return sum(math.prod(getattr(p, "ds_shape", None) or p.shape) for p in model.parameters())
