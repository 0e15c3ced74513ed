"""Activation checkpointing per decoder block, applied to the plain model before any backend wraps it."""

from __future__ import annotations

from typing import Any

from lisa_dist.errors import ConfigError


def apply_activation_checkpointing(model: Any) -> None:
    """Recompute each decoder block's activations in backward (non-reentrant, so frozen blocks are fine).

    transformers checkpoints at the granularity of its decoder layers, which is LISA's unit too.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(f"train.activation_checkpointing=true: {type(model).__name__} does not support it")
    # transformers also makes the input embedding's output require grad, which only reentrant checkpointing needs:
    # with a frozen embedding it would send backward through every block below the lowest active one.
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
