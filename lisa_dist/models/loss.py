"""Causal-LM loss as a sum over supervised tokens, so that any split of a global batch gives the same mean.

The plain loss materializes the head's logits for every token (micro-batch x sequence x vocabulary, plus their fp32
copy); `chunk_tokens` computes the head and the cross-entropy over that many supervised tokens at a time, each
chunk recomputed in backward (activation checkpointing of the head), so at most one chunk's logits exist. On CUDA,
Liger's fused linear cross-entropy does the same in one kernel when `liger-kernel` is installed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lisa_dist.errors import ConfigError

IGNORE_INDEX = -100


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss after the causal shift (label of position t+1 predicted at t)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def to_device(
    batch: dict[str, torch.Tensor],
    device: torch.device,
    chunk_tokens: int = 0,
) -> dict[str, torch.Tensor]:
    """A micro-batch moved to `device`. With `chunk_tokens`, also `kept`: the flat indices of its supervised tokens
    after the shift, found on the host copy (a boolean mask on the device would read its count back: a host sync
    per micro-batch)."""
    host = dict(batch)
    if chunk_tokens:
        host[KEPT] = (batch["labels"][:, 1:].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    # From page-locked copies on CUDA: a copy from pageable memory is synchronous whatever non_blocking says.
    pin = torch.device(device).type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in host.items()}


KEPT = "kept"
"""The batch key `to_device` puts the supervised tokens' flat indices under (not a model input)."""


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 0) -> torch.Tensor:
    """Summed next-token cross-entropy over the supervised tokens of `batch`, computed in fp32; `chunk_tokens` > 0:
    chunked (see the module's docstring), equal to the plain loss up to the order of the sum."""
    labels = batch["labels"]
    # Packed rows: position_ids instead of the attention mask, from which transformers builds the packed mask.
    inputs = (
        {"position_ids": batch["position_ids"]}
        if "position_ids" in batch
        else {"attention_mask": batch["attention_mask"]}
    )
    if chunk_tokens:
        with _head_computes_loss(model, labels, chunk_tokens, batch.get(KEPT)):
            return model(input_ids=batch["input_ids"], **inputs, use_cache=False).logits
    logits = model(input_ids=batch["input_ids"], **inputs, use_cache=False).logits
    # Each position predicts the next token: the labels move left (the last position predicts nothing), not the
    # logits, whose slice would copy them (200 MB for SmolLM2 at 4 x 256 tokens).
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@contextlib.contextmanager
def _head_computes_loss(
    model: Any, labels: torch.Tensor, chunk_tokens: int, kept: torch.Tensor | None = None
) -> Iterator[None]:
    """For one forward, the LM head returns the summed loss instead of the logits (the model hands it on as
    `.logits`). The head is still called as a module, so FSDP's hooks gather and reduce its weight as usual."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):  # FSDP2's wrapped class is a subclass
        raise ConfigError(f"train.loss=chunked needs a plain nn.Linear LM head, not {type(head).__name__}")

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return chunked_linear_cross_entropy(hidden[:, :-1], head.weight, head.bias, labels[:, 1:], chunk_tokens, kept)

    previous = head.__dict__.get("forward")  # an instance-level forward (accelerate's hooks) is put back after
    head.__dict__["forward"] = forward
    try:
        yield
    finally:
        if previous is None:
            del head.__dict__["forward"]
        else:
            head.__dict__["forward"] = previous


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_tokens: int,
    kept: torch.Tensor | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """sum over supervised tokens of cross_entropy(hidden @ weight.T + bias, labels), `chunk_tokens` rows at a time
    (Liger's fused kernel on CUDA when installed, unless not `fused`). `kept`: the supervised tokens' flat indices,
    found on the host (`to_device`); without it a boolean mask finds them, which reads the device."""
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
    if kept is None:
        kept = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    rows, targets = flat_hidden.index_select(0, kept), flat_labels.index_select(0, kept)
    if fused and rows.is_cuda and _liger() is not None:
        return _liger()(rows, weight, targets, bias, reduction="sum")
    # No supervised token: still a (zero) loss through the head, so that its weight gets a gradient on every rank.
    total = _chunk_loss(rows[:0], weight, bias, targets[:0])
    for start in range(0, rows.size(0), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_chunk_loss, rows[start:end], weight, bias, targets[start:end], use_reentrant=False)
    return total


def _chunk_loss(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(F.linear(rows, weight, bias).float(), targets, reduction="sum")


@functools.cache
def _liger():
    """Liger's fused linear cross-entropy, accumulating the head's gradient over its chunks in fp32 where the
    installed version takes `accum_dtype` (else in the weight's dtype: bf16 sums lose the small chunks)."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    if "accum_dtype" in inspect.signature(liger_fused_linear_cross_entropy).parameters:
        return functools.partial(liger_fused_linear_cross_entropy, accum_dtype=torch.float32)
    return liger_fused_linear_cross_entropy
