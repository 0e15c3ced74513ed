"""Tiny randomly initialised models, built from configs in code: for tests and the demo, no download needed."""

from __future__ import annotations

import difflib
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
# A vision-language model's vision tower (SigLIP's names): 32-pixel images in 4 x 4 patches of 8, one layer...
_TINY_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
# ...and its projector: Gemma-3 pools the patch grid to sqrt(mm_tokens_per_image) tokens a side.
_TINY_MULTIMODAL: dict[str, Any] = {"mm_tokens_per_image": 4}


def tiny_config(model_type: str, num_layers: int = 2, **overrides: Any) -> PretrainedConfig:
    """A small config of any Hugging Face causal-LM family (hidden 64, 4 heads, byte-tokenizer vocabulary).

    `overrides` are further config fields, applied at construction so that derived fields (per-layer attention
    types, say) follow them. A vision-language family (a config with a `text_config`: gemma3) gets these sizes in
    its text config and a one-layer vision tower of width 32; there an override goes to each of the two configs
    that has the field. Raises ConfigError naming any field the family's config does not have.
    """
    default = AutoConfig.for_model(model_type)
    text = default.get_text_config()
    top = _known(default, overrides) if text is not default else {}
    inner = _known(text, overrides)
    unknown = [key for key in overrides if key not in top and key not in inner]
    if unknown:
        raise ConfigError(unknown_fields(default, unknown))
    fields = _own_names(text, _tiny_text(text, num_layers) | inner)
    if text is default:
        return AutoConfig.for_model(model_type, **fields)
    nested = {"text_config": {"model_type": text.model_type, **fields}, **_known(default, _TINY_MULTIMODAL)}
    vision = getattr(default, "vision_config", None)
    if vision is not None:
        nested["vision_config"] = {"model_type": vision.model_type, **_known(vision, _TINY_VISION)}
    return AutoConfig.for_model(model_type, **_own_names(default, nested | top))


def _tiny_text(config: PretrainedConfig, num_layers: int) -> dict[str, Any]:
    """The tiny sizes a (text) config knows, `num_layers` blocks and the byte tokenizer's vocabulary."""
    tokenizer = byte_tokenizer()
    return _known(config, _TINY_SIZES) | dict(
        num_hidden_layers=num_layers,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _known(config: PretrainedConfig, fields: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if hasattr(config, key)}


def _own_names(config: PretrainedConfig, fields: dict[str, Any]) -> dict[str, Any]:
    # Key by the family's own names (gpt2: n_layer for num_hidden_layers) so an override replaces, never duplicates.
    aliases = getattr(config, "attribute_map", {})
    return {aliases.get(key, key): value for key, value in fields.items()}


def unknown_fields(config: PretrainedConfig, keys: list[str]) -> str:
    """What is wrong with `keys`, fields `config` lacks: each with the closest names it has."""
    known = sorted({*config.to_dict(), *getattr(config, "attribute_map", {})})
    named = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
        named.append(f"{key!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    return f"{type(config).__name__} has no field {', '.join(named)}"


def override_config(
    config: PretrainedConfig, raw: dict[str, Any], overrides: dict[str, Any], source: str
) -> PretrainedConfig:
    """`config` built again from its file's fields `raw` with `overrides` on top, so that fields derived at
    construction (per-layer attention types, say) follow them; a nested config's fields are merged."""
    unknown = [key for key in overrides if not hasattr(config, key)]
    if unknown:
        raise ConfigError(f"model.config_overrides of {source}: {unknown_fields(config, unknown)}")
    fields = dict(raw)
    for key, value in overrides.items():
        nested = isinstance(getattr(config, key), PretrainedConfig) and isinstance(value, dict)
        fields[key] = {**(fields.get(key) or getattr(config, key).to_dict()), **value} if nested else value
    try:
        return type(config).from_dict(fields)
    except (ValueError, TypeError, StrictDataclassError) as exc:  # transformers validates the fields
        raise ConfigError(f"model.config_overrides of {source}: {_one_line(exc)}") from None


# Llama 3.1-3.3's rope scaling (the 128K-context frequency remap), at a tiny original context.
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


PRESETS: dict[str, Callable[..., PretrainedConfig]] = {
    "tiny-llama": partial(tiny_config, "llama", 4, tie_word_embeddings=False),
    # Llama 3.2 1B/3B: tied head, llama3 rope scaling (3.1 8B and 70B untie the head).
    "tiny-llama3": partial(tiny_config, "llama", 4, tie_word_embeddings=True, rope_parameters=_LLAMA3_ROPE),
    "tiny-mistral": partial(tiny_config, "mistral", 4),
    "tiny-mixtral": partial(tiny_config, "mixtral", 4),
    "tiny-qwen2": partial(tiny_config, "qwen2", 4),
    "tiny-qwen3": partial(tiny_config, "qwen3", 4),
    "tiny-qwen3-moe": partial(tiny_config, "qwen3_moe", 4),
    "tiny-gemma2": partial(tiny_config, "gemma2", 4),
    "tiny-gemma3": partial(tiny_config, "gemma3_text", 4),
    # Gemma-3 4B-27B: the language model under a (frozen) SigLIP vision tower.
    "tiny-gemma3-vl": partial(tiny_config, "gemma3", 4),
    "tiny-olmo2": partial(tiny_config, "olmo2", 4),
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
        raise ConfigError(f"model.config_overrides of {name}: {_one_line(exc)}") from None


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
