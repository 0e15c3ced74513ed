"""The SLURM batch scripts on a real one-node cluster on localhost: the numbers of a plain torchrun run, and USR1."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lisa_dist.run import read_jsonl

from ..helpers import ABORT_MARK, REPO, launcher_env, run_launcher, tiny_overrides, write_text_data
from .slurm_cluster import Cluster, local_slurm

SLURM = REPO / "launch" / "slurm"
TRAP_LINE = "lisa_dist: caught USR1, forwarding to the training step"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    with local_slurm(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def run_files(tmp_path: Path, *extra: str) -> list[str]:
    """An empty config plus the tiny run's overrides (FSDP on 2 ranks), writing under tmp_path."""
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    data = write_text_data(tmp_path / "data.jsonl")
    return [str(config), *tiny_overrides(tmp_path, data, "--backend.name=fsdp", *extra)]


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory) -> list[dict]:
    """The metrics of the same run under plain torchrun (after `cluster`, so a machine without SLURM skips it)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    run_launcher(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "lisa_dist.cli",
            "train",
            *run_files(tmp),
        ]
    )
    return read_jsonl(tmp / "run" / "metrics.jsonl")


def submit(cluster: Cluster, script: str, tmp_path: Path, *extra: str, **env: str) -> str:
    # The scripts derive the rendezvous port from the job id. Not a port the OS reports free: that one is in the
    # ephemeral range, where another process's socket (gloo's, srun's) can take it before the job binds it.
    job_env = {k: v for k, v in launcher_env().items() if not k.startswith("MASTER_")}
    job_env |= {"PYTHON": sys.executable, **env}
    return cluster.sbatch(SLURM / script, *run_files(tmp_path, *extra), env=job_env)


def poll(what: str, ready: Callable[[], bool], timeout: float, detail: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen after {timeout:.0f} s; job output:\n{detail()[-4000:]}")
        time.sleep(0.5)


def assert_same_run(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-6)
    assert [r["active_layers"] for r in got] == [r["active_layers"] for r in want]


@pytest.mark.parametrize(
    "script, env",
    [
        pytest.param("train.sbatch", {}, id="train.sbatch"),
        # Plain srun tasks (the bootstrap from SLURM_PROCID and friends), whatever MPI plugins this SLURM has.
        pytest.param("train_mpi.sbatch", {"SRUN_MPI": "none"}, id="train_mpi.sbatch-plain"),
        # The plugin the script detects (pmi2 with Debian's slurm-wlm, whose pmix lacks libpmix), and mpirun.
        pytest.param("train_mpi.sbatch", {}, marks=pytest.mark.slow, id="train_mpi.sbatch-detected"),
        pytest.param(
            "train_mpi.sbatch", {"LAUNCH_WITH": "mpirun"}, marks=pytest.mark.slow, id="train_mpi.sbatch-mpirun"
        ),
    ],
)
def test_sbatch_matches_torchrun(cluster, reference, tmp_path, script, env):
    job = submit(cluster, script, tmp_path, **env)
    state = cluster.wait(job, timeout=120)
    output = cluster.output(job)
    assert state == "COMPLETED", f"job {job} {state}:\n{output[-4000:]}"
    assert ABORT_MARK not in output, f"a rank of job {job} aborted at exit:\n{output[-4000:]}"
    assert_same_run(read_jsonl(tmp_path / "run" / "metrics.jsonl"), reference)


@pytest.mark.slow  # about 80 s on 2 cores: run by make test-slow
def test_usr1_checkpoints_requeues_and_resumes(cluster, tmp_path):
    """SLURM's warning signal: the trap forwards it, every rank stops with a checkpoint, the job requeues itself
    and the same command resumes to the numbers of an uninterrupted run."""
    steps = "--train.steps=150"  # long enough for the signal to land mid-training
    straight = tmp_path / "straight"
    straight.mkdir()
    run_launcher(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "lisa_dist.cli",
            "train",
            *run_files(straight, steps),
        ]
    )
    job = submit(cluster, "train.sbatch", tmp_path, steps)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        state = cluster.wait(job, timeout=60, until=frozenset({"RUNNING"}))
        assert state == "RUNNING", f"job {job} {state}:\n{cluster.output(job)[-4000:]}"
        poll(
            "a first metrics record",
            lambda: metrics.exists() and "\n" in metrics.read_text(),
            60,
            lambda: cluster.output(job),
        )
        cluster.signal_batch(job, "USR1")
        poll("the requeue", lambda: "requeueing job" in cluster.output(job), 60, lambda: cluster.output(job))
        state = cluster.wait(job, timeout=120, until=frozenset({"COMPLETED"}))
        assert state == "COMPLETED", f"job {job} {state}:\n{cluster.output(job)[-4000:]}"
    finally:
        cluster.run("scancel", job)
        cluster.wait(job, timeout=60)
    output = cluster.output(job)
    assert TRAP_LINE in output and "exit 75 so that a requeue resumes it" in output
    assert "resumed from" in output
    assert_same_run(read_jsonl(metrics), read_jsonl(straight / "run" / "metrics.jsonl"))
