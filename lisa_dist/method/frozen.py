"""Storage of the decoder layers that do not train: as trained (fp32), cast (bf16), or quantized by torchao (int8,
NF4) with the exact weights in host memory.

With int8 or nf4 every matrix of a decoder block's linear layers has an exact host copy (fp32 or bf16), in one host
buffer per block (page-locked on CUDA, exactly its bytes: `lisa_dist.method.pinned`). A frozen block holds on the
device only torchao's quantized tensor, made from that copy. When a block becomes active it gets fp32 params loaded
from its host copies, so the optimizer only ever updates exact weights; when it leaves, its trained weights go back
to the host copies and the device copy is re-quantized from them. Checkpoints and exports read the host copies
(`exact_state_dict`), never dequantized weights. Params that are not quantized (norms, biases, matrices whose size
the format cannot block) stay on the device in fp32, exact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lisa_dist.config import QUANTIZED
from lisa_dist.method.optim import TrainableSet
from lisa_dist.method.pinned import HostBuffer
from lisa_dist.models import ModelLayout

NF4_BLOCK = 64  # elements per NF4 scale (QLoRA's block)
NF4_SCALER_BLOCK = 256  # NF4 scales per double-quantization factor (QLoRA's)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# torchao (imported here, and by peft and transformers when installed) warns for each CUDA/CUTLASS extension its
# build cannot load (mxfp8, SM90 kernels); lisa_dist uses none of them.
logging.getLogger("torchao").setLevel(logging.ERROR)


def nf4_scaler_block(numel: int) -> int | None:
    """The double-quantization block NF4 uses for a tensor of `numel` elements (QLoRA's 256, or the largest
    divisor of the number of scales below it); None when `numel` is not a multiple of the 64-element block."""
    if numel % NF4_BLOCK:
        return None
    return math.gcd(NF4_SCALER_BLOCK, numel // NF4_BLOCK)


def quantizable(shape: Sequence[int], storage: str) -> bool:
    """Whether a weight of `shape` is stored in `storage`'s format when frozen: matrices, for NF4 those whose size
    is a multiple of its 64-element block (the rest stay in fp32)."""
    return len(shape) == 2 and (storage == "int8" or nf4_scaler_block(math.prod(shape)) is not None)


def quantize(weight: torch.Tensor, storage: str) -> torch.Tensor:
    """torchao's quantized copy of a 2-d weight: int8 per output row (symmetric), or NF4 (QLoRA's format)."""
    weight = weight.detach()
    if storage == "nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        return to_nf4(weight, NF4_BLOCK, nf4_scaler_block(weight.numel()))
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerRow

    return Int8Tensor.from_hp(weight, PerRow())


def dequantize(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The plain weight a torchao quantized tensor stands for, in `dtype` (NF4: what its linear computes with)."""
    return q.dequantize(dtype) if hasattr(q, "qdata") else q.to(dtype)  # type: ignore[call-arg]  # torchao's


def quantized_bytes(shape: Sequence[int], storage: str) -> int:
    """Bytes torchao's quantized tensor of a `shape` weight (fp32 source) occupies: int8 codes plus an fp32 scale
    and an int8 zero point per row; NF4 codes (2 per byte), an int8 scale per 64 elements, an fp32 factor per
    scaler block, the fp32 mean of the scales and the 16-entry fp32 lookup table."""
    numel = math.prod(shape)
    if storage == "int8":
        return numel + shape[0] * (4 + 1)
    scales = numel // NF4_BLOCK
    block = nf4_scaler_block(numel)
    if block is None:
        raise ValueError(f"a tensor of {numel} elements is not NF4-quantizable (not a multiple of {NF4_BLOCK})")
    factors = scales // block
    # torchao takes the factors as a strided view of a (factors, scaler block) tensor and copies it out; a single
    # factor is already contiguous, so it keeps the whole storage of one factor per scale.
    factor_bytes = 4 * (scales if factors == 1 else factors)
    return numel // 2 + scales + factor_bytes + 4 + 16 * 4


def frozen_embedding_dtype(storage: str, precision: str) -> torch.dtype | None:
    """A frozen input embedding is stored like the frozen layers, except that a lookup has no quantized kernel:
    bfloat16 when the layers are cast or quantized and the compute is bf16, else as loaded (None)."""
    return torch.bfloat16 if storage != "float32" and precision == "bf16" else None


def freeze_outside(model: nn.Module, trainable: TrainableSet, storage: str, precision: str) -> None:
    """Params outside the decoder layers that do not train (a frozen input embedding) are stored like the frozen
    layers (`frozen_embedding_dtype`). Through `Module._apply`, the path of `module.to(dtype)`, so that FSDP2
    re-registers its sharded params (its `_apply` override)."""
    dtype = frozen_embedding_dtype(storage, precision)
    if dtype is None:
        return
    training = {id(p) for _, p in trainable.all_named()}
    cast = {
        id(p) for p in model.parameters() if id(p) not in training and p.dtype.is_floating_point and p.dtype != dtype
    }
    if cast:
        model._apply(lambda t: t.to(dtype) if id(t) in cast else t)


