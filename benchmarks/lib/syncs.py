"""Counting the host's reads of device results: each one a host synchronisation on CUDA, where the host waits for
the device to finish and stops queueing work ahead of it.

On CUDA, torch's own sync debug mode reports every synchronizing call (any library's): `count_syncs` counts its
warnings and names, for each, the innermost lisa_dist frame that led to it. On the CPU a read costs nothing and
torch reports none, so `count_syncs` counts the calls by lisa_dist's own code that bring a floating-point tensor's
value to the host (`float()`, `.item()`, `.tolist()`, `.cpu()`, ...) or index with a boolean mask (which reads the
mask's count): the reads that would synchronize on CUDA. Integer tensors there are the host copies of batches and
token counts."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import lisa_dist

PACKAGE = str(Path(lisa_dist.__file__).resolve().parent)
TORCH = str(Path(torch.__file__).parent)
READS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__", "__bool__", "nonzero"}


class SyncLog:
    """Where each counted read came from: `lisa_dist file:line`, or `other` for another library's (CUDA only)."""

    def __init__(self) -> None:
        self.where: list[str] = []

    def take(self) -> list[str]:
        """The reads counted since the last take."""
        taken, self.where = self.where, []
        return taken


@contextlib.contextmanager
def count_syncs(device: torch.device | str) -> Iterator[SyncLog]:
    """Count the host syncs (CUDA) or lisa_dist's reads of floating-point results (CPU) inside the block."""
    found = SyncLog()
    if torch.device(device).type == "cuda":
        with _cuda_syncs(found):
            yield found
    else:
        with _FloatReads(found):
            yield found


@contextlib.contextmanager
def _cuda_syncs(found: SyncLog) -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def count(message, category, filename, lineno, file=None, line=None):
            if "synchronizing" in str(message):
                found.where.append(_caller(sys._getframe(1), own_only=False))
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = count
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)


class _FloatReads(TorchFunctionMode):
    def __init__(self, found: SyncLog) -> None:
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        masked = name == "__getitem__" and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in _flat(args[1:])
        )
        if (name in READS or masked) and isinstance(first, torch.Tensor) and first.is_floating_point():
            caller = _caller(sys._getframe(1), own_only=True)
            if caller:
                self.found.where.append(caller)
        return func(*args, **(kwargs or {}))


def _flat(items):
    for item in items:
        if isinstance(item, (tuple, list)):
            yield from _flat(item)
        else:
            yield item


def _caller(frame, own_only: bool) -> str:
    """The innermost lisa_dist frame as `file:line`; else '' (own_only: another library's read, not counted) or
    `other`."""
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(PACKAGE) and name != __file__:
            return f"{Path(name).name}:{frame.f_lineno}"
        if own_only and not name.startswith(TORCH) and name != __file__:
            return ""
        frame = frame.f_back
    return "" if own_only else "other"
