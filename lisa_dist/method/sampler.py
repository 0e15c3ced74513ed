"""The LISA layer sampler: which decoder layers train in each period.

The active set of period p is a pure function of (seed, p), drawn from a generator seeded by both, never from
global RNG state: every rank, and a resumed run, computes the same set without communicating.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

import numpy as np

from lisa_dist.config import LisaConfig, Strategy, validate_lisa_layers
from lisa_dist.dist import check_same_on_all_ranks
from lisa_dist.errors import ConfigError

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
        validate_lisa_layers(
            LisaConfig(
                gamma=gamma,
                interval=interval,
                strategy=cast(Strategy, strategy),
                weights=list(weights) if weights is not None else None,
                fixed_layers=list(fixed_layers) if fixed_layers is not None else None,
            ),
            num_layers,
        )
        self.num_layers = num_layers
        self.gamma = gamma
        self.interval = interval
        self.seed = seed
        self.strategy = strategy
        self.probs = self._normalized(weights) if strategy == "weighted" else None
        self.fixed = tuple(sorted(fixed_layers or ())) if strategy == "fixed" else None

    def _normalized(self, weights: Sequence[float] | None) -> np.ndarray:
        # The weights of each grad_norm period arrive with the call (lisa.weights was checked with the config).
        if weights is None or len(weights) != self.num_layers:
            raise ConfigError(f"lisa.weights: expected {self.num_layers} weights, got {weights!r}")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or np.count_nonzero(w) < self.gamma:
            raise ConfigError(f"lisa.weights={list(weights)}: expected >= 0 with at least gamma positive")
        return w / w.sum()

    def state_dict(self) -> dict:
        """What fixes the schedule: a resumed run must draw the same layers for the same periods."""
        return {
            "num_layers": self.num_layers,
            "gamma": self.gamma,
            "interval": self.interval,
            "seed": self.seed,
            "strategy": self.strategy,
            "fixed_layers": list(self.fixed) if self.fixed else None,
            "weights": self.probs.tolist() if self.probs is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Check the schedule a checkpoint was drawn on: a change is logged (resume refuses it earlier, unless
        checkpoint.override allowed it); the layers of later periods follow this sampler's settings."""
        mine = self.state_dict()
        for key in (k for k in mine if k in state and state[k] != mine[k]):
            log.warning("resuming on another LISA schedule: %s was %s, is %s", key, state[key], mine[key])

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
