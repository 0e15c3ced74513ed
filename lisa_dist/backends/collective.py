"""What every multi-process backend does the same way: the main rank, sums over ranks, the barrier, the export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lisa_dist.backends.base import HoldsModel
from lisa_dist.dist import io_barrier, raise_together
from lisa_dist.errors import DistError
from lisa_dist.method import TrainableSet
from lisa_dist.models import Fetch, FolderSpec, is_adapter_model, save_hf_folder, share_tied


class ProcessGroupBackend(HoldsModel):
    """Shared verbs of the FSDP and DeepSpeed backends; they set rank, world_size, device, model and trainable."""

    rank: int
    world_size: int
    device: torch.device
    model: nn.Module | None
    trainable: TrainableSet | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.device)
        dist.all_reduce(value)
        return value.cpu()

    def barrier(self) -> None:
        """Around one rank's I/O (a cache being built, a checkpoint finalized): waits up to the I/O timeout."""
        io_barrier()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def full_fetch(self) -> Fetch:
        """Collective, per call: the whole tensors of the names asked for, on the main rank's CPU (empty elsewhere)."""
        raise NotImplementedError

    def save_model(self, path: str, spec: FolderSpec) -> None:
        """Collective: the model as a Hugging Face folder written by the main rank a shard at a time, each tensor
        gathered whole as its shard fills (a LoRA model: its adapters, as peft saves them)."""
        model = self._model
        if is_adapter_model(model):
            self._save_adapters(path, spec)
            return
        error = None
        try:
            save_hf_folder(Path(path), model, self.full_fetch(), spec, write=self.is_main)
        except DistError:
            raise  # a peer died: no agreement is possible
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            error = exc
        # Not a barrier: the others would wait in it for the I/O timeout while a main rank that failed to write
        # (a full disk) waits in its error's report. save_hf_folder fetches to the end even after a failed write.
        raise_together(error)

    def _save_adapters(self, path: str, spec: FolderSpec) -> None:
        state = self.full_state_dict()
        model: Any = self._model  # a peft model: save_pretrained is not nn.Module's
        error = None
        if self.is_main:
            try:
                state = {k: v.to(spec.dtype) if v.is_floating_point() else v for k, v in state.items()}
                model.save_pretrained(path, state_dict=share_tied(model, state))
            except Exception as exc:  # noqa: BLE001 - raised on every rank below
                error = exc
        raise_together(error)

    def close_process_group(self) -> None:
        from lisa_dist.dist import shutdown

        shutdown()