class FrozenStore:
    """Where the frozen blocks of `layout` live, and their moves at each LISA switch (the local backend; FSDP2 for
    bfloat16, a cast of its sharded params)."""

    def __init__(self, layout: ModelLayout, storage: str, host_dtype: str, device: torch.device) -> None:
        self.layout, self.storage, self.device = layout, storage, device
        self.host_dtype = DTYPES[host_dtype]
        self.host: dict[str, torch.Tensor] = {}
        """Parameter name -> exact host copy (a view of its block's buffer), for every quantized weight."""
        self.buffers: list[HostBuffer] = []
        self.slots: list[list[tuple[str, nn.Module, str]]] = []
        """Per block: (parameter name, owning module, attribute) of each weight stored quantized when frozen."""
        self.active: set[int] = set()

    @property
    def quantized(self) -> bool:
        return self.storage in QUANTIZED

    def place(self, model: nn.Module) -> None:
        """Put a model loaded on the host onto the device: blocks frozen in the storage format (their exact
        quantized weights copied into the host buffers), everything else as loaded. One block at a time, so the
        device never holds the whole model in full precision and the host never holds it twice."""
        prefix = self.layout.layers_path
        for i, block in enumerate(self.layout.layers):
            slots = [
                (f"{prefix}.{i}.{mod_name}.weight", module, "weight")
                for mod_name, module in block.named_modules()
                if self._quantizes(module)
            ]
            self.slots.append(slots)
            if not slots:
                continue
            # One page-locked buffer per block on CUDA (lisa_dist.method.pinned: exactly its bytes).
            buffer = HostBuffer(
                [module.weight.shape for _, module, _ in slots], self.host_dtype, pin=self.device.type == "cuda"
            )
            self.buffers.append(buffer)
            with torch.no_grad():
                for (name, module, _), view in zip(slots, buffer.views, strict=True):
                    view.copy_(module.weight)
                    self.host[name] = view
            self._freeze(i, write_back=False)  # the loaded weights give way to the quantized ones, block by block
        with torch.no_grad():
            for p in model.parameters():
                if p.device != self.device:
                    p.data = p.data.to(self.device)
            for b in model.buffers():
                b.data = b.data.to(self.device)
        for i, slots in enumerate(self.slots):
            if not slots:
                self._freeze(i, write_back=False)
        self.active = set()

    def _quantizes(self, module: nn.Module) -> bool:
        weight = module._parameters.get("weight") if isinstance(module, nn.Linear) else None
        return self.quantized and weight is not None and quantizable(weight.shape, self.storage)

    def freeze_all(self) -> None:
        """Every block in its frozen storage, none active (after `place`, or on blocks already on the device)."""
        for i in range(len(self.layout.layers)):
            self._freeze(i, write_back=False)
        self.active = set()

    def set_active(self, layers: Iterable[int]) -> bool:
        """Move blocks so that exactly `layers` hold trainable fp32 params; returns whether any param object changed
        (the caller then re-reads the trainable set)."""
        wanted = set(layers)
        leaving, entering = sorted(self.active - wanted), sorted(wanted - self.active)
        for i in leaving:
            self._freeze(i, write_back=True)
        for i in entering:
            self._thaw(i)
        self.active = wanted
        return bool(leaving or entering)

    def _freeze(self, i: int, write_back: bool) -> None:
        block = self.layout.layers[i]
        if self.storage == "bfloat16":
            block.to(torch.bfloat16)
            return
        for name, module, attr in self.slots[i]:
            param = getattr(module, attr)
            if write_back:
                self.host[name].copy_(param.detach())
            exact = self.host[name].to(self.device, torch.float32, non_blocking=True)
            setattr(module, attr, nn.Parameter(quantize(exact, self.storage), requires_grad=False))

    def _thaw(self, i: int) -> None:
        if self.storage == "bfloat16":
            self.layout.layers[i].to(torch.float32)
            return
        for name, module, attr in self.slots[i]:
            exact = self.host[name].to(self.device, torch.float32, non_blocking=True)
            setattr(module, attr, nn.Parameter(exact, requires_grad=False))

    def exact_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`model.state_dict()` with every quantized weight replaced by its exact host copy (an active block's
        device weights are its exact ones)."""
        out = dict(state)
        for i, slots in enumerate(self.slots):
            if i in self.active:
                continue
            for name, _, _ in slots:
                out[name] = self.host[name]
        return out

    def load_exact(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Take the quantized weights' exact values out of `state` (host copies, device copies re-made); returns
        the rest, for `model.load_state_dict`."""
        rest = dict(state)
        with torch.no_grad():
            for i, slots in enumerate(self.slots):
                for name, module, attr in slots:
                    if name not in rest:
                        raise KeyError(f"the saved model has no weight {name!r}")
                    self.host[name].copy_(rest.pop(name))
                    if i in self.active:
                        getattr(module, attr).copy_(self.host[name])
                if i not in self.active:
                    self._freeze(i, write_back=False)
        return rest

    def quantized_names(self) -> list[str]:
        return [name for slots in self.slots for name, _, _ in slots]

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host.values())
