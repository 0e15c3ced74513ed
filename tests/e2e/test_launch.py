"""The launch scripts (and the benchmarks' shell scripts): syntax, shellcheck, and the errors they give before
starting anything."""

import shutil
import subprocess

import pytest

from ..helpers import REPO, launcher_env

SCRIPTS = (
    sorted((REPO / "launch").rglob("*.sh"))
    + sorted((REPO / "launch").rglob("*.sbatch"))
    + sorted((REPO / "benchmarks").rglob("*.sh"))
)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck; .ci/run does)"
)
def test_shellcheck():
    subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], check=True, cwd=REPO)


def run(script, *args, **env):
    return subprocess.run(
        ["bash", str(REPO / "launch" / script), *args],
        capture_output=True,
        text=True,
        env=launcher_env() | env,
        cwd=REPO,
    )


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_usage_without_a_config(script):
    proc = run(script)
    assert proc.returncode == 2 and "CONFIG.yaml" in proc.stderr


def test_multi_node_torchrun_needs_master_addr_and_node_rank():
    proc = run("torchrun.sh", "configs/demo.yaml", NNODES="2", MASTER_ADDR="")
    assert proc.returncode != 0 and "MASTER_ADDR" in proc.stderr
    proc = run("torchrun.sh", "configs/demo.yaml", NNODES="2", MASTER_ADDR="10.0.0.1", NODE_RANK="")
    assert proc.returncode != 0 and "NODE_RANK" in proc.stderr
