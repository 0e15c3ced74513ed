"""Models: loading by name, tiny presets, weight sources, the layout (which modules are the decoder layers and
which are always trained), activation checkpointing, compilation per block and the loss."""
from lisa_dist.models.ac import apply_activation_checkpointing
from lisa_dist.models.compile import CompileWatch, compile_blocks, compiled_graphs
from lisa_dist.models.embedding import lookup_without_grad
from lisa_dist.models.layout import FAMILIES, ModelLayout, find_layout, resolve_path
from lisa_dist.models.loading import build_skeleton, load_model, open_model
from lisa_dist.models.loss import IGNORE_INDEX, lm_loss_sum, supervised_tokens, to_device
from lisa_dist.models.presets import PRESETS, build_preset, preset_config, tiny_config
from lisa_dist.models.tokenizer import byte_tokenizer
from lisa_dist.models.weights import (
    SafetensorsWeights,
    WeightSource,
    allocate,
    load_rows_into,
    materialize_full,
    require_complete,
    share_tied,
)

__all__ = [
    "CompileWatch",
    "FAMILIES",
    "IGNORE_INDEX",
    "ModelLayout",
    "PRESETS",
    "SafetensorsWeights",
    "WeightSource",
    "allocate",
    "apply_activation_checkpointing",
    "build_preset",
    "build_skeleton",
    "byte_tokenizer",
    "compile_blocks",
    "compiled_graphs",
    "find_layout",
    "lm_loss_sum",
    "load_model",
    "lookup_without_grad",
    "load_rows_into",
    "materialize_full",
    "open_model",
    "preset_config",
    "require_complete",
    "resolve_path",
    "share_tied",
    "supervised_tokens",
    "tiny_config",
    "to_device",
]
