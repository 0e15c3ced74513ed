"""A save that fails on a 2-rank FSDP job (the reliability probe's D2 and D3): every rank stops within seconds with
exit 5 and a line naming the folder and the cause, the temporary folder is removed, and the checkpoint before it
stays. Under launch/torchrun.sh a config error exits 2 (D23)."""

import re
import shutil
import subprocess
import sys
import time

import pytest

from ..helpers import REPO, launcher_env, tiny_overrides, write_text_data
from ..unit.test_outputs import small_disk  # noqa: F401 - the fixture

EXIT_CHECKPOINT = 5


def _launch(job, *extra):
    data_file = write_text_data(job / "data.jsonl")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "lisa_dist.cli",
        "train",
        *tiny_overrides(job, data_file, "--backend.name=fsdp", "--backend.io_timeout_s=300", *extra),
    ]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=launcher_env(),
        cwd=REPO,
        start_new_session=True,
    )


def test_d2_a_checkpoint_folder_gone_mid_run_stops_every_rank_within_seconds(tmp_path):
    """The main rank's mkdir fails (the folder became a file); the other rank must not wait in a barrier for the
    I/O timeout (300 s here, 3600 by default)."""
    proc = _launch(tmp_path, "--train.steps=100000", "--checkpoint.every=10")
    root = tmp_path / "run" / "checkpoints"
    try:
        deadline = time.monotonic() + 180
        while not (root / "step-10" / "manifest.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        shutil.rmtree(root)
        root.write_text("no longer a folder")
        broken = time.monotonic()
        output = proc.communicate(timeout=120)[0]
        took = time.monotonic() - broken
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 60, f"the ranks took {took:.0f} s to stop"
    for rank in (0, 1):
        assert re.search(
            rf"rank {rank}: saving checkpoint step-\d+ into \S+checkpoints failed: a part of the path "
            "is a file, not a folder",
            output,
        ), output[-3000:]
    assert not re.search(r"\[rank\d\]:\s*Traceback", output), output[-3000:]  # no rank's traceback
    assert f"exitcode  : {EXIT_CHECKPOINT}" in output, output[-3000:]


def test_d3_a_full_disk_under_fsdp_is_one_line_exit_5_and_no_temporary_folder(tmp_path, small_disk):  # noqa: F811
    proc = _launch(
        tmp_path,
        "--train.steps=6",
        "--checkpoint.every=2",
        "--checkpoint.keep_last=5",
        f"--checkpoint.dir={small_disk}",
    )
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert "no space left on the device" in output, output[-3000:]
    assert not re.search(r"\[rank\d\]:\s*Traceback", output), output[-3000:]
    assert f"exitcode  : {EXIT_CHECKPOINT}" in output, output[-3000:]
    assert not [p.name for p in small_disk.iterdir() if ".tmp" in p.name]
    assert (small_disk / "step-2" / "manifest.json").is_file()


@pytest.mark.parametrize("bad", ["--lisa.gamma=9", pytest.param("--train.nope=1", marks=pytest.mark.slow)])
def test_d23_a_config_error_under_launch_torchrun_exits_2(tmp_path, bad):
    data_file = write_text_data(tmp_path / "data.jsonl")
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "launch" / "torchrun.sh"),
            str(config),
            *tiny_overrides(tmp_path, data_file, "--backend.name=fsdp", bad),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=launcher_env() | {"NPROC_PER_NODE": "2", "PYTHON": sys.executable},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
