"""Leaving a process cleanly: the workaround for the abort at exit ("terminate called without an active exception").

The cause, from a core dump of an aborted rank (benchmarks/results/2026-12-01_cpu2_exit_stress.md has the
backtrace): a gloo worker thread (`pt_gloo_runloop`) drops its reference to a finished collective after the main
thread has moved on. When it holds the last reference to a tensor that Python created, destroying the tensor takes
the GIL. If the interpreter has begun to finalize by then, CPython 3.11 ends the thread with `pthread_exit`, whose
forced unwind runs into a `noexcept` C++ destructor, and libstdc++ calls `std::terminate`: SIGABRT after the run
finished. Nothing on the Python side prevents it: `destroy_process_group()` does not stop gloo's worker threads
(`shutdown()` and `abort()` do not join them either); only the C++ process group's destructor does, and FSDP's mesh,
DeepSpeed's groups and accelerate keep references to the groups until the interpreter tears them down. (torch PR
179291 proposed destroying the groups at exit and was abandoned.)

The workaround: before the interpreter finalizes (in `shutdown()` and in an `atexit` handler, which runs while the
interpreter is whole), wait until every gloo worker thread of this process is idle. A worker counts as idle when it
is asleep at two samples `WINDOW_S` apart and did not run in between, while this thread slept without the GIL: a
worker with a reference left to drop is runnable, or wakes as soon as the GIL is free, so it cannot pass. It reads
/proc (Linux); elsewhere it sleeps `WINDOW_S` once.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

GLOO_WORKER = "pt_gloo_runloop"  # the name torch gives gloo's worker threads (checked with torch 2.13)
WINDOW_S = 0.02
TASKS = Path("/proc/self/task")


def _gloo_workers() -> list[Path]:
    workers = []
    for task in TASKS.iterdir():
        try:
            if (task / "comm").read_text().strip() == GLOO_WORKER:
                workers.append(task)
        except OSError:  # the thread ended while we looked
            continue
    return workers


def _sample(task: Path) -> tuple[str, int] | None:
    """(scheduler state, context switches so far) of one thread; None once it has ended."""
    try:
        state = (task / "stat").read_text().rpartition(")")[2].split()[0]
        status = (task / "status").read_text().splitlines()
    except OSError:
        return None
    switches = sum(int(line.split()[1]) for line in status if "ctxt_switches:" in line)
    return state, switches


def wait_for_idle_gloo_workers(timeout_s: float = 5.0) -> bool:
    """Block (without the GIL) until no gloo worker thread has a finished collective left to release; False if
    some were still busy after `timeout_s`."""
    if not TASKS.is_dir():
        time.sleep(WINDOW_S)
        return True
    deadline = time.monotonic() + timeout_s
    workers = _gloo_workers()
    before = {task: _sample(task) for task in workers}
    while workers:
        time.sleep(WINDOW_S)
        after = {task: _sample(task) for task in workers}
        busy = [task for task in workers if (now := after[task]) is not None and (now != before[task] or now[0] != "S")]
        if not busy:
            return True
        if time.monotonic() > deadline:
            log.debug("gloo worker threads %s still busy at exit", [t.name for t in busy])
            return False
        workers, before = busy, after
    return True


_GUARDED: list[int] = []


def guard_exit() -> None:
    """Make this process wait for idle gloo workers before its interpreter finalizes (once per process; called
    where lisa_dist starts or joins a process group: `init_distributed` and the Trainer integration)."""
    if os.getpid() in _GUARDED:
        return
    _GUARDED.append(os.getpid())
    atexit.register(wait_for_idle_gloo_workers)
