"""Models: loading by name, tiny presets, and the layout (decoder layers vs always-trained modules)."""
from lisa_dist.models.layout import ModelLayout, find_layout
from lisa_dist.models.loading import load_model
from lisa_dist.models.presets import PRESETS, build_preset
from lisa_dist.models.tokenizer import byte_tokenizer

__all__ = ["PRESETS", "ModelLayout", "build_preset", "byte_tokenizer", "find_layout", "load_model"]
