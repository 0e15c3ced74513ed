"""Per-rank memory of a fine-tuning run, on paper, before anyone rents GPUs.

The model is built on the meta device (no memory), the method picks its trainable params exactly as the engine
does (`methods.lisa_trainable`, `methods.apply_lora`), and each backend's sharding rule turns their shapes into the
bytes one rank holds:

- params: every weight as stored (local, DDP, ZeRO-1/2: whole; FSDP2: a dim-0 shard padded to ceil(rows / S) rows;
  ZeRO-3: ceil(numel / W) per param), LISA's frozen layers per lisa.frozen_storage (bf16, or torchao's int8/NF4
  formats byte for byte), a frozen embedding like them, LoRA's base in the same exact dtype, QLoRA's in NF4;
- grads: the gradients of trainable params just before the optimizer step (FSDP2: padded shards; ZeRO-1/2: the
  params that overlap this rank's partition; ZeRO-3: one flat partition buffer);
- masters: fp32 copies of trainable params that exist besides the params (DeepSpeed keeps them, in fp32 training
  too; torch AdamW on local, DDP and FSDP updates the params themselves);
- moments: Adam's exp_avg and exp_avg_sq (torch AdamW: in the param's dtype; torchao's AdamW8bit: codes, block
  scales and lookup table; DeepSpeed: fp32 partitions, each group padded to a multiple of 2 x W for ZeRO-1/2);
- host: what lives in CPU memory instead of the device: the exact copies of int8/NF4 frozen weights, ZeRO-3
  offload's masters, moments and gradient partitions.

These five are exact: `tests/test_memory.py` compares them with what every backend measures on small models. Two
further figures are labelled estimates: activations per micro-batch (the tensors autograd saves in a Llama-style
block with SDPA attention, with and without activation checkpointing) and working buffers (FSDP's unsharded units,
DeepSpeed's buckets, DDP's gradient buckets).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lisa_dist.config import (
    ADAM_8BIT,
    DTYPES,
    FROZEN_STORAGE,
    PRECISIONS,
    QUANTIZED,
    Adam8bit,
    Dtype,
    FrozenStorage,
    Precision,
    always_lr_scale_of,
)
from lisa_dist.errors import ConfigError
from lisa_dist.method import quantizable, quantized_bytes
from lisa_dist.models import MODEL_ALIASES

GIB = 1024**3
# backend.name as the planner names it: DeepSpeed by its ZeRO stage, and DDP (the transformers.Trainer integration).
PlannerBackend = Literal["local", "ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload"]
BACKENDS: tuple[str, ...] = typing.get_args(PlannerBackend)
METHODS = ("full", "lora", "qlora", "naive_lisa", "lisa")
METHOD_NAMES = {
    "full": "full fine-tuning",
    "lora": "LoRA",
    "qlora": "QLoRA (NF4 base)",
    "naive_lisa": "naive LISA (all layers visited)",
    "lisa": "lisa_dist LISA",
}
# The reference LISA callbacks toggle requires_grad only; LMFlow and axolotl do not run them under FSDP or ZeRO-3.
NAIVE_UNSUPPORTED = ("fsdp", "zero3", "zero3_offload")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAM8_MIN, ADAM8_BLOCK, ADAM8_QMAP = 4096, 256, 256  # torchao AdamW8bit: smallest param, block, lookup entries
DS_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
NCCL_ALIGNMENT = 2  # ZeRO-1/2 pad each group to a multiple of this x W

# The short names of `lisa-dist estimate --model`: aliases of hub ids whose published configs the models' offline
# registry holds (lisa_dist.models.HUB_CONFIGS, the one table of them).
MODEL_PRESETS: dict[str, str] = MODEL_ALIASES


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelShapes:
    """What the memory model needs of a model: its params by role, and the sizes activations depend on."""

    name: str
    always: list[Param]
    """Trained at every step by LISA and full fine-tuning: embeddings, final norm, head (tied weights once)."""
    layers: list[list[Param]]
    """Each decoder layer's params."""
    embedding: list[Param] = field(default_factory=list)
    """Of `always`, the input embedding's params when untied (frozen by lisa.train_embeddings=false)."""
    lora: list[Param] = field(default_factory=list)
    """LoRA adapters (only when built with a rank)."""
    frozen: list[Param] = field(default_factory=list)
    """Frozen always by every method (a vision-language model's vision tower and projector): stored, never trained."""
    hidden: int = 0
    intermediate: int = 0
    heads: int = 0
    kv_dim: int = 0
    vocab: int = 0

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.always + self.frozen) + sum(p.numel for layer in self.layers for p in layer)


