"""Importance of each decoder layer for LISA's grad_norm strategy.

Why the gradient norm: a layer whose gradient is larger promises a larger first-order loss decrease per step
(for a step of size lr along the gradient, about lr * |g|^2), so layers are drawn in proportion to the L2 norm of
their gradient, measured while they trained. Only active layers have gradients, so the estimate of a layer is a
running mean over the steps it was active; a layer never seen yet counts as the most important one seen, so that
it gets tried. A floor spreads part of the probability evenly, so every layer keeps being visited.

The norms come from `backend.layer_grad_norms`, whose squared sums are all-reduced over ranks before the square
root: every rank holds the same estimates, draws the same layers, and the trainer's digest check proves it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


class GradNormImportance:
    def __init__(self, num_layers: int, floor: float, decay: float) -> None:
        self.num_layers = num_layers
        self.floor = floor
        self.decay = decay
        self.norms: list[float | None] = [None] * num_layers

    def observe(self, layers: Sequence[int], norms: Sequence[float]) -> None:
        """One step's gradient norms of the active `layers` (the same values on every rank)."""
        for layer, norm in zip(layers, norms, strict=True):
            if not math.isfinite(norm):
                continue  # an overflowing step says nothing about the layer
            old = self.norms[layer]
            self.norms[layer] = norm if old is None else self.decay * old + (1.0 - self.decay) * norm

    def weights(self) -> list[float]:
        """Sampling probabilities: floor / L for every layer plus (1 - floor) in proportion to the estimates."""
        seen = [n for n in self.norms if n is not None]
        if not seen or max(seen) <= 0.0:
            return [1.0 / self.num_layers] * self.num_layers
        fill = max(seen)
        scores = [fill if n is None else n for n in self.norms]
        total = sum(scores)
        even = self.floor / self.num_layers
        return [even + (1.0 - self.floor) * s / total for s in scores]

    def state_dict(self) -> dict:
        return {"norms": list(self.norms)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["norms"]) != self.num_layers:
            raise ValueError(f"importance state has {len(state['norms'])} layers, the model {self.num_layers}")
        self.norms = list(state["norms"])
