"""Preemption: a signal to one rank of a running 2-rank job stops every rank after the same step with a checkpoint and
exit status 75; launching the same command again resumes to the losses of an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lisa_dist.metrics import read_jsonl
from lisa_dist.preemption import EXIT_PREEMPTED

from .helpers import REPO, launcher_env, run_launcher, tiny_overrides, write_text_data

STEPS = 30


def command(tmp_path, data_file):
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
            "lisa_dist.cli", "train", str(config),
            *tiny_overrides(tmp_path, data_file, "--backend.name=fsdp", f"--train.steps={STEPS}")]


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
    proc = subprocess.Popen(command(job, data_file), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=launcher_env(), cwd=REPO)
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