@dataclass(frozen=True)
class Setup:
    """How the run is configured, in the names of `lisa-dist estimate`'s flags (each mirrors a config field:
    backend.name, model.dtype, lisa.frozen_storage, lisa.gamma, lora.r, train.micro_batch_size, ...)."""

    backend: PlannerBackend = "fsdp"
    world_size: int = 8
    replicate: int = 1
    """FSDP only: HSDP replicas (nodes); the other ranks of a replica shard."""
    precision: Precision = "bf16"
    """Compute: fp32 or bf16 (autocast on local, MixedPrecisionPolicy on FSDP, DeepSpeed's bf16 mode)."""
    param_dtype: Dtype = "float32"
    """model.dtype: storage of the weights (local, DDP, FSDP; DeepSpeed in bf16 stores bf16 and keeps fp32 masters)."""
    frozen_storage: FrozenStorage = "float32"
    """lisa.frozen_storage: the layers not active in float32 (model.dtype), bfloat16, int8 or nf4 (torchao; local
    and fsdp, with exact host copies). LoRA's base is shown in the same dtype (bfloat16 when LISA's is quantized)."""
    host_dtype: Dtype = "float32"
    """lisa.host_dtype: the exact host copies of int8/nf4 frozen weights."""
    train_embeddings: bool = True
    """lisa.train_embeddings: false freezes the untied input embedding (stored like the frozen layers)."""
    adam_8bit: Adam8bit = "none"
    """optim.adam_8bit: none, always (8-bit moments for the always-trained params) or all (active layers too)."""
    always_lr_scale: float = 1.0
    """optim.always_lr_scale: 0 freezes the embeddings, final norm and head of LISA and full fine-tuning (stored
    like a frozen embedding); any other value trains them."""
    loss_chunk_tokens: int = 0
    """train.loss=chunked with train.loss_chunk_tokens (0: the plain loss, full logits)."""
    gamma: int = 2
    lora_r: int = 8
    micro_batch: int = 1
    seq_len: int = 2048
    activation_checkpointing: bool = True
    rank: int = 0
    """Which rank (FSDP shards are uneven: rank 0 holds the most)."""

    @classmethod
    def from_config(cls, cfg: Any, backend: PlannerBackend = "local", world_size: int = 1, rank: int = 0) -> Setup:
        """The Setup of a run's config (a `lisa_dist.config.Config`) on `world_size` ranks of `backend`."""
        return cls(
            backend=backend,
            world_size=world_size,
            replicate=cfg.backend.replicate,
            precision=cfg.train.precision,
            param_dtype=cfg.model.dtype,
            frozen_storage=cfg.lisa.frozen_storage,
            host_dtype=cfg.lisa.host_dtype,
            train_embeddings=cfg.lisa.train_embeddings,
            adam_8bit=cfg.optim.adam_8bit,
            always_lr_scale=always_lr_scale_of(cfg),
            loss_chunk_tokens=cfg.train.loss_chunk_tokens if cfg.train.loss == "chunked" else 0,
            gamma=cfg.lisa.gamma,
            micro_batch=cfg.train.micro_batch_size,
            seq_len=cfg.data.max_length,
            activation_checkpointing=cfg.train.activation_checkpointing,
            rank=rank,
        )

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r}: allowed values are {', '.join(BACKENDS)}")
        for name, value, allowed in (
            ("precision", self.precision, PRECISIONS),
            ("param_dtype", self.param_dtype, DTYPES),
            ("frozen_storage", self.frozen_storage, FROZEN_STORAGE),
            ("host_dtype", self.host_dtype, DTYPES),
            ("adam_8bit", self.adam_8bit, ADAM_8BIT),
        ):
            if value not in allowed:
                raise ConfigError(f"{name}={value!r}: allowed values are {', '.join(allowed)}")
        lean = self.frozen_storage != "float32" or self.adam_8bit != "none"
        if lean and self.backend not in ("local", "ddp", "fsdp"):
            raise ConfigError(
                f"backend={self.backend}: frozen storage and 8-bit moments run on local and fsdp only "
                "(DeepSpeed partitions in its own dtype and builds its own optimizer)"
            )
        if self.world_size < 1 or self.world_size % self.replicate:
            raise ConfigError(f"replicate={self.replicate} must divide world_size={self.world_size}")
        if self.backend == "local" and self.world_size != 1:
            raise ConfigError(f"backend=local runs one rank, not world_size={self.world_size}")


