"""Models: loading by name, tiny presets, weight sources, and the layout (decoder layers vs always-trained)."""
from lisa_dist.models.layout import ModelLayout, find_layout
from lisa_dist.models.loading import build_skeleton, load_model, open_model
from lisa_dist.models.presets import PRESETS, build_preset
from lisa_dist.models.tokenizer import byte_tokenizer
from lisa_dist.models.weights import SafetensorsWeights, WeightSource, materialize_full

__all__ = [
    "PRESETS", "ModelLayout", "SafetensorsWeights", "WeightSource", "build_preset", "build_skeleton",
    "byte_tokenizer", "find_layout", "load_model", "materialize_full", "open_model",
]
