"""The method: which layers train when (the LISA sampler, grad-norm importance), what each method trains (the
trainable set, LoRA), how the frozen layers are stored (cast or quantized, with exact host copies) and AdamW (or
8-bit AdamW) over it."""

from lisa_dist.method.frozen import (
    FrozenStore,
    dequantize,
    freeze_outside,
    frozen_embedding_dtype,
    quantizable,
    quantize,
    quantized_bytes,
)
from lisa_dist.method.importance import GradNormImportance
from lisa_dist.method.optim import (
    ALWAYS,
    NamedParams,
    TrainableSet,
    adamw_kernel,
    build_adamw,
    clip_grad_norm,
    freeze_except_always,
    layer_sq_norms,
    load_named_optimizer_state,
    lr_at,
    measured_state,
    moment_bytes,
    named_optimizer_state,
    param_groups,
    set_active_params,
    set_lr,
    set_requires_grad,
    storage_bytes,
)
from lisa_dist.method.pinned import HostBuffer, PinnedShards
from lisa_dist.method.sampler import LayerSampler
from lisa_dist.method.trainable import apply_lora, layer_named_params, lisa_trainable

__all__ = [
    "ALWAYS",
    "FrozenStore",
    "GradNormImportance",
    "HostBuffer",
    "LayerSampler",
    "NamedParams",
    "PinnedShards",
    "TrainableSet",
    "adamw_kernel",
    "apply_lora",
    "build_adamw",
    "clip_grad_norm",
    "dequantize",
    "freeze_except_always",
    "freeze_outside",
    "frozen_embedding_dtype",
    "layer_named_params",
    "layer_sq_norms",
    "lisa_trainable",
    "load_named_optimizer_state",
    "lr_at",
    "measured_state",
    "moment_bytes",
    "named_optimizer_state",
    "param_groups",
    "quantizable",
    "quantize",
    "quantized_bytes",
    "set_active_params",
    "set_lr",
    "set_requires_grad",
    "storage_bytes",
]
