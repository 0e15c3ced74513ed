"""Preemption: a signal to one rank of a running 2-rank job stops every rank after the same step with a checkpoint and
exit status 75; launching the same command again resumes to the losses of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lisa_dist.run import EXIT_PREEMPTED, read_jsonl

from ..helpers import REPO, free_port, launcher_env, run_launcher, tiny_overrides, write_text_data

STEPS = 30


def command(tmp_path, data_file):
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "lisa_dist.cli",
        "train",
        str(config),
        *tiny_overrides(tmp_path, data_file, "--backend.name=fsdp", f"--train.steps={STEPS}"),
    ]


def worker_of_rank(rank: int, root: Path) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and str(root).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} found")


def test_signal_checkpoints_every_rank_and_the_job_resumes_exactly(tmp_path):
    data_file = write_text_data(tmp_path / "data.jsonl")
    straight = tmp_path / "straight"
    straight.mkdir()
    run_launcher(command(straight, data_file))
    expected = read_jsonl(straight / "run" / "metrics.jsonl")

    job = tmp_path / "job"
    job.mkdir()
    proc = subprocess.Popen(
        command(job, data_file),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=launcher_env(),
        cwd=REPO,
    )
    metrics = job / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    os.kill(worker_of_rank(1, job), signal.SIGUSR1)  # as SLURM's --signal would, but to one rank only
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"exit {EXIT_PREEMPTED} so that a requeue resumes it" in output
    stopped = read_jsonl(metrics)[-1]["step"]
    assert 5 <= stopped < STEPS
    assert (job / "run" / "checkpoints" / f"step-{stopped}" / "manifest.json").is_file()

    run_launcher(command(job, data_file))  # the requeued job: same command
    records = read_jsonl(metrics)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == [r["loss"] for r in expected]
    assert [r["active_layers"] for r in records] == [r["active_layers"] for r in expected]


def ranks_of(root: Path) -> list[int]:
    """Pids of the lisa_dist ranks whose command line names `root` (this test's run)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"lisa_dist.cli" in cmdline and str(root).encode() in cmdline and b"RANK=" in environ:
            found.append(int(pid))
    return found


def _launch(how: str, job: Path, data_file: Path) -> subprocess.Popen:
    config = job / "empty.yaml"
    config.write_text("{}\n")
    overrides = tiny_overrides(job, data_file, "--backend.name=fsdp", "--train.steps=100000")
    if how == "SIGTERM to the deepspeed launcher":
        cmd = [
            "deepspeed",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "lisa_dist.cli",
            "train",
            str(config),
            *overrides,
        ]
    elif how.endswith("launch/torchrun.sh"):
        cmd = ["bash", str(REPO / "launch" / "torchrun.sh"), str(config), *overrides]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "lisa_dist.cli",
            "train",
            str(config),
            *overrides,
        ]
    env = launcher_env() | {"NPROC_PER_NODE": "2", "PYTHON": sys.executable}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO, start_new_session=True
    )


HOW = {
    "kill -9 to torchrun": signal.SIGKILL,
    "SIGUSR1 to torchrun": signal.SIGUSR1,
    "SIGTERM to the deepspeed launcher": signal.SIGTERM,
    "SIGTERM to launch/torchrun.sh": signal.SIGTERM,
    "Ctrl-C to launch/torchrun.sh": signal.SIGINT,
}
"""Ctrl-C: a terminal sends SIGINT to its foreground process group, the script's (started in a session of its own
here, as a terminal's job is)."""


@pytest.mark.parametrize("how", list(HOW))
def test_ranks_stop_with_a_checkpoint_when_their_launcher_goes(tmp_path, how):
    """No orphans: whatever happens to the launcher, the ranks finish their step, save, and exit; the launch script
    exits 75 so that a requeue keyed on the status resumes the job."""
    data_file = write_text_data(tmp_path / "data.jsonl")
    job = tmp_path / "job"
    job.mkdir()
    proc = _launch(how, job, data_file)
    try:
        metrics = job / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        ranks = ranks_of(job)
        assert len(ranks) == 2
        (os.killpg if how.startswith("Ctrl-C") else os.kill)(proc.pid, HOW[how])
        deadline = time.monotonic() + 90
        while ranks_of(job) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not ranks_of(job), f"orphaned ranks train on after {how}"
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in ranks_of(job):
            os.kill(pid, signal.SIGKILL)
    stopped = read_jsonl(metrics)[-1]["step"]
    assert (job / "run" / "checkpoints" / f"step-{stopped}" / "manifest.json").is_file(), output[-3000:]
    if how.endswith("launch/torchrun.sh"):
        assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
        # Every rank closed before torchrun's agent stopped: no rank torn down mid-exit (the probe's D23).
        assert "ChildFailedError" not in output and "KeyboardInterrupt" not in output, output[-3000:]


def test_the_step_in_flight_when_the_signal_comes_is_the_last(tmp_path, monkeypatch):
    """The signal arrives during step 3's backward: step 3 finishes, is checkpointed, and no step 4 runs."""
    from lisa_dist.backends import LocalBackend
    from lisa_dist.config import load_config
    from lisa_dist.errors import Preempted
    from lisa_dist.run import train

    data_file = write_text_data(tmp_path / "data.jsonl")
    original = LocalBackend.forward_backward
    calls = []

    def forward_backward(self, batch, scale):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, scale)

    monkeypatch.setattr(LocalBackend, "forward_backward", forward_backward)
    with pytest.raises(Preempted) as stop:
        train(load_config(None, tiny_overrides(tmp_path, data_file, "--train.steps=8")))
    assert stop.value.step == 3 and len(calls) == 3
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "step-3" / "manifest.json").is_file()