@dataclass
class Breakdown:
    """Bytes one rank holds. `host` is what stays in CPU memory instead of on the GPU (exact copies of quantized
    frozen weights, ZeRO-3 offload's optimizer partitions)."""

    params: int = 0
    grads: int = 0
    masters: int = 0
    moments: int = 0
    host: int = 0
    activations: int = 0
    buffers: int = 0
    runtime: int = 0
    """ESTIMATE of what a CUDA process holds besides its tensors (`runtime_bytes`)."""
    supported: bool = True
    note: str = ""

    @property
    def state(self) -> int:
        """params + grads + masters + moments on the device (the exact part)."""
        return self.params + self.grads + self.masters + self.moments

    @property
    def device_total(self) -> int:
        """What torch allocates on the device (its `max_memory_allocated`)."""
        return self.state + self.activations + self.buffers

    @property
    def gpu_total(self) -> int:
        """The device total plus the CUDA runtime: what must fit the card."""
        return self.device_total + self.runtime

    def as_dict(self) -> dict:
        return {
            "params": self.params,
            "grads": self.grads,
            "masters": self.masters,
            "moments": self.moments,
            "host": self.host,
            "activations": self.activations,
            "buffers": self.buffers,
            "runtime": self.runtime,
            "state": self.state,
            "device_total": self.device_total,
            "gpu_total": self.gpu_total,
            "supported": self.supported,
            "note": self.note,
        }


# -- shapes -----------------------------------------------------------------------------------------------------


def model_config(model: str, field: str = "--model"):
    """A hub id the offline registry knows or its short name (MODEL_PRESETS), a lisa_dist tiny preset, a
    config.json or a folder holding one; `field` names the argument in errors."""
    from transformers import AutoConfig

    from lisa_dist.models import HUB_CONFIGS, PRESETS, hub_config, hub_id, preset_config

    if hub_id(model):
        return hub_config(model)
    if model in PRESETS:
        return preset_config(model)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{field} {model!r}: not a preset ({', '.join(PRESETS)}), a short name "
            f"({', '.join(MODEL_PRESETS)}) or a hub id known offline ({', '.join(HUB_CONFIGS)}), and "
            "no such config.json or folder: a local folder holding the model's config.json works for "
            "any model"
        )
    try:
        fields = json.loads(path.read_text())
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (json.JSONDecodeError, KeyError, ValueError) as exc:
        raise ConfigError(f"{path}: not a Hugging Face config.json ({exc})") from None


def shapes_of(
    config,
    name: str = "model",
    lora_r: int | None = None,
    lora_targets: Sequence[str] | None = None,
    layers_path: str | None = None,
) -> ModelShapes:
    """Build `config`'s model on the meta device and read its param shapes by role (and LoRA's, given a rank)."""
    from lisa_dist.config import LoraConfig
    from lisa_dist.method import apply_lora, lisa_trainable
    from lisa_dist.models import build_skeleton, find_layout

    model = build_skeleton(config, torch.float32)
    layout = find_layout(model, layers_path)
    trainable = lisa_trainable(layout)
    shapes = ModelShapes(
        name=name,
        always=_params(trainable.always),
        embedding=_params(layout.frozen_embedding_params(False)),
        frozen=_params(trainable.frozen),
        layers=[_params(layer) for layer in trainable.layers],
        **_dims(config),
    )
    if lora_r:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers method
            targets = list(lora_targets) if lora_targets is not None else None
            _, adapters = apply_lora(model, LoraConfig(enabled=True, r=lora_r, target_modules=targets))
        shapes.lora = _params(adapters.always)
    return shapes


