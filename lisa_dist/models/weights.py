"""Where a model's weights come from, and how they get into a model built on the meta device.

The trainer builds every model as a skeleton (parameters on the meta device, buffers real) and lets the backend
materialize it: the local backend loads the full state dict; FSDP shards first, then either reads only its own rows
of each tensor from safetensors files (no rank ever holds the whole model) or, for sources that need transformers'
own loading (GGUF, renamed checkpoint keys, hub ids, random presets), lets rank 0 load and broadcast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from torch import nn


class WeightSource(Protocol):
    description: str

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the model, in CPU memory (called on one rank only when sharding)."""


class FullWeights:
    """Weights that only a whole-model load can produce: a preset's random init, or `from_pretrained`."""

    def __init__(self, description: str, load: Callable[[], nn.Module]) -> None:
        self.description = description
        self._load = load

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self._load().state_dict()


class SafetensorsWeights:
    """A Hugging Face folder of `.safetensors` files whose tensor names match the model's state dict."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.description = f"safetensors in {self.folder}"
        self.files = safetensors_index(self.folder)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for file in sorted(set(self.files.values())):
            with open_safetensors(self.folder / file) as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        return shapes

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0 of tensor `name`, read without loading the rest of the file."""
        with open_safetensors(self.folder / self.files[name]) as f:
            sliced = f.get_slice(name)
            if not sliced.get_shape():
                return f.get_tensor(name)
            return sliced[start:stop]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for file in sorted(set(self.files.values())):
            with open_safetensors(self.folder / file) as f:
                state.update({name: f.get_tensor(name) for name in f.keys()})
        return state


def safetensors_index(folder: Path) -> dict[str, str]:
    """Tensor name -> file, from `model.safetensors.index.json` or the single `model.safetensors`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    with open_safetensors(single) as f:
        return dict.fromkeys(f.keys(), single.name)


def open_safetensors(path: Path):
    """`safe_open` of `path`, with a ConfigError naming the file when it is truncated or not safetensors."""
    from lisa_dist.errors import ConfigError

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
        raise ConfigError(
            f"{path} is not a readable safetensors file (truncated, still being copied, or corrupted: {exc})"
        ) from None


def matches_model(source: SafetensorsWeights, model: nn.Module) -> bool:
    """True when every tensor of `model`'s state dict is in the files under its own name and shape (tied weights
    may appear once); checkpoints that transformers renames or fuses on load do not match."""
    shapes = source.shapes()
    seen: dict[int, bool] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        ok = shapes.get(name) == tuple(tensor.shape)
        seen[id(tensor)] = seen.get(id(tensor), False) or ok
    return bool(seen) and all(seen.values())


def allocate(model: nn.Module, device: torch.device | str) -> None:
    """Give a skeleton (or sharded skeleton) real, uninitialized parameter storage on `device`, keeping the buffers
    it was built with (rotary frequencies, ...) and its tied parameters, which `to_empty` alone would wipe and
    untie."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    shared = shared_parameters(model)
    model.to_empty(device=device)
    # to_empty gives each module its own new parameter: hand the first owner's to the others again (FSDP2 keeps
    # the first owner's, so the shard it manages stays the one every name refers to).
    for owners in shared:
        first_module, first_name = owners[0]
        for module, name in owners[1:]:
            module._parameters[name] = first_module._parameters[first_name]
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(saved[name].to(buffer.device, buffer.dtype))


def shared_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """The (module, attribute) owners of each parameter that more than one module holds (tied weights), the first
    owner in `named_modules` order first."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, name))
    return [found for found in owners.values() if len(found) > 1]


def materialize_full(model: nn.Module, source: WeightSource, device: torch.device) -> nn.Module:
    """Allocate a skeleton on `device` and load the whole state dict into it (the single-process path)."""
    allocate(model, device)
    result = model.load_state_dict(source.full_state_dict(), strict=False)
    require_complete(model, result.missing_keys, source.description)
    return model


def require_complete(model: nn.Module, missing: list[str], source: str) -> None:
    # A tied weight may be stored once under either name; anything else missing is an error.
    state = model.state_dict(keep_vars=True)
    loaded = {id(t) for name, t in state.items() if name not in missing}
    absent = [name for name in missing if id(state[name]) not in loaded]
    if absent:
        raise ValueError(
            f"{source} has no weights for {len(absent)} tensors of the model, e.g. {', '.join(absent[:5])}"
        )


def load_rows_into(model: nn.Module, source: SafetensorsWeights) -> None:
    """Fill an already sharded and allocated model from safetensors, each rank reading only the rows it holds.

    Works for any DTensor placement sharding dim 0 (FSDP2's Shard(0), HSDP's (Replicate, Shard(0))); plain tensors
    (persistent buffers) are read whole.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    loaded: set[int] = set()
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in loaded:
                continue  # a tied weight, already read under its first name
            if isinstance(tensor, DTensor):
                shape, offset = compute_local_shape_and_global_offset(
                    tensor.shape, tensor.device_mesh, tensor.placements
                )
                local = tensor.to_local()
                if shape and shape[0]:
                    start = offset[0] if offset else 0
                    local.copy_(source.read_rows(name, start, start + shape[0]).to(local.dtype))
            else:
                full = source.read_rows(name, 0, tensor.shape[0] if tensor.dim() else 0)
                tensor.copy_(full.to(tensor.dtype))
            loaded.add(id(tensor))


def share_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the names of one tied parameter pointing at one tensor again (a gathered or copied state dict
    holds a copy per name), so that `save_pretrained` writes the tied weight once."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    shared = dict(state)
    for group in names.values():
        present = [n for n in group if n in shared]
        for name in present[1:]:
            shared[name] = shared[present[0]]
    return shared
