"""A checkpoint's model tensors, read a few at a time: what `lisa-dist export` streams into its shards.

Each reader is called with some names of the model's state dict and returns those tensors alone, so that the
exporter holds one shard at a time: a local checkpoint's `model.pt` is mapped (not read) at each call and only the
named tensors are copied out; an FSDP checkpoint's named tensors are read from torch.distributed.checkpoint's files,
resharded onto one process. A DeepSpeed checkpoint goes through DeepSpeed's zero_to_fp32, which holds its fp32
partitions whole (lazy mode: each tensor is assembled when it is asked for). `LoraMerge` gives a LoRA run's
tensors under the base model's names, each adapted module merged by peft.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lisa_dist.errors import ConfigError, first_line

LORA_PREFIX = "base_model.model."


class CheckpointReader(Protocol):
    def names(self) -> set[str]:
        """Every tensor name the checkpoint holds."""

    def __call__(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Those tensors, on the CPU, each its own copy."""


class LocalReader:
    """The local backend's `model.pt`, memory-mapped anew at each call so that no page of it stays mapped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._names: set[str] | None = None

    def _map(self) -> dict[str, torch.Tensor]:
        return torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)

    def names(self) -> set[str]:
        if self._names is None:
            self._names = set(self._map())
        return self._names

    def __call__(self, names: list[str]) -> dict[str, torch.Tensor]:
        state = self._map()
        return {name: state[name].clone() for name in names}


class DcpReader:
    """An FSDP checkpoint (torch.distributed.checkpoint), read without a process group, a few tensors per call."""

    def __init__(self, folder: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = folder
        try:
            metadata = FileSystemReader(str(folder)).read_metadata()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"checkpoint {folder.parent}: cannot read its DCP metadata: {first_line(exc)}") from None
        self.specs = {
            key.removeprefix("model."): spec
            for key, spec in metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(spec, TensorStorageMetadata)
        }

    def names(self) -> set[str]:
        return set(self.specs)

    def __call__(self, names: list[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        wanted = {
            "model": {
                name: torch.empty(self.specs[name].size, dtype=self.specs[name].properties.dtype) for name in names
            }
        }
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
                dcp.load(wanted, checkpoint_id=str(self.folder), no_dist=True)
        except CheckpointException as exc:  # a BaseException: it would pass every `except Exception`
            raise ConfigError(f"checkpoint {self.folder.parent} does not load: {first_line(exc)}") from None
        return wanted["model"]


class DeepSpeedReader:
    """A DeepSpeed checkpoint, consolidated by zero_to_fp32 in lazy mode (its fp32 partitions loaded once)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._state: dict | None = None

    def _load(self) -> dict:
        if self._state is None:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            from lisa_dist.backends import DS_TAG

            self._state = get_fp32_state_dict_from_zero_checkpoint(str(self.folder), tag=DS_TAG, lazy_mode=True)
        return self._state

    def names(self) -> set[str]:
        return set(self._load())

    def __call__(self, names: list[str]) -> dict[str, torch.Tensor]:
        state = self._load()
        return {name: state[name].contiguous() for name in names}


class LoraMerge:
    """A LoRA run's checkpoint read under the base model's names: an adapted module's weight comes out merged
    (peft's own merge, on that module alone, materialized for the call), every other tensor as saved."""

    def __init__(self, read: CheckpointReader, adapted: nn.Module) -> None:
        from peft.tuners.lora import LoraLayer

        self.read = read
        self.layers: dict[str, Any] = {
            name.removeprefix(LORA_PREFIX): module
            for name, module in adapted.named_modules()
            if isinstance(module, LoraLayer)
        }

    def source_names(self, names: list[str]) -> list[str]:
        """The checkpoint's names behind the base model's `names`."""
        sources: dict[str, None] = {}
        for name in names:
            owner = name.rsplit(".", 1)[0]
            layer = self.layers.get(owner)
            keys = [f"{owner}.{key}" for key in layer.state_dict()] if layer is not None else [name]
            sources.update(dict.fromkeys(f"{LORA_PREFIX}{key}" for key in keys))
        return list(sources)

    def names(self) -> set[str]:
        return self.read.names()

    def __call__(self, names: list[str]) -> dict[str, torch.Tensor]:
        tensors = self.read(self.source_names(names))
        merged: dict[str, Any] = {}
        out = {}
        for name in names:
            owner, leaf = name.rsplit(".", 1)
            layer = self.layers.get(owner)
            if layer is None:
                out[name] = tensors[f"{LORA_PREFIX}{name}"]
                continue
            if owner not in merged:
                merged[owner] = self._merge(owner, layer, tensors)
            out[name] = getattr(layer.get_base_layer(), leaf).detach().clone()
        for layer in merged.values():
            layer.merged_adapters.clear()  # back to an unmerged skeleton: it may be asked for again
            layer.to("meta")
        return out

    @staticmethod
    def _merge(owner: str, layer: Any, tensors: dict[str, torch.Tensor]) -> Any:
        layer.to_empty(device="cpu")
        layer.load_state_dict({key: tensors[f"{LORA_PREFIX}{owner}.{key}"] for key in layer.state_dict()})
        layer.merge()
        return layer
