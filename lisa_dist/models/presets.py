"""Tiny randomly initialised models, built from configs in code: for tests and the demo, no download needed."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from lisa_dist.errors import ConfigError
from lisa_dist.models.tokenizer import byte_tokenizer

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Small sizes under every name the families use; a family gets only those its config knows (`_known_kwargs`).
_TINY_SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "n_inner": 128,  # gpt2
    "ffn_dim": 128,  # opt
    "word_embed_proj_dim": 64,  # opt: equal to hidden_size, so no project_in/project_out
    "max_position_embeddings": 2048,
    "num_local_experts": 4,  # mixtral
    "num_experts": 4,  # qwen2_moe, qwen3_moe
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 128,
}


def tiny_config(model_type: str, num_layers: int = 2, **overrides: Any) -> PretrainedConfig:
    """A small config of any Hugging Face causal-LM family (hidden 64, 4 heads, byte-tokenizer vocabulary).

    `overrides` are further config fields, applied at construction so that derived fields (per-layer attention
    types, say) follow them. Raises ConfigError naming any field the family's config does not have.
    """
    default = AutoConfig.for_model(model_type)
    unknown = [key for key in overrides if not hasattr(default, key)]
    if unknown:
        raise ConfigError(f"{type(default).__name__} has no field {', '.join(map(repr, unknown))}")
    tokenizer = byte_tokenizer()
    fields = {key: value for key, value in _TINY_SIZES.items() if hasattr(default, key)}
    fields.update(
        num_hidden_layers=num_layers,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    fields.update(overrides)
    # Key by the family's own names (gpt2: n_layer for num_hidden_layers) so an override replaces, never duplicates.
    aliases = getattr(default, "attribute_map", {})
    return AutoConfig.for_model(model_type, **{aliases.get(key, key): value for key, value in fields.items()})


PRESETS: dict[str, Callable[..., PretrainedConfig]] = {
    "tiny-llama": partial(tiny_config, "llama", 4, tie_word_embeddings=False),
    "tiny-mistral": partial(tiny_config, "mistral", 4),
    "tiny-mixtral": partial(tiny_config, "mixtral", 4),
    "tiny-qwen2": partial(tiny_config, "qwen2", 4),
    "tiny-qwen3": partial(tiny_config, "qwen3", 4),
    "tiny-gemma2": partial(tiny_config, "gemma2", 4),
    "tiny-phi3": partial(tiny_config, "phi3", 4),
    "tiny-gpt2": partial(tiny_config, "gpt2", 4),
    "tiny-gpt-neox": partial(tiny_config, "gpt_neox", 4),
    "tiny-opt": partial(tiny_config, "opt", 4),
}
"""Preset name -> config factory; keyword arguments override config fields."""


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """'float32' or 'bfloat16' (or a torch dtype, returned as is)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in TORCH_DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not allowed: expected one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def preset_config(name: str, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    """The config of preset `name` with `overrides` applied; ConfigError for an unknown name or field."""
    if name not in PRESETS:
        raise ConfigError(f"model.name={name!r} is not a preset: expected one of {', '.join(PRESETS)}")
    try:
        return PRESETS[name](**(overrides or {}))
    except (ConfigError, ValueError, TypeError, StrictDataclassError) as exc:  # transformers validates the fields
        raise ConfigError(f"model.preset_overrides of {name}: {_one_line(exc)}") from None


def _one_line(exc: Exception) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def build_preset(
    name: str, overrides: dict[str, Any] | None = None, seed: int = 0, dtype: str | torch.dtype = "float32"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Build preset `name` with random weights and the byte tokenizer; the same seed gives bitwise the same weights.

    Weights are drawn in float32 and then cast, so a bfloat16 build is the rounded float32 one. The caller's RNG
    state is left untouched.
    """
    config = preset_config(name, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(torch_dtype(dtype)), byte_tokenizer()
