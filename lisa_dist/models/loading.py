"""Turn `model.name` into a model and tokenizer: a preset, a `.gguf` file, a local folder or a hub id."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub.errors import HFValidationError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from lisa_dist.config import ConfigError, ModelConfig
from lisa_dist.models.presets import PRESETS, build_preset, torch_dtype


def load_model(cfg: ModelConfig, seed: int) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load the model and tokenizer `cfg` names; `seed` only matters for presets (their random init).

    `cfg.tokenizer`, when set, replaces the model's own tokenizer. A tokenizer without a pad token pads with eos.
    """
    if cfg.name in PRESETS:
        model, tokenizer = build_preset(cfg.name, cfg.preset_overrides, seed, cfg.dtype)
    elif cfg.preset_overrides:
        raise ConfigError(f"model.preset_overrides only apply to presets ({', '.join(PRESETS)}), not {cfg.name!r}")
    elif cfg.name.endswith(".gguf"):
        model, tokenizer = _load_gguf(cfg)
    else:
        model, tokenizer = _load_pretrained(cfg)
    if cfg.tokenizer is not None:
        tokenizer = _tokenizer(cfg.tokenizer, {"trust_remote_code": cfg.trust_remote_code}, field="model.tokenizer")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_gguf(cfg: ModelConfig) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    path = Path(cfg.name)
    if not path.is_file():
        raise ConfigError(f"model.name={cfg.name!r}: no such .gguf file")
    # transformers dequantizes the GGUF tensors into a regular model of the requested dtype.
    kwargs = {"gguf_file": path.name}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch_dtype(cfg.dtype), **kwargs)
    tokenizer = None if cfg.tokenizer else _tokenizer(str(path.parent), kwargs, field="model.name")
    return model, tokenizer


def _load_pretrained(cfg: ModelConfig) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name, dtype=torch_dtype(cfg.dtype), **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(cfg.name, exc) from None
    tokenizer = None if cfg.tokenizer else _tokenizer(cfg.name, kwargs, field="model.name")
    return model, tokenizer


def _load_error(name: str, exc: Exception) -> ConfigError:
    # OSError / HFValidationError mean nothing was found; any other ValueError means found but not loadable.
    if Path(name).is_dir() or not isinstance(exc, (OSError, HFValidationError)):
        return ConfigError(f"model.name={name!r}: cannot load a causal language model from it: {exc}")
    return ConfigError(
        f"model.name={name!r} is neither a preset ({', '.join(PRESETS)}), a local folder, a .gguf file, "
        f"nor reachable on the Hugging Face hub (offline, or HF_HUB_OFFLINE=1?): {str(exc).strip()}"
    )


def _tokenizer(source: str, kwargs: dict[str, Any], field: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, HFValidationError) as exc:
        raise ConfigError(f"{field}={source!r}: cannot load a tokenizer from it: {exc}") from None