def shapes_of_model(
    model: nn.Module, name: str = "model", lora: Sequence[tuple[str, nn.Parameter]] = (), layers_path: str | None = None
) -> ModelShapes:
    """The shapes of a model already built and placed (tests and benchmarks: the one they train); `lora` are its
    adapters when it is peft-wrapped."""
    from lisa_dist.method import lisa_trainable
    from lisa_dist.models import find_layout

    layout = find_layout(model, layers_path)
    trainable = lisa_trainable(layout)
    adapters = {id(p) for _, p in lora}

    def base(named: Sequence[tuple[str, nn.Parameter]]) -> list[Param]:
        return _params([(n, p) for n, p in named if id(p) not in adapters])

    return ModelShapes(
        name=name,
        always=base(trainable.always),
        embedding=base(layout.frozen_embedding_params(False)),
        layers=[base(layer) for layer in trainable.layers],
        lora=_params(lora),
        frozen=base(trainable.frozen),
        **_dims(model.config),
    )


def _dims(config: Any) -> dict[str, Any]:
    """The sizes the activation estimate needs (a vision-language model's: its language model's)."""
    config = config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "hidden": config.hidden_size,
        "heads": heads,
        "vocab": config.vocab_size,
        "intermediate": getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        "kv_dim": (getattr(config, "num_key_value_heads", None) or heads) * head_dim,
    }


