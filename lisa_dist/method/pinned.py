"""Page-locked host memory for the exact copies of frozen weights, exactly as large as asked.

torch's pinned allocator (`Tensor.pin_memory()`, `pin_memory=True`) rounds every allocation up to a power of two (a
100.7 MB shard holds 128 MB), so pinning each matrix or shard alone would hold up to twice what the planner counts.
Here ordinary host memory is registered with CUDA as it is (cudaHostRegister, as torch.distributed.checkpoint's
stager does): what `host_bytes` and the planner count is what the host holds, and copies from it to the device are
asynchronous. On the CPU nothing is registered.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import torch

log = logging.getLogger(__name__)


def _register(ptr: int, nbytes: int) -> None:
    from torch.cuda._pin_memory_utils import pin_memory

    pin_memory(ptr, nbytes)


def _try_register(ptr: int, nbytes: int) -> bool:
    """Page-lock; a refusal (a range CUDA already registered, a locked-memory limit) leaves the memory pageable:
    its copies to the device are then synchronous, not wrong. Warned once."""
    global _warned
    try:
        _register(ptr, nbytes)
        return True
    except RuntimeError as exc:
        if not _warned:
            _warned = True
            log.warning(
                "page-locking the exact host copies failed (%s): they stay pageable, so their copies to the "
                "GPU at LISA switches are synchronous",
                str(exc).splitlines()[0],
            )
        return False


_warned = False


def _unregister(ptr: int) -> None:
    from torch.cuda._pin_memory_utils import unpin_memory

    unpin_memory(ptr)


class HostBuffer:
    """One flat host buffer for several tensors (a block's matrices), page-locked as a whole when `pin`: one
    registration per block, not one allocation per matrix. `views` are the tensors, in the order of `shapes`."""

    def __init__(self, shapes: Sequence[torch.Size], dtype: torch.dtype, pin: bool) -> None:
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        self.flat = torch.empty(sum(sizes), dtype=dtype)
        self.views: list[torch.Tensor] = []
        offset = 0
        for shape, size in zip(shapes, sizes, strict=True):
            self.views.append(self.flat[offset : offset + size].view(shape))
            offset += size
        self.pinned = pin and self.flat.numel() > 0 and _try_register(self.flat.data_ptr(), self.nbytes())
        if self.pinned:
            # Unregistered before the memory can be freed: this object holds the buffer until it goes.
            weakref.finalize(self, _unregister, self.flat.data_ptr())

    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


class PinnedShards:
    """Host tensors allocated elsewhere (FSDP2's host shards of a frozen block), page-locked in place while they
    live there: `pin` after they move to the host, `unpin` before they leave it."""

    def __init__(self) -> None:
        self.ptrs: dict[int, list[int]] = {}

    def pin(self, key: int, tensors: Sequence[torch.Tensor]) -> None:
        ptrs = []
        for t in tensors:
            storage = t.untyped_storage()
            if storage.nbytes() and _try_register(storage.data_ptr(), storage.nbytes()):
                ptrs.append(storage.data_ptr())
        self.ptrs[key] = ptrs

    def unpin(self, key: int) -> None:
        for ptr in self.ptrs.pop(key, []):
            _unregister(ptr)
