"""`lisa-dist generate` and `lisa-dist chat`: answers from an exported folder or straight from a checkpoint.

The prompt is what the model was fine-tuned on: the tokenizer's chat template when it has one (chat data), else the
Alpaca instruction prompt with the bos token, exactly as lisa_dist encodes alpaca data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from lisa_dist.data import alpaca_prompt
from lisa_dist.errors import ConfigError, first_line
from lisa_dist.run import checkpoint
from lisa_dist.tools.exporter import load_checkpoint


def load_for_generation(path: str | Path, device: str = "cpu") -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model (float32, eval mode, on `device`) and tokenizer of `path`: a Hugging Face folder (`lisa-dist
    export`, a run's final/) or a checkpoint (a step-N folder, or a checkpoints folder: its newest good one)."""
    path = Path(path)
    target = _device(device)
    if not path.exists():
        raise ConfigError(f"{path} does not exist (expected a Hugging Face model folder or a lisa_dist checkpoint)")
    if (path / "config.json").is_file():
        model, tokenizer = _load_folder(path)
    elif (path / "trainer.json").is_file() or checkpoint.checkpoints(path):
        model, tokenizer = load_checkpoint(path)
    else:
        raise ConfigError(
            f"{path} is neither a Hugging Face model folder (config.json, model.safetensors and "
            "tokenizer files, as `lisa-dist export` and a run's final/ folder hold) nor a lisa_dist "
            "checkpoint (a step-N folder, or a checkpoints folder holding them)"
        )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device=target, dtype=torch.float32).eval(), tokenizer


def _device(name: str) -> torch.device:
    """--device as torch names it (cpu, cuda, cuda:N), checked against what this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(f"--device {name!r}: {why} (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    return device


def _load_folder(path: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, SafetensorError) as exc:  # a truncated weights file raises SafetensorError
        first = first_line(exc)
        raise ConfigError(
            f"{path} has a config.json but does not load as a Hugging Face model folder: {type(exc).__name__}: {first}"
        ) from None
    return model, tokenizer


def build_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, system: str | None = None, history: list[dict] | None = None
) -> list[int]:
    """The token ids the model answers `prompt` from; `system` and `history` ({role, content} messages of the
    earlier turns) need a chat template."""
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system}] if system else []
        messages += [*(history or []), {"role": "user", "content": prompt}]
        return list(
            tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        )
    if system or history:
        raise ConfigError(
            "this model's tokenizer has no chat template, so it takes one Alpaca instruction at a time: "
            "a system message or a conversation history needs a chat template"
        )
    return alpaca_prompt(tokenizer, prompt)


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system: str | None = None,
    history: list[dict] | None = None,
    seed: int = 0,
) -> str:
    """The model's answer to `prompt` (only the new text, special tokens dropped), ending at eos or after
    `max_new_tokens`: greedy at temperature 0, else sampled with `seed` (the caller's random state is kept)."""
    return continue_ids(
        model,
        tokenizer,
        build_prompt(tokenizer, prompt, system, history),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )


def continue_ids(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """`generate` from prompt token ids already built (e.g. an example's prompt as it was trained)."""
    options = _options(model, tokenizer, max_new_tokens, temperature, top_p)
    device = model.device
    ids = torch.tensor([prompt_ids], device=device)
    with (
        torch.no_grad(),
        torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type),
    ):
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **options)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def _options(
    model: Any, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, temperature: float, top_p: float
) -> dict[str, Any]:
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}: expected at least 1")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature}: expected 0 (greedy) or more")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p}: expected in (0, 1]")
    # Stop at the tokenizer's eos and at every eos the model's own generation config names (end-of-turn tokens).
    own = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(own if isinstance(own, list) else [own])} - {None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # generate() takes what is not given here from the model's own generation config, whose defaults may sample or
    # cut to the top k: so do_sample is always given, and when sampling every knob (top_k off: nucleus sampling).
    # Given as keywords, not as a GenerationConfig: transformers then does not warn about the knobs a greedy run
    # inherits and ignores.
    knobs = {"temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {}
    return {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": sorted(eos) or None,
        "pad_token_id": pad,
        "do_sample": temperature > 0,
        **knobs,
    }
