"""Preemption: SIGTERM, SIGUSR1 (SLURM sends one before the time limit) or Ctrl-C (SIGINT) asks the run to stop
after its step.

The handler only raises a flag; the trainer adds the flag to a reduction it does every step anyway, so every rank
learns of it at the same step, saves a checkpoint with the others, and exits with EXIT_PREEMPTED. A second Ctrl-C
stops the process at once, without a checkpoint (exit 130).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a requeue script resubmits, and the run resumes from its checkpoint
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    requested: bool = False
    interrupted: bool = False
    """A Ctrl-C was among the requests: the next one stops at once."""


STOP = StopRequest()


def _request_stop(signum: int, frame: object) -> None:
    if signum == signal.SIGINT and STOP.interrupted:
        # Write straight to stderr: a logging handler may hold its lock in the frame this signal interrupted.
        os.write(2, b"lisa_dist: a second Ctrl-C: stopping now, without a checkpoint\n")
        os._exit(EXIT_INTERRUPTED)
    STOP.interrupted = STOP.interrupted or signum == signal.SIGINT
    if STOP.requested:
        return
    STOP.requested = True
    again = " (Ctrl-C again stops at once, without one)" if signum == signal.SIGINT else ""
    log.warning("received %s: finishing this step, then saving a checkpoint%s", signal.Signals(signum).name, again)


@contextlib.contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[None]:
    """Within the block, SIGTERM and SIGUSR1 request a stop instead of killing the process."""
    if not enabled:
        yield
        return
    previous = {sig: signal.signal(sig, _request_stop) for sig in SIGNALS}
    STOP.requested = STOP.interrupted = False
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        STOP.requested = STOP.interrupted = False  # answered (by a checkpoint) or moot: not for what trains next


STATUS_DIR_ENV = "LISA_DIST_STATUS_DIR"
"""Set by the launch scripts: a rank that stopped with a checkpoint leaves `preempted` there, so that the script
exits EXIT_PREEMPTED although the launcher itself (torchrun, deepspeed) reports any non-zero rank as exit 1."""
LAUNCHER_MARKS = (
    b"torch.distributed.run",
    b"torchrun",
    b"deepspeed",
    b"mpiexec",
    b"mpirun",
    b"hydra_pmi_proxy",
    b"srun",
    b"slurmstepd",
)


def mark_preempted() -> bool:
    """Tell the launch script that this rank stopped with a checkpoint; whether one is there to tell."""
    return mark_status("preempted")


def mark_status(name: str) -> bool:
    """Leave `name` in the launch script's status folder (it maps the launcher's exit 1 back to ours)."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if folder and Path(folder).is_dir():
        (Path(folder) / name).touch()
        return True
    return False


def _ancestry() -> list[tuple[int, bytes]]:
    """(pid, command line) of the processes above this one, the parent first (Linux /proc; just the parent
    elsewhere)."""
    found: list[tuple[int, bytes]] = []
    pid = os.getppid()
    while pid > 1 and len(found) < 16:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return found or [(os.getppid(), b"")]
        found.append((pid, cmdline))
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def launcher_pids() -> list[int]:
    """The parent, and above it every launcher process up to the first that is not one (the deepspeed runner
    above deepspeed.launcher.launch, say): if any of them dies, the ranks were orphaned."""
    chain = _ancestry()
    pids = [chain[0][0]] if chain else []
    for pid, cmdline in chain[1:]:
        if not any(mark in cmdline for mark in LAUNCHER_MARKS):
            break
        pids.append(pid)
    return pids


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead launcher whose own parent has not collected it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class LauncherWatch:
    """Stops this rank when its launcher dies: `kill -9` of torchrun's agent, a SIGUSR1 to it (which it does not
    handle), SIGTERM to the deepspeed runner. Workers would otherwise train on as orphans, without a checkpoint,
    while a relaunch runs beside them. The rank sends itself SIGTERM: inside the training loop that finishes the
    step and saves a checkpoint with the other ranks (exit 75); before it, the process ends."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.pids = launcher_pids()
        self.parent = os.getppid()
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lisa_dist-launcher-watch", daemon=True)

    def __enter__(self) -> LauncherWatch:
        if self.pids:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _gone(self) -> int | None:
        if os.getppid() != self.parent:
            return self.parent
        return next((pid for pid in self.pids if not _running(pid)), None)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            gone = self._gone()
            if gone is not None:
                log.warning(
                    "the launcher process %d is gone: stopping this rank (with a checkpoint when training)", gone
                )
                os.kill(os.getpid(), signal.SIGTERM)
                return
