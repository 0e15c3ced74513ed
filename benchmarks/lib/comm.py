"""Count the bytes torch.distributed collectives move during a block of code, under FSDP2 and DeepSpeed alike.

    with count_collectives() as comm:
        train_step(run, step)
    comm.bytes["reduce_scatter"], comm.by_group(), comm.by_node(ranks_per_node=2), comm.ring_bytes_sent()

How: while the block runs, the python functions of `torch.distributed.distributed_c10d` that hand a tensor to a
process group (all_reduce, all_gather_single, reduce_scatter_single, broadcast, ...: `_FUNCTIONS`) are replaced, in
that module and in `torch.distributed`, by wrappers that record the call and return whatever the original returns,
so `async_op=True` work handles behave as before; on exit the originals are put back. Both backends reach these
functions through an attribute looked up at call time: FSDP2 calls `dist.all_gather_single`,
`dist.reduce_scatter_single` and (HSDP) `dist.all_reduce`; `deepspeed.comm` calls `torch.distributed.<op>`, and the
two functions it binds once at init (`all_gather_into_tensor`, `reduce_scatter_tensor`) are deprecated aliases that
call `all_gather_single` / `reduce_scatter_single` by their module-global name, which the patch replaces. A counted
call made inside another (send -> isend) is counted once; object collectives (all_gather_object,
broadcast_object_list) count as the tensor collectives they make.

Why not the profiler: with gloo on torch 2.13 (CPU) it records no `record_param_comms` events, so neither
"In msg nelems" nor "Collective name" nor the process group exist; `c10d::allreduce_` shows no shapes (its tensors
come as a list), and gloo's own events name a reduce-scatter `gloo:all_reduce`. Kind, size and group of a collective
cannot be read back from it reliably.

Not seen: functional collectives (`torch.distributed._functional_collectives`, DTensor redistribution), which reach
the dispatcher without these python functions, and the few torch helpers that bound a collective by `from ... import`
(DTensor's mesh_broadcast / mesh_scatter, used to distribute a full tensor). Neither backend issues them in a
training step: on 2 ranks, FSDP2 (full and LISA), ZeRO-2 and ZeRO-3 steps, switches included, made as many `c10d::`
and `_c10d_functional::` ops in the profiler as calls counted here.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# python function -> (collective, the argument whose bytes are the message this rank contributes; None: no payload).
_FUNCTIONS: dict[str, tuple[str, str | None]] = {
    "all_reduce": ("all_reduce", "tensor"),
    "all_reduce_coalesced": ("all_reduce", "tensors"),
    "reduce": ("reduce", "tensor"),
    "broadcast": ("broadcast", "tensor"),
    "all_gather": ("all_gather", "tensor_list"),  # all-gathers count their output: W x the input
    "all_gather_single": ("all_gather", "output_tensor"),
    # torch < 2.13's names for the two above (FSDP2 calls them there); on 2.13 they are aliases whose inner call to
    # the new name is not counted again.
    "all_gather_into_tensor": ("all_gather", "output_tensor"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "all_gather_coalesced": ("all_gather", "output_tensor_lists"),
    "reduce_scatter": ("reduce_scatter", "input_list"),
    "reduce_scatter_single": ("reduce_scatter", "input"),
    "all_to_all": ("all_to_all", "input_tensor_list"),
    "all_to_all_single": ("all_to_all", "input"),
    "gather": ("gather", "tensor"),
    "scatter": ("scatter", "tensor"),
    "isend": ("send", "tensor"),
    "irecv": ("recv", "tensor"),
    "barrier": ("barrier", None),
}
# Bytes a rank sends per message byte in a ring of W ranks, as a function of W (the model of `ring_bytes_sent`).
_RING: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda w: 2 * (w - 1) / w,
    "reduce_scatter": lambda w: (w - 1) / w,
    "all_gather": lambda w: (w - 1) / w,
    "all_to_all": lambda w: (w - 1) / w,
    "broadcast": lambda w: (w - 1) / w,
    "reduce": lambda w: (w - 1) / w,
    "send": lambda w: 1.0,
}


@dataclass
class CommCounter:
    """Collectives this rank called: per (collective, ranks of its process group), [calls, message bytes].

    Message bytes are what this rank contributes: the input tensor(s), except for all-gathers, which count their
    output (the gathered whole). A send counts its tensor, a recv the tensor it fills.
    """

    records: dict[tuple[str, tuple[int, ...]], list[int]] = field(default_factory=dict)
    _ranks: dict[Any, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def calls(self) -> dict[str, int]:
        return self._sum(0)

    @property
    def bytes(self) -> dict[str, int]:
        return self._sum(1)

    def _sum(self, i: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for (name, _), rec in self.records.items():
            out[name] = out.get(name, 0) + rec[i]
        return out

    def by_group(self) -> dict[tuple[int, ...], dict[str, int]]:
        """Message bytes per collective, per process group (keyed by its global ranks)."""
        out: dict[tuple[int, ...], dict[str, int]] = {}
        for (name, ranks), (_, nbytes) in self.records.items():
            group = out.setdefault(ranks, {})
            group[name] = group.get(name, 0) + nbytes
        return out

    def ring_bytes_sent(self, ranks: tuple[int, ...] | None = None) -> int:
        """Bytes this rank sends if every collective ran as a ring over its group of W ranks: (W-1)/W x message for
        reduce-scatter, all-gather (of its output), all-to-all, broadcast and reduce (pipelined chain, averaged over
        ranks), 2 (W-1)/W x message for all-reduce, the message for a send, 0 for the rest. A model, not a
        measurement: gloo, for one, runs reduce-scatter as an all-reduce. Only the group `ranks` when given."""
        return round(
            sum(
                _ring(name, group, nbytes)
                for (name, group), (_, nbytes) in self.records.items()
                if ranks is None or group == ranks
            )
        )

    def by_node(self, ranks_per_node: int) -> dict[str, dict[str, int]]:
        """{"intra": ..., "inter": ...}, each {"calls", "bytes", "ring_bytes"}: the collectives of groups within one
        node against those of groups spanning nodes, with node = global rank // ranks_per_node (torchrun's order)."""
        out = {side: {"calls": 0, "bytes": 0, "ring_bytes": 0.0} for side in ("intra", "inter")}
        for (name, ranks), (calls, nbytes) in self.records.items():
            side = out["intra" if len({r // ranks_per_node for r in ranks}) == 1 else "inter"]
            side["calls"] += calls
            side["bytes"] += nbytes
            side["ring_bytes"] += _ring(name, ranks, nbytes)
        for side in out.values():
            side["ring_bytes"] = round(side["ring_bytes"])
        return out

    def record(self, name: str, group: Any, nbytes: int) -> None:
        if group not in self._ranks:
            self._ranks[group] = tuple(dist.get_process_group_ranks(group))
        rec = self.records.setdefault((name, self._ranks[group]), [0, 0])
        rec[0] += 1
        rec[1] += nbytes


def _ring(name: str, ranks: tuple[int, ...], nbytes: int) -> float:
    return _RING[name](len(ranks)) * nbytes if name in _RING else 0.0


_ACTIVE: list[CommCounter] = []
_ORIGINALS: dict[str, Callable[..., Any]] = {}
_DEPTH = threading.local()


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    return 0


def _counting(fn: Callable[..., Any], name: str, arg: str | None) -> Callable[..., Any]:
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        depth = getattr(_DEPTH, "value", 0)
        if depth == 0:
            bound = signature.bind(*args, **kwargs)
            group = bound.arguments.get("group") or c10d._get_default_group()
            if not c10d._rank_not_in_group(group):
                nbytes = _nbytes(bound.arguments.get(arg)) if arg else 0
                for counter in _ACTIVE:
                    counter.record(name, group, nbytes)
        _DEPTH.value = depth + 1
        try:
            return fn(*args, **kwargs)
        finally:
            _DEPTH.value = depth

    return wrapper


def _install() -> None:
    for fname, (name, arg) in _FUNCTIONS.items():
        original = getattr(c10d, fname, None)
        if original is None:  # a collective this torch does not have (all_gather_single is recent)
            continue
        _ORIGINALS[fname] = original
        wrapper = _counting(original, name, arg)
        setattr(c10d, fname, wrapper)
        if getattr(dist, fname, None) is original:
            setattr(dist, fname, wrapper)


def _uninstall() -> None:
    for fname, original in _ORIGINALS.items():
        if getattr(dist, fname, None) is getattr(c10d, fname):
            setattr(dist, fname, original)
        setattr(c10d, fname, original)
    _ORIGINALS.clear()


@contextlib.contextmanager
def count_collectives() -> Iterator[CommCounter]:
    """Count every collective this process calls inside the block (nested blocks each count their own)."""
    counter = CommCounter()
    if not _ACTIVE:
        _install()
    _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        _ACTIVE.remove(counter)
        if not _ACTIVE:
            _uninstall()
