"""int8 / NF4 frozen blocks under FSDP2: each rank keeps its shard of a frozen block's matrices exact in host memory
and quantized (torchao) on the device; the block leaves its FSDP unit while frozen and gathers the quantized shards
itself.

FSDP2 fixes a unit's params (dtype, all-gather layout) when it shards them, so a param cannot turn into a torchao
tensor and back at each switch. Instead a frozen block keeps its sharded DTensor params, which stay the exact
weights: the matrices' shards move to the host (`Module._apply`, which FSDP2 re-registers; fp32 or bf16, page-locked
on CUDA), the norms and biases stay on the device in fp32. Its FSDP forward hooks are detached and each of its modules
runs `_frozen_forward`: a quantizable `nn.Linear` through `_FrozenLinear`, which all-gathers the ranks' quantized
shards (one collective per matrix), dequantizes them and multiplies, then gathers again in backward for the input
gradient, so a full weight lives only while it is used; the other params (norms, biases) are gathered in full for
the call. At thaw the shards come back to the device in fp32, the hooks are re-attached and the block trains as
any FSDP unit. Checkpoints and exports read the DTensor params as they are, so they are exact; a load re-quantizes.
Not covered: a block that owns params directly (not through a submodule) under activation checkpointing, which
recomputes the block's class forward without them gathered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lisa_dist.method import PinnedShards, dequantize, quantizable, quantize
from lisa_dist.models import ModelLayout

if TYPE_CHECKING:
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.utils._python_dispatch import TensorWithFlatten

log = logging.getLogger(__name__)

HOST = torch.device("cpu")


class GatheredWeight:
    """One frozen matrix: this rank's quantized padded shard; `full` rebuilds the whole weight from every rank's."""

    def __init__(self, shard: torch.Tensor, rows: int, group: dist.ProcessGroup) -> None:
        self.shard, self.rows, self.group = shard, rows, group
        # A torchao tensor subclass: it has the flatten protocol of traceable subclasses, which Tensor's stubs lack.
        self.names, self.meta = cast("TensorWithFlatten", shard).__tensor_flatten__()

    def full(self, dtype: torch.dtype) -> torch.Tensor:
        inner = [getattr(self.shard, name) for name in self.names]
        # One collective for all parts, each padded to 8 bytes so that every part's view stays aligned.
        raw = [t.reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8) for t in inner]
        sizes = [r.numel() + (-r.numel()) % 8 for r in raw]
        packed = torch.cat([F.pad(r, (0, size - r.numel())) for r, size in zip(raw, sizes, strict=True)])
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, packed, group=self.group)
        pieces = []
        for buffer in gathered:
            parts = {
                name: part[: r.numel()].view(t.dtype).view(t.shape)
                for name, t, r, part in zip(self.names, inner, raw, buffer.split(sizes), strict=True)
            }
            subclass = cast("type[TensorWithFlatten]", type(self.shard))
            shard = subclass.__tensor_unflatten__(parts, self.meta, self.shard.shape, self.shard.stride())
            pieces.append(dequantize(shard, dtype))
        return torch.cat(pieces)[: self.rows]

    def nbytes(self) -> int:
        return sum(getattr(self.shard, n).numel() * getattr(self.shard, n).element_size() for n in self.names)


class _FrozenLinear(torch.autograd.Function):
    """x @ W.T with W gathered and dequantized in forward, and again in backward (for x's gradient only)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: GatheredWeight) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, weight.full(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.weight.full(grad.dtype), None


def _frozen_forward(
    module: nn.Module,
    others: list[tuple[str, nn.Parameter]],
    weight: GatheredWeight | None,
    dtype: torch.dtype,
    forward,
    *args,
    **kwargs,
):
    """A frozen block's module: its params other than a quantized weight gathered in full for the call (then the
    sharded ones registered again); a quantized linear through `_FrozenLinear`. An instance `forward`, so it also
    runs when activation checkpointing recomputes the block (transformers checkpoints the block's class forward,
    outside module hooks)."""
    with torch.no_grad():
        for name, param in others:
            module._parameters[name] = nn.Parameter(cast(DTensor, param).full_tensor().to(dtype), requires_grad=False)
    try:
        if weight is None:
            return forward(*args, **kwargs)
        out = _FrozenLinear.apply(args[0], weight)
        return out if module.bias is None else out + module.bias
    finally:
        for name, param in others:
            module._parameters[name] = param


class _FrozenBlock:
    """What one frozen block holds while it is out of its FSDP unit: the quantized matrices, and the modules whose
    forward it replaced."""

    def __init__(self) -> None:
        self.weights: dict[nn.Module, GatheredWeight] = {}
        self.wrapped: list[tuple[nn.Module, Callable[..., Any] | None]] = []
        """(module, the instance forward it had before, or None)."""
        self.compiled: Callable[..., Any] | None = None
        """train.compile: the block's compiled call, set aside while it is frozen (its quantized shards are gathered
        by collectives in Python, which dynamo would recompile for every block: a frozen block runs eagerly)."""


class ShardedFrozenStore:
    """The frozen blocks of an FSDP2-sharded model in int8 or NF4 (see the module docstring)."""

    def __init__(
        self,
        layout: ModelLayout,
        storage: str,
        host_dtype: torch.dtype,
        device: torch.device,
        group: dist.ProcessGroup,
        compute_dtype: torch.dtype,
    ) -> None:
        self.layout, self.storage, self.host_dtype, self.device = layout, storage, host_dtype, device
        self.group, self.compute_dtype = group, compute_dtype
        self.frozen: dict[int, _FrozenBlock] = {}
        self.warned_eager = False
        self.pinned = PinnedShards()

    def freeze_all(self) -> None:
        for i in range(len(self.layout.layers)):
            if i not in self.frozen:
                self._freeze(i)

    def set_active(self, layers: Iterable[int]) -> bool:
        """Thaw `layers`, freeze every other block; returns whether any block moved."""
        wanted = set(layers)
        leaving = [i for i in range(len(self.layout.layers)) if i not in wanted and i not in self.frozen]
        entering = [i for i in sorted(wanted) if i in self.frozen]
        for i in leaving:
            self._freeze(i)
        for i in entering:
            self._thaw(i)
        return bool(leaving or entering)

    def refresh(self) -> None:
        """Re-quantize every frozen block from its exact shards (after they were loaded from a checkpoint)."""
        for i, frozen in self.frozen.items():
            for fp in self._matrices(i):
                frozen.weights[fp._module_info.module].shard = self._quantize(fp)

    def frozen_units(self) -> list[nn.Module]:
        return [self.layout.layers[i] for i in self.frozen]

    def hosted(self) -> list[DTensor]:
        """The exact host shards (DTensor params) of the frozen blocks' quantized matrices."""
        return [cast(DTensor, module.weight) for block in self.frozen.values() for module in block.weights]

    def device_tensors(self) -> list[torch.Tensor]:
        """What the frozen blocks hold on the device for their matrices: the quantized shards."""
        return [w.shard for block in self.frozen.values() for w in block.weights.values()]

    def host_bytes(self) -> int:
        return sum(p.to_local().untyped_storage().nbytes() for p in self.hosted())

    def _params(self, i: int) -> list:
        """FSDP's records of block i's params (module, name, padded local shard)."""
        group = cast(FSDPModule, self.layout.layers[i])._get_fsdp_state()._fsdp_param_group
        return cast("FSDPParamGroup", group).fsdp_params  # a block has params: its unit has their group

    def _matrices(self, i: int) -> list:
        return [
            fp
            for fp in self._params(i)
            if isinstance(fp._module_info.module, nn.Linear)
            and fp._module_info.param_name == "weight"
            and quantizable(fp.padded_sharded_param_size, self.storage)
        ]

    def _freeze(self, i: int) -> None:
        block = self.layout.layers[i]
        unit = cast(FSDPModule, block)  # fully_shard made the block an FSDPModule too
        unit.reshard()
        state = unit._get_fsdp_state()
        state._pre_forward_hook_handle.remove()
        state._post_forward_hook_handle.remove()
        matrices = self._matrices(i)
        # Quantized from the shards where they are, on the device, before they move: quantizing the host copy
        # would copy every shard back to the device first.
        quantized = {fp._module_info.module: self._quantize(fp) for fp in matrices}
        self._move(unit, matrices, HOST, self.host_dtype)
        frozen = _FrozenBlock()
        frozen.compiled, block._compiled_call_impl = block._compiled_call_impl, None
        if frozen.compiled is not None and not self.warned_eager:
            self.warned_eager = True
            if dist.get_rank(self.group) == 0:
                log.warning(
                    "train.compile: frozen %s blocks run eagerly on FSDP2 (their quantized shards are "
                    "gathered in Python); each block runs compiled while it trains",
                    self.storage,
                )
        for fp in matrices:
            module = fp._module_info.module
            frozen.weights[module] = GatheredWeight(quantized[module], fp._orig_size[0], self.group)
        sharded = {id(fp.sharded_param) for fp in self._params(i)}
        for module in block.modules():
            weight = frozen.weights.get(module)
            others = [
                (name, p)
                for name, p in module._parameters.items()
                if p is not None and id(p) in sharded and not (weight is not None and name == "weight")
            ]
            if weight is None and not others:
                continue
            frozen.wrapped.append((module, module.__dict__.get("forward")))
            module.forward = partial(_frozen_forward, module, others, weight, self.compute_dtype, module.forward)
        self.frozen[i] = frozen

    def _quantize(self, fp) -> torch.Tensor:
        """The quantized copy of a param's padded local shard (padding rows are zeros), on the device, from the
        values the host copy holds (rounded to host_dtype first), whether the shard is still on the device (a block
        leaving) or already on the host (after a checkpoint load): a resumed run quantizes as the straight one."""
        padded = fp._sharded_param_data.view(fp.padded_sharded_param_size)
        return quantize(padded.to(self.device).to(self.host_dtype).to(torch.float32), self.storage)

    def _thaw(self, i: int) -> None:
        block = self.layout.layers[i]
        unit = cast(FSDPModule, block)  # fully_shard made the block an FSDPModule too
        frozen = self.frozen.pop(i)
        for module, previous in frozen.wrapped:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        block._compiled_call_impl = frozen.compiled
        self._move(unit, self._matrices(i), self.device, torch.float32)
        state = unit._get_fsdp_state()
        state._pre_forward_hook_handle = block.register_forward_pre_hook(
            state._pre_forward, prepend=True, with_kwargs=True
        )
        state._post_forward_hook_handle = block.register_forward_hook(state._post_forward, prepend=False)

    def _move(self, block: FSDPModule, matrices: list, device: torch.device, dtype: torch.dtype) -> None:
        """Move these params' shards through FSDP2's `_apply`, which re-pads them and re-registers the DTensors.
        Host shards are page-locked in place on CUDA (`PinnedShards`, exactly their bytes), not by FSDP2's
        `pin_memory`, whose allocator rounds each shard up to a power of two."""
        ids = {
            id(fp.sharded_param)
            for fp in matrices
            if fp.sharded_param.device != device or fp.sharded_param.dtype != dtype
        }
        if not ids:
            return
        key = id(block)
        self.pinned.unpin(key)
        for fp in matrices:
            fp.pin_memory = False
        block._apply(lambda t: t.to(device, dtype) if id(t) in ids else t)
        if device == HOST and self.device.type == "cuda":
            self.pinned.pin(key, [fp._sharded_param_data for fp in matrices])
