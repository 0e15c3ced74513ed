"""Causal-LM loss as a sum over supervised tokens, so that any split of a global batch gives the same mean."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss after the causal shift (label of position t+1 predicted at t)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the supervised tokens of `batch`, computed in fp32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
