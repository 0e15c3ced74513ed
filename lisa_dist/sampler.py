"""The LISA layer sampler: which decoder layers train in each period.

The active set of period p is a pure function of (seed, p), drawn from a generator seeded by both, never from
global RNG state: every rank, and a resumed run, computes the same set without communicating.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from lisa_dist.config import STRATEGIES
from lisa_dist.dist import check_same_on_all_ranks

log = logging.getLogger(__name__)


class LayerSampler:
    """Samples `gamma` of `num_layers` decoder layers per period of `interval` steps.

    uniform: gamma layers without replacement, each set equally likely (the paper's Algorithm 1).
    weighted: successive draws without replacement with probabilities proportional to `weights`.
    fixed: always `fixed_layers`.
    grad_norm: like weighted, with the weights of each period passed to `active_layers` (from
    `importance.GradNormImportance`, the same on every rank).
    """

    def __init__(
        self,
        num_layers: int,
        gamma: int,
        interval: int,
        seed: int,
        strategy: str = "uniform",
        weights: Sequence[float] | None = None,
        fixed_layers: Sequence[int] | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"lisa.strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if not 1 <= gamma <= num_layers:
            raise ValueError(f"lisa.gamma={gamma}: expected in 1..{num_layers}")
        if interval < 1:
            raise ValueError(f"lisa.interval={interval}: expected >= 1")
        self.num_layers = num_layers
        self.gamma = gamma
        self.interval = interval
        self.seed = seed
        self.strategy = strategy
        self.probs = self._normalized(weights) if strategy == "weighted" else None
        self.fixed = tuple(sorted(fixed_layers)) if strategy == "fixed" else None
        if self.fixed is not None and len(self.fixed) != gamma:
            raise ValueError(f"lisa.fixed_layers={list(fixed_layers)}: expected {gamma} layers")

    def _normalized(self, weights: Sequence[float] | None) -> np.ndarray:
        if weights is None or len(weights) != self.num_layers:
            raise ValueError(f"lisa.weights: expected {self.num_layers} weights, got {weights!r}")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or np.count_nonzero(w) < self.gamma:
            raise ValueError(f"lisa.weights={list(weights)}: expected >= 0 with at least gamma positive")
        return w / w.sum()

    def period_of(self, step: int) -> int:
        return step // self.interval

    def active_layers(self, period: int, weights: Sequence[float] | None = None) -> tuple[int, ...]:
        """Sorted indices of the layers trained during `period` (grad_norm: drawn with `weights`)."""
        if self.fixed is not None:
            return self.fixed
        probs = self._normalized(weights) if self.strategy == "grad_norm" else self.probs
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, period]))
        picked = rng.choice(self.num_layers, size=self.gamma, replace=False, p=probs)
        return tuple(sorted(int(i) for i in picked))

    def agreed_layers(self, period: int, weights: Sequence[float] | None = None) -> tuple[int, ...]:
        """`active_layers`, which every rank derives on its own: proven the same on all ranks before anyone trains
        on it (DistError naming the ranks and their sets otherwise)."""
        layers = self.active_layers(period, weights)
        check_same_on_all_ranks(f"the active layers of LISA period {period}", layers)
        return layers
