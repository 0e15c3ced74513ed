"""Preemption: SIGTERM or SIGUSR1 (SLURM sends one before the time limit) asks the run to stop after its step.

The handler only raises a flag; the trainer adds the flag to a reduction it does every step anyway, so every rank
learns of it at the same step, saves a checkpoint with the others, and exits with EXIT_PREEMPTED.
"""
from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a requeue script resubmits, and the run resumes from its checkpoint
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    requested: bool = False


STOP = StopRequest()


class Preempted(Exception):  # noqa: N818 - it is an outcome, not an error
    """The run stopped on a signal after saving a checkpoint."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"preempted after step {step}; checkpoint {checkpoint or '(on the main rank)'}")
        self.step, self.checkpoint = step, checkpoint


def _request_stop(signum: int, frame: object) -> None:
    STOP.requested = True
    log.warning("received %s: finishing this step, then saving a checkpoint", signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[None]:
    """Within the block, SIGTERM and SIGUSR1 request a stop instead of killing the process."""
    if not enabled:
        yield
        return
    previous = {sig: signal.signal(sig, _request_stop) for sig in SIGNALS}
    STOP.requested = False
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
