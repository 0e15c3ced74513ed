"""A tied input embedding that looks up without a gradient: `lisa.train_embeddings=false` on a tied model."""

from __future__ import annotations

import types

from torch import nn


def lookup_without_grad(embedding: nn.Module) -> None:
    """Make `embedding`'s own forward read its params detached: its output needs no gradient, so backward stops
    at the lowest active layer; a weight tied to the head still trains, through the head's use only.

    An instance forward, around the class's own (a scaled embedding's too), swapping the module's params for
    detached views for the call: FSDP's and ZeRO-3's hooks gather the params before it and find them back after.
    """
    cls_forward = type(embedding).forward

    def forward(self: nn.Module, *args, **kwargs):
        params = dict(self._parameters)
        try:
            for name, param in params.items():
                if param is not None:
                    self._parameters[name] = param.detach()  # type: ignore[assignment]  # a plain tensor, for the call
            return cls_forward(self, *args, **kwargs)
        finally:
            self._parameters.update(params)

    embedding.forward = types.MethodType(forward, embedding)
