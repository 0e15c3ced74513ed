"""Turn `model.name` into a model and tokenizer: a preset, a `.gguf` file, a local folder or a hub id.

`open_model` builds only a skeleton (parameters on the meta device) plus a description of where its weights come
from, so that a backend can shard before it allocates; `load_model` is the single-process shortcut.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from huggingface_hub.errors import HFValidationError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from lisa_dist.config import ModelConfig, config_overrides_of
from lisa_dist.errors import ConfigError, first_line
from lisa_dist.models.presets import PRESETS, build_preset, override_config, preset_config, torch_dtype
from lisa_dist.models.saving import EXPORT_DTYPES
from lisa_dist.models.tokenizer import byte_tokenizer
from lisa_dist.models.weights import FullWeights, SafetensorsWeights, WeightSource, matches_model, materialize_full

log = logging.getLogger(__name__)


def open_model(
    cfg: ModelConfig,
    seed: int,
    empty_init: Callable[[], AbstractContextManager] | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase, WeightSource]:
    """The model `cfg` names as a skeleton without weights, its tokenizer, and where its weights come from.

    The skeleton is built under `empty_init()` (default: parameters on the meta device, buffers computed; a
    backend may pass its own, e.g. DeepSpeed's `zero.Init`). `seed` only matters for presets (their random init).
    `cfg.tokenizer`, when set, replaces the model's own tokenizer; a tokenizer without a pad token pads with eos.
    """
    dtype = torch_dtype(cfg.dtype)
    overrides = config_overrides_of(cfg)
    attention = overrides.pop("attn_implementation", cfg.attn_implementation)
    build = partial(
        build_skeleton,
        dtype=dtype,
        trust_remote_code=cfg.trust_remote_code,
        empty_init=empty_init,
        attn_implementation=attention,
    )
    if cfg.name in PRESETS:
        config = preset_config(cfg.name, overrides)
        tokenizer: PreTrainedTokenizerBase = byte_tokenizer()
        source: WeightSource = FullWeights(
            f"preset {cfg.name} (seed {seed})", lambda: build_preset(cfg.name, overrides, seed, dtype)[0]
        )
        skeleton = build(config)
    else:
        skeleton, tokenizer, source = _open_pretrained(cfg, overrides, dtype, build)
    if cfg.tokenizer is not None:
        tokenizer = _tokenizer(cfg.tokenizer, {"trust_remote_code": cfg.trust_remote_code}, field="model.tokenizer")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return skeleton, tokenizer, source


def load_model(cfg: ModelConfig, seed: int) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model `cfg` names, with its weights, in CPU memory (single process)."""
    skeleton, tokenizer, source = open_model(cfg, seed)
    return materialize_full(skeleton, source, torch.device("cpu")), tokenizer


def source_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype the model is published in (its config's `dtype`: bfloat16 for most hub models); model.dtype for a
    preset, a .gguf file or a config that names none. What an export writes unless told otherwise."""
    config = _published(cfg, AutoConfig)
    published = getattr(config, "dtype", None) if config is not None else None
    name = str(published).removeprefix("torch.") if published is not None else ""
    return EXPORT_DTYPES.get(name) or torch_dtype(cfg.dtype)


def generation_config(cfg: ModelConfig) -> GenerationConfig | None:
    """The model's published generation config (its eos ids and sampling defaults), None when it has none."""
    return _published(cfg, GenerationConfig)


def _published(cfg: ModelConfig, kind: Any) -> Any:
    """`kind.from_pretrained` of the folder or hub id cfg.name; None for a preset, a .gguf file or a failure."""
    if cfg.name in PRESETS or cfg.name.endswith(".gguf"):
        return None
    try:
        return kind.from_pretrained(cfg.name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return None


def build_skeleton(
    config: PretrainedConfig,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    empty_init: Callable[[], AbstractContextManager] | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    """The model of `config` without weights: by default its parameters on the meta device (no memory) and its
    buffers computed; `attn_implementation` (model.attn_implementation) as transformers names it."""
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        # Import the modeling module now: importing it inside DeepSpeed's zero.Init fails (its tensor patching).
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    try:
        model = _from_config(config, dtype, trust_remote_code, empty_init, attn_implementation)
    except (ImportError, ValueError) as exc:
        if not attn_implementation:
            raise
        reason = str(exc).splitlines()[0]
        if attn_implementation != "sdpa":
            raise ConfigError(
                f"model.attn_implementation={attn_implementation!r} is not available here: {reason} (eager always is)"
            ) from None
        # sdpa is the default: an architecture without it (Gemma2) runs what transformers picks for it.
        log.warning(
            "model.attn_implementation='sdpa': %s; using transformers' default for %s", reason, type(config).__name__
        )
        model = _from_config(config, dtype, trust_remote_code, empty_init, None)
    # Tie again outside the context: meta-device building (accelerate re-creates a parameter at every assignment)
    # leaves a tied head and embedding as two parameters, which would train, count and save twice.
    model.tie_weights()
    return model


def _from_config(
    config: PretrainedConfig,
    dtype: torch.dtype,
    trust_remote_code: bool,
    empty_init: Callable[[], AbstractContextManager] | None,
    attn_implementation: str | None,
) -> Any:
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    config = copy.deepcopy(config)  # from_config records the attention it tried on the config, failed or not
    with empty_init() if empty_init else init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **extra)


def _open_pretrained(
    cfg: ModelConfig, overrides: dict[str, Any], dtype: torch.dtype, build: Callable[[PretrainedConfig], nn.Module]
) -> tuple[nn.Module, Any, WeightSource]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    location = cfg.name
    if cfg.name.endswith(".gguf"):
        path = Path(cfg.name)
        if not path.is_file():
            raise ConfigError(f"model.name={cfg.name!r}: no such .gguf file")
        location, kwargs["gguf_file"] = str(path.parent), path.name
    if Path(location).is_dir() and "gguf_file" not in kwargs and not (Path(location) / "config.json").is_file():
        raise ConfigError(
            f"model.name={cfg.name!r}: cannot load a causal language model from it: the folder has no "
            "config.json (a Hugging Face model folder holds config.json, the weights and the tokenizer)"
        )
    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
        if overrides:
            raw, _ = PretrainedConfig.get_config_dict(location, **kwargs)
            config = override_config(config, raw, overrides, cfg.name)
    except (OSError, ValueError) as exc:
        raise _load_error(cfg.name, exc) from None
    skeleton = build(config)
    tokenizer = None if cfg.tokenizer else _tokenizer(location, kwargs, field="model.name")
    if "gguf_file" not in kwargs and Path(location).is_dir():
        files = SafetensorsWeights(location)
        if files.files and matches_model(files, skeleton):
            return skeleton, tokenizer, files
    # transformers' own loading: GGUF dequantization, renamed or fused checkpoint keys, hub downloads.
    load = partial(_from_pretrained, location, dtype, {**kwargs, "config": config} if overrides else kwargs)
    return skeleton, tokenizer, FullWeights(f"from_pretrained({cfg.name})", load)


def _from_pretrained(location: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(location, exc) from None


def _load_error(name: str, exc: Exception) -> ConfigError:
    # OSError / HFValidationError mean nothing was found; any other ValueError means found but not loadable.
    if Path(name).is_dir() or not isinstance(exc, (OSError, HFValidationError)):
        return ConfigError(f"model.name={name!r}: cannot load a causal language model from it: {exc}")
    return ConfigError(
        f"model.name={name!r} is neither a preset ({', '.join(PRESETS)}), a local folder, a .gguf file, "
        "nor reachable on the Hugging Face hub (offline, or HF_HUB_OFFLINE=1?); `lisa-dist prepare-model "
        f"smollm2-135m-instruct` installs a real model and prints its folder: {str(exc).strip().splitlines()[0]}"
    )


def _tokenizer(source: str, kwargs: dict[str, Any], field: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, HFValidationError, ValueError) as exc:  # ValueError: no tokenizer files to build one from
        first = first_line(exc)
        hint = (
            " (the folder holds no tokenizer files: copy them in, or set model.tokenizer to a folder or hub id "
            "that has them)"
            if Path(source).is_dir() and field == "model.name"
            else ""
        )
        raise ConfigError(f"{field}={source!r}: cannot load a tokenizer from it: {first}{hint}") from None
