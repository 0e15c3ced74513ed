"""The wait for idle gloo workers before the interpreter finalizes (lisa_dist.teardown): it must pass idle
workers at once and hold while one still runs; the races themselves are counted by benchmarks/exit_stress.py."""

from __future__ import annotations

import ctypes
import sys
import threading
import time

import pytest

from lisa_dist import teardown

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
PR_SET_NAME = 15


def _named_thread(body, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        ctypes.CDLL(None).prctl(PR_SET_NAME, teardown.GLOO_WORKER.encode())  # the name torch gives gloo's workers
        body(stop)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.1)
    return thread


def _idle(stop: threading.Event) -> None:
    stop.wait()


def _busy(stop: threading.Event) -> None:
    # Runs and takes the GIL now and then, as a worker releasing Python tensors does.
    while not stop.is_set():
        sum(range(1000))


@pytest.mark.parametrize("body, idle", [(_idle, True), (_busy, False)], ids=["idle", "busy"])
def test_waits_only_for_workers_that_still_run(body, idle):
    stop = threading.Event()
    thread = _named_thread(body, stop)
    try:
        assert teardown._gloo_workers(), "the named thread is found"
        start = time.monotonic()
        assert teardown.wait_for_idle_gloo_workers(timeout_s=0.5) is idle
        waited = time.monotonic() - start
        assert (waited < 0.4) if idle else (waited >= 0.5)
    finally:
        stop.set()
        thread.join()


def test_a_worker_that_ends_counts_as_idle():
    stop = threading.Event()
    thread = _named_thread(_busy, stop)
    threading.Timer(0.1, stop.set).start()
    assert teardown.wait_for_idle_gloo_workers(timeout_s=5.0)
    thread.join()


def test_the_guard_is_registered_once_per_process(monkeypatch):
    registered = []
    monkeypatch.setattr(teardown, "_GUARDED", [])
    monkeypatch.setattr(teardown.atexit, "register", registered.append)
    teardown.guard_exit()
    teardown.guard_exit()
    assert registered == [teardown.wait_for_idle_gloo_workers]
