"""The published Hugging Face configs of the models the recipes (`configs/recipes/`) and the planner's short names
use, offline: each entry is the part of the hub model's `config.json` that shapes the model (its sizes, the tie,
positions, RoPE, norms, activation, dtype; Gemma-3's nested text and vision configs), with the values published.

`hub_config(model_id)` builds a transformers config from an entry with `AutoConfig.for_model`, so that a recipe's
model can be built on the meta device, laid out and planned without a download. Values were read from the hub's
config.json files as quoted by public code (docs/recipes.md names the sources) and cross-checked against the
parameter counts transformers builds from them (tests/unit/test_recipes.py).
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from lisa_dist.errors import ConfigError

_LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


def _llama(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    positions: int,
    rope_theta: float,
    rms_norm_eps: float = 1e-5,
    rope_scaling: dict | None = None,
    dtype: str = "bfloat16",
) -> dict[str, Any]:
    """A Llama config.json's shape fields (Llama-2, Llama-3 and Llama-3.1 publish the same keys)."""
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "max_position_embeddings": positions,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "rms_norm_eps": rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }


_QWEN25_7B = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "max_window_layers": 28,
    "torch_dtype": "bfloat16",
}
_MISTRAL_7B = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
}

HUB_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B-Instruct": _llama(
        4096, 14336, 32, 32, 8, 128256, 131072, 500000.0, rope_scaling=_LLAMA31_ROPE
    ),
    "meta-llama/Llama-3.1-70B": _llama(8192, 28672, 80, 64, 8, 128256, 131072, 500000.0, rope_scaling=_LLAMA31_ROPE),
    "meta-llama/Llama-3.1-70B-Instruct": _llama(
        8192, 28672, 80, 64, 8, 128256, 131072, 500000.0, rope_scaling=_LLAMA31_ROPE
    ),
    "meta-llama/Meta-Llama-3-8B": _llama(4096, 14336, 32, 32, 8, 128256, 8192, 500000.0),
    "meta-llama/Meta-Llama-3-70B": _llama(8192, 28672, 80, 64, 8, 128256, 8192, 500000.0),
    "meta-llama/Llama-2-7b-hf": _llama(4096, 11008, 32, 32, 32, 32000, 4096, 10000.0, dtype="float16"),
    "meta-llama/Llama-2-13b-hf": _llama(5120, 13824, 40, 40, 40, 32000, 4096, 10000.0, dtype="float16"),
    "meta-llama/Llama-2-70b-hf": _llama(8192, 28672, 80, 64, 8, 32000, 4096, 10000.0, dtype="float16"),
    "Qwen/Qwen2.5-7B-Instruct": {**_QWEN25_7B, "max_position_embeddings": 32768},
    "Qwen/Qwen2.5-7B": {**_QWEN25_7B, "max_position_embeddings": 131072},
    "Qwen/Qwen3-8B": {
        "model_type": "qwen3",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "use_sliding_window": False,
        "max_window_layers": 36,
        "torch_dtype": "bfloat16",
    },
    "mistralai/Mistral-7B-Instruct-v0.3": {
        **_MISTRAL_7B,
        "vocab_size": 32768,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
    },
    "mistralai/Mistral-7B-v0.1": {
        **_MISTRAL_7B,
        "vocab_size": 32000,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "torch_dtype": "bfloat16",
    },
    # The vision-language class (Gemma3ForConditionalGeneration); the text model's fields are those its config.json
    # publishes (hidden, intermediate, layers, heads, RoPE scaling, window) over Gemma3TextConfig's defaults of its
    # release, written out. The tie is Gemma's default (config.json does not state it).
    "google/gemma-3-12b-it": {
        "model_type": "gemma3",
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "boi_token_index": 255999,
        "eoi_token_index": 256000,
        "image_token_index": 262144,
        "mm_tokens_per_image": 256,
        "eos_token_id": [1, 106],
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 3840,
            "intermediate_size": 15360,
            "num_hidden_layers": 48,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 256,
            "vocab_size": 262208,
            "tie_word_embeddings": True,
            "max_position_embeddings": 131072,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
            "sliding_window_pattern": 6,
            "query_pre_attn_scalar": 256,
            "rms_norm_eps": 1e-6,
            "hidden_activation": "gelu_pytorch_tanh",
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 896,
            "patch_size": 14,
            "vision_use_head": False,
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu_pytorch_tanh",
        },
    },
}
"""Hub model id -> the fields of its config.json that shape the model, as published."""

MODEL_ALIASES: dict[str, str] = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
    "llama-3.1-70b-instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-instruct-v0.3": "mistralai/Mistral-7B-Instruct-v0.3",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "gemma-3-12b-it": "google/gemma-3-12b-it",
}
"""Short names (`lisa-dist estimate --model`) -> hub ids."""


def hub_id(name: str) -> str | None:
    """The hub id `name` is or stands for (a short name of MODEL_ALIASES), None when the registry does not know it."""
    name = MODEL_ALIASES.get(name, name)
    return name if name in HUB_CONFIGS else None


def hub_config(name: str) -> PretrainedConfig:
    """The transformers config of a known hub id or short name, built offline from its published fields."""
    model_id = hub_id(name)
    if model_id is None:
        raise ConfigError(
            f"{name!r} is not a hub model known offline (known: {', '.join(HUB_CONFIGS)}; short names: "
            f"{', '.join(MODEL_ALIASES)}); a local folder holding its config.json works for any model"
        )
    fields = copy.deepcopy(HUB_CONFIGS[model_id])
    return AutoConfig.for_model(fields.pop("model_type"), name_or_path=model_id, **fields)