def _params(named: Sequence[tuple[str, nn.Parameter]]) -> list[Param]:
    # A ZeRO-3 partitioned param keeps its real shape in ds_shape.
    return [Param(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in named]


# -- sharding rules ---------------------------------------------------------------------------------------------


def _fsdp_rows(p: Param, shards: int, rank: int, padded: bool) -> int:
    """Elements of `p` on `rank` under FSDP2's dim-0 chunking (padded: the storage every rank allocates)."""
    rows = p.shape[0] if p.shape else 1
    per = -(-rows // shards)
    mine = per if padded else max(0, min(per, rows - rank * per))
    return mine * (p.numel // rows if rows else 0)


def _zero3_numel(p: Param, world: int) -> int:
    return -(-p.numel // world)


def _groups(always: list[Param], active: list[Param]) -> list[list[Param]]:
    """The optimizer's groups in order (optim.param_groups with drop_empty): per role, decay (>= 2-d) then not."""
    groups = []
    for params in (always, active):
        groups.append([p for p in params if len(p.shape) >= 2])
        groups.append([p for p in params if len(p.shape) < 2])
    return [g for g in groups if g]


def _zero12_partition(group: list[Param], world: int) -> int:
    numel = sum(p.numel for p in group)
    align = NCCL_ALIGNMENT * world
    return -(-numel // align) * align // world


def _zero2_grad_numel(group: list[Param], world: int, rank: int) -> int:
    """Numel of the params of `group` that overlap `rank`'s partition (their whole size: DeepSpeed copies each)."""
    part = _zero12_partition(group, world)
    start, end, offset, total = rank * part, (rank + 1) * part, 0, 0
    for p in group:
        if offset < end and offset + p.numel > start:
            total += p.numel
        offset += p.numel
    return total


# -- the model --------------------------------------------------------------------------------------------------


def _roles(
    shapes: ModelShapes, method: str, active: Sequence[int], train_embeddings: bool = True, always_frozen: bool = False
) -> tuple[list[Param], list[Param], list[Param]]:
    """(trainable params, params with optimizer state, params stored as frozen) of `method`."""
    every = [p for layer in shapes.layers for p in layer]
    if method in ("lora", "qlora"):
        return shapes.lora, shapes.lora, shapes.always + every + shapes.frozen
    # Stored like a frozen embedding: a vision tower, the input embedding with lisa.train_embeddings=false, and
    # every always-trained param with optim.always_lr_scale=0.
    frozen_embedding = _frozen_outside(shapes, train_embeddings, always_frozen)
    always = [p for p in shapes.always if p not in frozen_embedding]
    if method == "full":
        return always + every, always + every, frozen_embedding
    chosen = set(active)
    on = [p for i in active for p in shapes.layers[i]]  # the optimizer's order
    off = [p for i, layer in enumerate(shapes.layers) if i not in chosen for p in layer]
    if method == "lisa":
        return always + on, always + on, frozen_embedding + off
    if method == "naive_lisa":  # one AdamW over everything: after enough switches every layer has moments
        return always + on, always + every, frozen_embedding + off
    raise ConfigError(f"method={method!r}: allowed values are {', '.join(METHODS)}")


def _frozen_outside(shapes: ModelShapes, train_embeddings: bool, always_frozen: bool) -> list[Param]:
    """The params outside the decoder layers that LISA and full fine-tuning never train: a vision tower, the input
    embedding without lisa.train_embeddings, every always-trained param with optim.always_lr_scale=0."""
    if always_frozen:
        return shapes.frozen + shapes.always
    return shapes.frozen + ([] if train_embeddings else shapes.embedding)


def estimate(shapes: ModelShapes, method: str, setup: Setup, active: Sequence[int] | None = None) -> Breakdown:
    """Bytes one rank holds for `method` under `setup`. `active`: the LISA layers (default: the gamma largest)."""
    if method == "naive_lisa" and setup.backend in NAIVE_UNSUPPORTED:
        return Breakdown(supported=False, note="the reference callbacks do not run under FSDP or ZeRO-3")
    if method in ("lora", "qlora") and not shapes.lora:
        raise ConfigError("LoRA needs shapes built with a LoRA rank (shapes_of(..., lora_r=r))")
    if active is None:  # the gamma largest layers (all layers of a Llama are the same size)
        sizes = [sum(p.numel for p in layer) for layer in shapes.layers]
        active = sorted(range(len(sizes)), key=lambda i: -sizes[i])[: setup.gamma]
    if method == "qlora" and setup.backend.startswith("zero"):
        return Breakdown(supported=False, note="QLoRA's NF4 base is not partitioned by DeepSpeed ZeRO here")
    trainable, with_state, frozen = _roles(shapes, method, active, setup.train_embeddings, setup.always_lr_scale == 0)
    out = _state(shapes, method, setup, trainable, with_state, frozen)
    out.activations = activation_bytes(shapes, setup)
    out.buffers = _buffers(shapes, setup, trainable)
    out.runtime = runtime_bytes(setup)
    return out


def _state(
    shapes: ModelShapes, method: str, s: Setup, trainable: list[Param], with_state: list[Param], frozen: list[Param]
) -> Breakdown:
    storage = DTYPE_BYTES[s.param_dtype]
    b = s.backend
    # The adapters exist only in a LoRA run (the shapes may carry them for the LoRA row of the same table).
    adapters = shapes.lora if method in ("lora", "qlora") else []
    if b in ("local", "ddp", "fsdp"):
        shards = s.world_size // s.replicate if b == "fsdp" else 1
        stored = _stored_bytes(shapes, method, s, frozen)
        every = shapes.always + shapes.frozen + [p for layer in shapes.layers for p in layer] + adapters
        eight_bit = _eight_bit(shapes, s)
        return Breakdown(
            params=sum(stored(p, _local_shape(p, shards, s.rank, padded=True)) for p in every),
            grads=sum(math.prod(_local_shape(p, shards, s.rank, padded=True)) for p in trainable) * storage,
            moments=sum(
                _moment_bytes(math.prod(_local_shape(p, shards, s.rank, padded=False)), eight_bit(p), storage)
                for p in with_state
            ),
            host=_host_bytes(shapes, method, s, frozen, shards),
        )
    # DeepSpeed: in bf16 mode the engine stores every param in bf16; masters and moments are fp32 partitions.
    ds_storage = 2 if s.precision == "bf16" else storage
    every = shapes.always + shapes.frozen + [p for layer in shapes.layers for p in layer] + adapters
    if b in ("zero1", "zero2"):
        always_names = {p.name for p in shapes.always + adapters}
        always = [p for p in with_state if p.name in always_names]
        layers = [p for p in with_state if p.name not in always_names]
        partitions = sum(_zero12_partition(g, s.world_size) for g in _groups(always, layers))
        # After the boundary backward both stages keep only the gradients of the params that overlap this rank's
        # partitions (whole params; ZeRO-1 too clears param.grad), sized for every param with optimizer state.
        grads = sum(_zero2_grad_numel(g, s.world_size, s.rank) for g in _groups(always, layers))
        # The params with optimizer state become views into one flat buffer per group, padded like the partitions.
        stated = {p.name for p in with_state}
        params = sum(p.numel for p in every if p.name not in stated) + partitions * s.world_size
        return Breakdown(
            params=params * ds_storage, grads=grads * ds_storage, masters=partitions * 4, moments=2 * partitions * 4
        )
    part = sum(_zero3_numel(p, s.world_size) for p in with_state)
    # ZeRO-3 means to reuse fp32 param partitions as masters, but compares a tensor's device with a device name
    # (never equal; DeepSpeed 0.19): the fp32 copy is made in fp32 training too.
    out = Breakdown(
        params=sum(_zero3_numel(p, s.world_size) for p in every) * ds_storage,
        grads=part * ds_storage,
        masters=part * 4,
        moments=2 * part * 4,
    )
    if b == "zero3_offload":  # masters, moments and the gradient partitions live in (pinned) CPU memory
        out.host, out.masters, out.moments, out.grads = out.masters + out.moments + out.grads, 0, 0, 0
    return out


def _local_shape(p: Param, shards: int, rank: int, padded: bool) -> tuple[int, ...]:
    """`p`'s shape on `rank` under FSDP2's dim-0 chunking over `shards` (1: the whole param)."""
    if shards == 1 or not p.shape:
        return p.shape if shards == 1 else (_fsdp_rows(p, shards, rank, padded),)
    rows = _fsdp_rows(p, shards, rank, padded) // max(1, p.numel // p.shape[0])
    return (rows, *p.shape[1:])


def _stored_bytes(shapes: ModelShapes, method: str, s: Setup, frozen: list[Param]):
    """Bytes of a param (or of its `shape` shard) as this method stores it: trainable ones in model.dtype; LISA's
    frozen layers per lisa.frozen_storage (int8/nf4: torchao's format for matrices, the rest in model.dtype) and a
    frozen embedding like them (`method.frozen_embedding_dtype`); LoRA's base in the same exact dtype; QLoRA's
    layer matrices in NF4, the rest of its base in bf16."""
    storage = DTYPE_BYTES[s.param_dtype]
    layer_names = {p.name for layer in shapes.layers for p in layer}
    # Stored by `freeze_outside` (the always-trained params too when optim.always_lr_scale=0 freezes them).
    embedding = {p.name for p in shapes.embedding + _frozen_outside(shapes, True, s.always_lr_scale == 0)}
    frozen_names = {p.name for p in frozen}
    exact = s.frozen_storage if s.frozen_storage not in QUANTIZED else "bfloat16"
    base = min(storage, DTYPE_BYTES[exact])
    lora = {p.name for p in shapes.lora}

    def stored(p: Param, shape: tuple[int, ...]) -> int:
        numel = math.prod(shape)
        if method in ("lora", "qlora") and p.name not in lora:
            if method == "qlora":
                quantized = p.name in layer_names and quantizable(p.shape, "nf4")
                return quantized_bytes(shape, "nf4") if quantized else 2 * numel
            return base * numel
        if p.name not in frozen_names or s.frozen_storage == "float32":
            return storage * numel
        if p.name in embedding:
            return (2 if s.precision == "bf16" else storage) * numel
        if s.frozen_storage == "bfloat16":
            return 2 * numel
        # Under FSDP each rank quantizes its padded shard (`shape`).
        return quantized_bytes(shape, s.frozen_storage) if quantizable(shape, s.frozen_storage) else storage * numel

    return stored


def _host_bytes(shapes: ModelShapes, method: str, s: Setup, frozen: list[Param], shards: int) -> int:
    """int8/nf4: the exact host copies of the quantized matrices (lisa.host_dtype): on one rank of every layer's;
    under FSDP this rank's padded shards of the frozen layers' (an active block's live on the device)."""
    if method in ("lora", "qlora") or s.frozen_storage not in QUANTIZED:
        return 0
    if s.backend == "local":
        candidates = [p for layer in shapes.layers for p in layer]
    else:
        layer_names = {p.name for layer in shapes.layers for p in layer}
        candidates = [p for p in frozen if p.name in layer_names]
    shards_of = [_local_shape(p, shards, s.rank, padded=True) for p in candidates]
    return (
        sum(math.prod(shape) for shape in shards_of if quantizable(shape, s.frozen_storage)) * DTYPE_BYTES[s.host_dtype]
    )


def _eight_bit(shapes: ModelShapes, s: Setup):
    """Whether optim.adam_8bit gives a param 8-bit moments (its role; the size rule is `_moment_bytes`')."""
    always = {p.name for p in shapes.always + shapes.lora}
    return lambda p: s.adam_8bit == "all" or (s.adam_8bit == "always" and p.name in always)


def _moment_bytes(numel: int, eight_bit: bool, dtype_bytes: int) -> int:
    """exp_avg and exp_avg_sq of a param (this rank's `numel` elements): torchao's 8-bit state (codes, an fp32
    scale per 256-element block, a 256-entry fp32 lookup table) for params of at least 4,096 elements in whole
    blocks, else two tensors in the param's dtype."""
    if eight_bit and numel >= ADAM8_MIN and numel % ADAM8_BLOCK == 0:
        return 2 * (numel + 4 * (numel // ADAM8_BLOCK) + 4 * ADAM8_QMAP)
    return 2 * numel * dtype_bytes


def activation_bytes(shapes: ModelShapes, s: Setup) -> int:
    """ESTIMATE of the tensors autograd saves for one micro-batch of a Llama-style model with SDPA attention.

    Per token and layer: 2 RMSNorms (input and output each, 4h), q after RoPE and the attention output (2h), k and
    v (2 kv_dim), the MLP's gate, up, SiLU and product (4 intermediate), in the compute dtype, plus SDPA's fp32
    log-sum-exp per head. With activation checkpointing only each block's input stays (h per layer), plus one
    block's full set while it is recomputed. The head adds the logits (compute dtype), their fp32 copy under bf16
    compute, and the fp32 log-softmax. Frozen layers under LISA save a little less (no inputs of frozen
    matmuls); the estimate does not count that.
    """
    tokens = s.micro_batch * s.seq_len
    compute = 2 if s.precision == "bf16" else DTYPE_BYTES[s.param_dtype]
    h, kv, inter, heads = shapes.hidden, shapes.kv_dim, shapes.intermediate, shapes.heads
    per_layer = tokens * ((6 * h + 2 * kv + 4 * inter) * compute + 4 * heads)
    layers = len(shapes.layers)
    if s.activation_checkpointing:
        body = layers * tokens * h * compute + per_layer
    else:
        body = layers * per_layer
    # The chunked loss holds the logits of one chunk of tokens at a time (recomputed in backward).
    logit_tokens = min(tokens, s.loss_chunk_tokens) if s.loss_chunk_tokens else tokens
    # Padded rows (more than one per micro-batch): SDPA's boolean mask, micro-batch x seq_len^2, lives through
    # the forward and backward.
    mask = s.micro_batch * s.seq_len * s.seq_len if s.micro_batch > 1 else 0
    return body + mask + logit_tokens * shapes.vocab * (compute + (4 if compute != 4 else 0) + 4)


CUDA_CONTEXT = 600 * 1024**2
"""ESTIMATE: the CUDA context with torch's kernels loaded lazily (about 500-600 MiB on an H100 with CUDA 12/13)."""
CUBLAS_WORKSPACES = 2 * 32 * 1024**2
"""ESTIMATE: cuBLAS and cuBLASLt workspaces of the compute stream (32 MiB each on Hopper)."""
NCCL_COMMUNICATOR = 512 * 1024**2
"""ESTIMATE: one NCCL communicator's channel buffers (NCCL_BUFFSIZE 4 MiB x send and receive x its channels, up
to 32 on NVLink) and its proxy state; NCCL_BUFFSIZE and NCCL_MAX_NCHANNELS move it."""


def runtime_bytes(s: Setup) -> int:
    """ESTIMATE of what a CUDA process holds besides the tensors above: the context, cuBLAS's workspaces, and one
    NCCL communicator per process group that runs collectives on the device (FSDP: one, HSDP: the shard and the
    replicate groups; DeepSpeed clones the world group: two; one rank: none)."""
    if s.world_size == 1:
        communicators = 0
    elif s.backend.startswith("zero") or (s.backend == "fsdp" and s.replicate > 1):
        communicators = 2
    else:
        communicators = 1
    return CUDA_CONTEXT + CUBLAS_WORKSPACES + communicators * NCCL_COMMUNICATOR


def _buffers(shapes: ModelShapes, s: Setup, trainable: list[Param]) -> int:
    """ESTIMATE of working buffers: FSDP's unsharded units (the current and the prefetched block in the compute
    dtype, the head unit kept unsharded through backward, one unsharded block gradient); DeepSpeed's reduce
    bucket (its default 5e8 elements, capped by the trainable params) and, for ZeRO-3, two gathered blocks;
    DDP's gradient buckets (one more copy of the gradients)."""
    compute = 2 if s.precision == "bf16" else DTYPE_BYTES[s.param_dtype]
    block = max((sum(p.numel for p in layer) for layer in shapes.layers), default=0)
    trainable_numel = sum(p.numel for p in trainable)
    if s.backend == "ddp":
        return trainable_numel * DTYPE_BYTES[s.param_dtype]
    if s.backend == "fsdp":
        head = max((p.numel for p in shapes.always), default=0)
        return (2 * block + head) * compute + block * 4
    if s.backend.startswith("zero"):
        bucket = min(DS_BUCKET, trainable_numel) * (2 if s.precision == "bf16" else 4)
        return bucket + (2 * block * compute if s.backend.startswith("zero3") else 0)
    return 0


# -- the table ---------------------------------------------------------------------------------------------------


def plan(shapes: ModelShapes, setup: Setup, methods: Sequence[str] = METHODS) -> dict[str, Breakdown]:
    return {m: estimate(shapes, m, setup) for m in methods}


def longest_seq_len(
    shapes: ModelShapes,
    setup: Setup,
    method: str,
    gpu_gib: float,
    headroom: float = 0.9,
    step: int = 256,
    limit: int = 1 << 20,
) -> int:
    """The longest sequence (a multiple of `step` tokens, micro-batch as in `setup`) at which `method`'s GPU total
    (the CUDA runtime included) fits `headroom` of `gpu_gib`; 0 when not even `step` tokens fit."""
    budget = gpu_gib * GIB * headroom

    def fits(blocks: int) -> bool:
        b = estimate(shapes, method, dataclasses.replace(setup, seq_len=blocks * step))
        return b.supported and b.gpu_total <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while high * step <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * step


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _lean(s: Setup) -> str:
    """The memory options of `s`, in words, for the table's heading."""
    host = f" (exact host copies {s.host_dtype})" if s.frozen_storage in QUANTIZED else ""
    base = s.frozen_storage if s.frozen_storage not in QUANTIZED else "bfloat16"
    return (
        f"frozen layers {s.frozen_storage}{host}, LoRA base {base}, embeddings "
        f"{'trained' if s.train_embeddings else 'frozen'}, 8-bit Adam {s.adam_8bit}, "
        f"loss {f'chunked by {s.loss_chunk_tokens} tokens' if s.loss_chunk_tokens else 'plain'}"
    )


def table(
    shapes: ModelShapes, setup: Setup, gpu_gib: float, headroom: float = 0.9, methods: Sequence[str] = METHODS
) -> str:
    """A markdown table of every method for `setup`, and which fit `gpu_gib` (using `headroom` of it)."""
    rows = plan(shapes, setup, methods)
    budget = gpu_gib * GIB * headroom
    hsdp = f" (HSDP, {setup.replicate} replicas)" if setup.replicate > 1 else ""
    lines = [
        f"{shapes.name}: {shapes.num_params / 1e9:.2f}B params ({len(shapes.layers)} layers), backend "
        f"{setup.backend}, {setup.world_size} GPU(s){hsdp}"
        f", {setup.precision}, weights {setup.param_dtype}, {_lean(setup)}; LISA gamma {setup.gamma}, "
        f"LoRA r {setup.lora_r}; micro-batch {setup.micro_batch} x {setup.seq_len} tokens, activation "
        f"checkpointing {'on' if setup.activation_checkpointing else 'off'}. GiB per rank.",
        "",
        "| method | params | grads | fp32 masters | Adam moments | state | activations (est.) | buffers (est.) "
        f"| allocated | CUDA runtime (est.) | total | host (CPU) | fits {gpu_gib:g} GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, b in rows.items():
        if not b.supported:
            lines.append(f"| {METHOD_NAMES[method]} |" + " - |" * 11 + f" fails: {b.note} |")
            continue
        fits = "yes" if b.gpu_total <= budget else "no"
        lines.append(
            f"| {METHOD_NAMES[method]} | {gib(b.params)} | {gib(b.grads)} | {gib(b.masters)} | "
            f"{gib(b.moments)} | {gib(b.state)} | {gib(b.activations)} | {gib(b.buffers)} | "
            f"{gib(b.device_total)} | {gib(b.runtime)} | {gib(b.gpu_total)} | {gib(b.host)} | {fits} |"
        )
    lines += [
        "",
        f"Fits: total <= {headroom:.0%} of the GPU's memory (the rest for the caching allocator's "
        "fragmentation; `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` keeps it small across LISA "
        "switches). params, grads, masters and moments are exact; activations, buffers and the CUDA "
        "runtime (context, cuBLAS workspaces, NCCL communicators) are estimates. Allocated: what torch's "
        "max_memory_allocated should read.",
    ]
    return "\n".join(lines)
