"""Every error lisa_dist raises on purpose, defined once; each message names what is wrong and what is allowed.

`lisa-dist train` turns each into one line and an exit status (cli.py): ConfigError and DataError 2, DistError 3,
CollectiveFailure 4, CheckpointError 5, Preempted 75.
"""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A config value or key that lisa_dist cannot run with."""


class DataError(ValueError):
    """Training data that cannot be used: names the file, the row and what is wrong."""


class DistError(RuntimeError):
    """The launch environment is inconsistent, or the ranks disagree."""


class CollectiveFailure(DistError):
    """A collective failed or timed out: another rank died, hung, or stopped answering."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only, ...); the previous one is intact."""


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"preempted after step {step}; checkpoint {checkpoint or '(on the main rank)'}")
        self.step, self.checkpoint = step, checkpoint


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none): a library's error in one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
