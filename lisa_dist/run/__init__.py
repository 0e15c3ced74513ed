"""A training run: the loop (`trainer`), what it holds and saves (`state`), resume and checkpoint files,
preemption, metrics (JSONL, TensorBoard and W&B sinks) and output folders."""

from lisa_dist.run import checkpoint, outputs
from lisa_dist.run.evaluation import EvalSet, evaluate
from lisa_dist.run.metrics import TensorBoardSink, WandbSink, read_jsonl
from lisa_dist.run.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, STOP, LauncherWatch, mark_preempted, mark_status
from lisa_dist.run.resume import plan, restore, save
from lisa_dist.run.state import Run
from lisa_dist.run.trainer import build, device_memory, load_data, maybe_switch, train, train_step

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "STOP",
    "EvalSet",
    "LauncherWatch",
    "Run",
    "TensorBoardSink",
    "WandbSink",
    "build",
    "checkpoint",
    "device_memory",
    "evaluate",
    "load_data",
    "mark_preempted",
    "mark_status",
    "maybe_switch",
    "outputs",
    "plan",
    "read_jsonl",
    "restore",
    "save",
    "train",
    "train_step",
]
