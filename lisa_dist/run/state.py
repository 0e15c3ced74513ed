"""What a training run holds, and what of it survives a restart (torchtitan's `Stateful` pattern: the checkpoint
code asks the run, the sampler and the grad-norm importance for their state instead of reaching into fields)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from lisa_dist.backends import Backend
from lisa_dist.config import Config
from lisa_dist.data import ShardedBatches
from lisa_dist.dist import PeerReport
from lisa_dist.method import GradNormImportance, LayerSampler, TrainableSet
from lisa_dist.models import ModelLayout
from lisa_dist.run.metrics import MetricsLogger


@dataclass
class Run:
    """Everything a training run holds, built once by `trainer.build()`. `cfg` stays what the user asked for; what
    the run resolves from it (the steps of train.epochs, rank 0's seeds) is held here."""

    cfg: Config
    backend: Backend
    layout: ModelLayout
    trainable: TrainableSet
    batches: ShardedBatches
    sampler: LayerSampler | None
    metrics: MetricsLogger
    tokenizer: Any
    steps: int = 0
    """Optimizer steps of the whole run: train.steps, or train.epochs x the steps of one epoch."""
    seed: int = 0
    """train.seed as rank 0 has it: model init and data order."""
    sampler_seed: int = 0
    """The layer sampler's seed as rank 0 has it: lisa.seed, or by default the run's seed."""
    importance: GradNormImportance | None = None
    """lisa.strategy=grad_norm: the per-layer gradient norms the sampler draws with."""
    active: tuple[int, ...] = ()
    period: int | None = None
    start_step: int = 0
    preempted: bool = False
    tokens_seen: int = 0
    switches: int = 0
    layers_visited: set[int] = field(default_factory=set)
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_before: float = 0.0
    """Training seconds of the launches before this one (from the checkpoint resumed)."""
    segment_start: float | None = None
    doing: str = "start-up"
    """What the run is doing now, for the message when a collective fails."""
    peers: PeerReport | None = None
    eval_set: Any = None
    """The evaluation micro-batches (`run.evaluation.EvalSet`), None without evaluation data."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    data_files: dict[str, str] = field(default_factory=dict)
    data_sources: list[dict[str, Any]] = field(default_factory=list)
    """data.mixture: each source's counts (summary.json)."""
    """The main rank's data files (data.path, data.eval_path) -> sha256: saved, and compared at resume."""
    compile_watch: Any = None
    """train.compile: the `models.CompileWatch` that warns when a decoder block breaks its graph."""
    """This launch's eval records; the latest is what a checkpoint saves for checkpoint.keep_best."""

    def elapsed_s(self) -> float:
        """Training seconds of the whole run so far, earlier launches included."""
        now = time.perf_counter() - self.segment_start if self.segment_start is not None else 0.0
        return self.elapsed_before + now

    def state_dict(self) -> dict[str, Any]:
        """The run's progress after the last finished step (the model and optimizer are the backend's)."""
        return {
            "steps": self.steps,
            "period": self.period,
            "active_layers": list(self.active),
            "tokens_seen": self.tokens_seen,
            "switches": self.switches,
            "elapsed_s": self.elapsed_s(),
            "layers_visited": sorted(self.layers_visited),
            "world_size": self.backend.world_size,
            "sampler": self.sampler.state_dict() if self.sampler else None,
            "importance": self.importance.state_dict() if self.importance else None,
            "data_files": self.data_files,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Progress from `state_dict()`; the sampler checks that it draws the schedule the checkpoint was on."""
        if self.sampler is not None:
            if state.get("sampler"):
                self.sampler.load_state_dict(state["sampler"])
            self.period, self.active = state["period"], tuple(state["active_layers"])
            if self.importance is not None and state.get("importance"):
                self.importance.load_state_dict(state["importance"])
        self.tokens_seen, self.switches = state["tokens_seen"], state["switches"]
        self.layers_visited = set(state["layers_visited"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
