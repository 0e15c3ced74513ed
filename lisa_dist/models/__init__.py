"""Models: loading by name, tiny presets, the published configs of hub models (offline), weight sources, the layout
(which modules are the decoder layers and which are always trained), Hugging Face folders written a shard at a time,
activation checkpointing, compilation per block and the loss."""

from lisa_dist.models.ac import apply_activation_checkpointing
from lisa_dist.models.compile import CompileWatch, compile_blocks, compiled_graphs
from lisa_dist.models.embedding import lookup_without_grad
from lisa_dist.models.hub_configs import HUB_CONFIGS, MODEL_ALIASES, hub_config, hub_id
from lisa_dist.models.layout import FAMILIES, ModelLayout, find_layout, frozen_modules, resolve_path
from lisa_dist.models.loading import build_skeleton, generation_config, load_model, open_model, source_dtype
from lisa_dist.models.loss import IGNORE_INDEX, lm_loss_sum, supervised_tokens, to_device
from lisa_dist.models.presets import PRESETS, build_preset, override_config, preset_config, tiny_config
from lisa_dist.models.saving import (
    EXPORT_DTYPES,
    Fetch,
    FolderSpec,
    export_dtype,
    human_bytes,
    is_adapter_model,
    save_hf_folder,
    saved_names,
)
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
    "EXPORT_DTYPES",
    "FAMILIES",
    "HUB_CONFIGS",
    "IGNORE_INDEX",
    "MODEL_ALIASES",
    "PRESETS",
    "CompileWatch",
    "Fetch",
    "FolderSpec",
    "ModelLayout",
    "SafetensorsWeights",
    "WeightSource",
    "allocate",
    "apply_activation_checkpointing",
    "build_preset",
    "build_skeleton",
    "byte_tokenizer",
    "compile_blocks",
    "compiled_graphs",
    "export_dtype",
    "find_layout",
    "frozen_modules",
    "generation_config",
    "hub_config",
    "hub_id",
    "human_bytes",
    "is_adapter_model",
    "lm_loss_sum",
    "load_model",
    "load_rows_into",
    "lookup_without_grad",
    "materialize_full",
    "open_model",
    "override_config",
    "preset_config",
    "require_complete",
    "resolve_path",
    "save_hf_folder",
    "saved_names",
    "share_tied",
    "source_dtype",
    "supervised_tokens",
    "tiny_config",
    "to_device",
]
