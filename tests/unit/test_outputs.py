"""Nothing already saved is lost: fresh starts beside another run's outputs, relaunching a finished run, exports into
used folders, two jobs on one folder, a full disk, a resumed run's summary, corrupted or unloadable checkpoints,
and changed optimizer settings at resume. All on the local backend (one process)."""

import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from lisa_dist import cli
from lisa_dist.errors import CheckpointError, ConfigError
from lisa_dist.run import build, checkpoint, outputs, read_jsonl, save, train, train_step
from lisa_dist.tools import export

from ..helpers import REPO, TIED, launcher_env, load_tied_export, tied_param_count, tiny_overrides
from .test_checkpoint import STEPS, cfg_for


def files_of(folder):
    """Every file under `folder` with its bytes: what a relaunch must leave as it was."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != outputs.LOCK_NAME
    }


# -- 1. tied embeddings ----------------------------------------------------------------------------------------------


def test_tied_embeddings_train_and_export_as_one_tensor(tmp_path, data_file):
    run = build(cfg_for(tmp_path, data_file, TIED))
    model = run.backend.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == tied_param_count()
    records = [train_step(run, s) for s in range(3)]
    assert records[-1]["trainable_params"] == run.trainable.num_params(run.active)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one parameter after training
    save(run, 3)
    exported = load_tied_export(_export(tmp_path))
    assert torch.equal(exported.model.embed_tokens.weight, model.model.embed_tokens.weight.detach())


def _export(tmp_path):
    out = tmp_path / "hf"
    assert cli.main(["export", str(tmp_path / "run" / "checkpoints"), str(out)]) == 0
    return out


# -- 2. data loss ----------------------------------------------------------------------------------------------------


def test_relaunching_a_finished_run_leaves_it_untouched_and_more_steps_continue_it(tmp_path, data_file):
    train(cfg_for(tmp_path, data_file, "--checkpoint.every=4"))
    run_dir = tmp_path / "run"
    before = files_of(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    # The same command again: exit 0, nothing written, nothing pruned.
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    assert (
        cli.main(
            [
                "train",
                str(config),
                *tiny_overrides(tmp_path, data_file, f"--train.steps={STEPS}", "--checkpoint.every=4"),
            ]
        )
        == 0
    )
    assert files_of(run_dir) == before
    assert train(cfg_for(tmp_path, data_file, "--checkpoint.every=4")) == summary
    # Raising train.steps continues the finished run from its last checkpoint.
    more = train(cfg_for(tmp_path, data_file, "--checkpoint.every=4", "--train.steps=12"))
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 13))
    assert more["steps"] == 12 and more["first_loss"] == summary["first_loss"]


def test_a_finished_run_without_checkpoints_is_kept_and_another_config_refused(tmp_path, data_file):
    train(cfg_for(tmp_path, data_file))
    before = files_of(tmp_path / "run")
    assert train(cfg_for(tmp_path, data_file))["steps"] == STEPS  # the same run: completed, untouched
    assert files_of(tmp_path / "run") == before
    with pytest.raises(ConfigError, match=r"holds a finished run .*another config.*train.overwrite=true"):
        train(cfg_for(tmp_path, data_file, "--optim.lr=1e-2"))
    assert files_of(tmp_path / "run") == before
    replaced = train(cfg_for(tmp_path, data_file, "--optim.lr=1e-2", "--train.overwrite=true"))
    assert replaced["first_loss"] == read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["loss"]


def test_metrics_of_an_unfinished_run_without_checkpoints_are_not_overwritten(tmp_path, data_file):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(ConfigError, match=r"holds the metrics of an earlier run .*train.overwrite=true"):
        train(cfg_for(tmp_path, data_file))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'


def test_export_refuses_a_used_folder_and_overwrite_replaces_it_whole(tmp_path, data_file):
    run = build(cfg_for(tmp_path, data_file))
    train_step(run, 0)
    save(run, 1)
    out = tmp_path / "base"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the base model")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(ConfigError, match=r"base is not empty.*--overwrite"):
        export(tmp_path / "run" / "checkpoints", out)
    assert (out / "model.safetensors").read_bytes() == b"the base model"
    assert cli.main(["export", str(tmp_path / "run" / "checkpoints"), str(out)]) == 2
    assert cli.main(["export", str(tmp_path / "run" / "checkpoints"), str(out), "--overwrite"]) == 0
    assert not (out / "model.safetensors.index.json").exists()  # no stale file changes how the folder loads
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".base")]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_a_second_job_on_the_same_folder_is_refused_naming_the_first(tmp_path, data_file):
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    args = [
        sys.executable,
        "-m",
        "lisa_dist.cli",
        "train",
        str(config),
        *tiny_overrides(tmp_path, data_file, "--train.steps=100000", "--checkpoint.every=5"),
    ]
    first = subprocess.Popen(args, cwd=REPO, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 6):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        second = subprocess.run(args, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"is in use by another run: process {first.pid} on" in second.stderr, second.stderr[-2000:]
        assert first.poll() is None  # the first job trains on, its checkpoints untouched
        assert checkpoint.checkpoints(tmp_path / "run" / "checkpoints")
    finally:
        first.kill()
        first.wait()
    # Killed with -9: the kernel released its lock. The next launch takes over, and says so.
    lock = outputs.OutputLock(tmp_path / "run", "train.output_dir")
    with _log_of("lisa_dist.run.outputs") as log:
        lock.acquire()
    lock.release()
    assert f"taking over a lock left by process {first.pid}" in log.text


@contextlib.contextmanager
def _log_of(name):
    class Capture(logging.Handler):
        text = ""

        def emit(self, record):
            Capture.text += record.getMessage() + "\n"

    handler = Capture()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB filesystem (tmpfs) mounted under tmp_path: a save there runs out of space for real."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_disk_full_during_a_save_names_the_cause_and_keeps_the_previous_checkpoint(tmp_path, data_file, small_disk):
    run = build(cfg_for(tmp_path, data_file, f"--checkpoint.dir={small_disk}"))
    train_step(run, 0)
    save(run, 1)  # about 0.9 MB: fits once
    before = files_of(small_disk)
    train_step(run, 1)
    with pytest.raises(CheckpointError, match=rf"step-2 into {small_disk} failed: no space left on the device"):
        save(run, 2)
    assert files_of(small_disk) == before  # the earlier checkpoint intact, the temporary folder gone
    assert checkpoint.verify(small_disk / "step-1") is None


def test_read_only_output_folders_are_refused_before_the_first_step(tmp_path, data_file, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        with pytest.raises(
            ConfigError,
            match=rf"checkpoint.dir='{small_disk}' is not writable: the filesystem is "
            "read-only",
        ):
            train(cfg_for(tmp_path, data_file, f"--checkpoint.dir={small_disk}"))
        with pytest.raises(ConfigError, match=r"train.output_dir=.* is not writable: the filesystem is read-only"):
            train(cfg_for(tmp_path, data_file, f"--train.output_dir={small_disk / 'run'}"))
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before anything was written
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"train.output_dir='.*file' is a file, not a folder"):
        train(cfg_for(tmp_path, data_file, f"--train.output_dir={tmp_path / 'file'}"))


def test_a_save_failing_on_write_removes_its_temporary_folder(tmp_path, data_file, monkeypatch):
    run = build(cfg_for(tmp_path, data_file))
    train_step(run, 0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="no space left on the device"):
        save(run, 1)
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))


def test_the_summary_of_a_resumed_run_describes_the_whole_run(tmp_path, data_file):
    straight = train(cfg_for(tmp_path / "straight", data_file))
    run = build(cfg_for(tmp_path, data_file))
    first = [train_step(run, s) for s in range(3)]
    run.metrics.log(first[0])  # the first launch's records, as train() writes them
    for record in first[1:]:
        run.metrics.log(record)
    run.segment_start = time.perf_counter() - 2.0  # that launch trained for 2 s
    save(run, 3)
    run.metrics.close()
    resumed = train(cfg_for(tmp_path, data_file))
    assert resumed["resumed_at_step"] == 3
    assert resumed["first_loss"] == straight["first_loss"] and resumed["last_loss"] == straight["last_loss"]
    assert resumed["tokens"] == straight["tokens"]
    assert resumed["wall_s"] >= 2.0 and resumed["tokens_per_s"] == resumed["tokens"] / resumed["wall_s"]


# -- 3. checkpoint integrity -----------------------------------------------------------------------------------------


def _two_checkpoints(tmp_path, data_file):
    run = build(cfg_for(tmp_path, data_file, "--checkpoint.keep_last=3"))
    for step in range(4):
        train_step(run, step)
        if step in (1, 3):
            save(run, step + 1)
    return tmp_path / "run" / "checkpoints"


def _resumed_losses(tmp_path, data_file, *extra):
    run = build(cfg_for(tmp_path, data_file, *extra))
    return run.start_step, [train_step(run, s)["loss"] for s in range(run.start_step, STEPS)]


def _straight(tmp_path, data_file):
    run = build(cfg_for(tmp_path / "straight", data_file))
    return [train_step(run, s)["loss"] for s in range(STEPS)]


def test_flipped_bytes_anywhere_are_caught_by_the_hash(tmp_path, data_file, caplog):
    expected = _straight(tmp_path, data_file)
    root = _two_checkpoints(tmp_path, data_file)
    model = root / "step-4" / "state" / "model.pt"
    data = bytearray(model.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(4096)  # same size, 4 KiB zeroed
    model.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="lisa_dist.run.resume"):
        start, rest = _resumed_losses(tmp_path, data_file)
    assert start == 2 and rest == expected[2:]
    assert "state/model.pt does not match its SHA-256" in caplog.text
    with caplog.at_level(logging.WARNING, logger="lisa_dist.tools.exporter"):
        export(root, tmp_path / "hf")
    assert "not exporting" in caplog.text and "step-4" in caplog.text and "exporting step-2 instead" in caplog.text


def test_a_checkpoint_that_does_not_load_falls_back_to_the_previous_one(tmp_path, data_file, caplog):
    expected = _straight(tmp_path, data_file)
    root = _two_checkpoints(tmp_path, data_file)
    newest = root / "step-4"
    (newest / "state" / "optim.pt").write_bytes(b"not a pickle")  # corrupted before it was hashed
    hashed = checkpoint.digests(newest, list(checkpoint.files_of(newest)))
    checkpoint.write_manifest(newest, hashed)
    with caplog.at_level(logging.WARNING, logger="lisa_dist.run.resume"):
        start, rest = _resumed_losses(tmp_path, data_file)
    assert start == 2 and rest == expected[2:]
    assert f"checkpoint {newest} does not load" in caplog.text


def test_no_usable_checkpoint_is_said_before_step_0(tmp_path, data_file, caplog):
    root = _two_checkpoints(tmp_path, data_file)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    for folder in ("step-2", "step-4"):
        (root / folder / "trainer.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        run = build(cfg_for(tmp_path, data_file))
    assert run.start_step == 0
    assert "no usable checkpoint in" in caplog.text and "starting from step 0" in caplog.text
    kept = list((tmp_path / "run").glob("metrics.jsonl.before-restart-*"))
    assert len(kept) == 1 and kept[0].read_text() == '{"step": 1, "loss": 5.0}\n'
    with pytest.raises(ConfigError, match=r"checkpoint.resume='latest' is not a usable checkpoint"):
        build(cfg_for(tmp_path, data_file, "--checkpoint.resume=latest"))


def test_resume_latest_needs_a_checkpoint(tmp_path, data_file):
    with pytest.raises(ConfigError, match=r"checkpoint.resume=latest, but .* holds no checkpoint"):
        build(cfg_for(tmp_path, data_file, "--checkpoint.resume=latest"))
    _two_checkpoints(tmp_path, data_file)
    assert build(cfg_for(tmp_path, data_file, "--checkpoint.resume=latest")).start_step == 4


@pytest.mark.parametrize(
    "change, field",
    [
        ("--optim.lr=5e-3", "optim.lr: 0.003 -> 0.005"),
        ("--optim.schedule=linear", "optim.schedule: 'cosine' -> 'linear'"),
        ("--optim.warmup_steps=2", "optim.warmup_steps: 0 -> 2"),
        ("--optim.betas=[0.8,0.99]", "optim.betas"),
        ("--train.precision=bf16", "train.precision"),
    ],
)
def test_optimizer_and_schedule_changes_are_refused_at_resume(tmp_path, data_file, change, field):
    _two_checkpoints(tmp_path, data_file)
    with pytest.raises(ConfigError, match=rf"{field.replace('[', '.').replace('(', '.')}.*checkpoint.override=true"):
        build(cfg_for(tmp_path, data_file, change))
    assert build(cfg_for(tmp_path, data_file, change, "--checkpoint.override=true")).start_step == 4


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path, data_file):
    train(cfg_for(tmp_path, data_file, "--checkpoint.every=4", "--train.steps=4"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 4.1')  # the crash cut this record short
    train(cfg_for(tmp_path, data_file, "--checkpoint.every=4"))
    assert [r["step"] for r in read_jsonl(metrics)] == list(range(1, STEPS + 1))


def test_a_lock_left_in_the_file_by_a_live_process_is_honoured(tmp_path, data_file):
    lock = outputs.OutputLock(tmp_path / "run", "train.output_dir")
    lock.acquire()
    try:
        with pytest.raises(ConfigError, match=f"in use by another run: process {os.getpid()}"):
            # Another open of the same file conflicts even within one process: the lock is per open file.
            outputs.OutputLock(tmp_path / "run", "train.output_dir").acquire()
    finally:
        lock.release()
    again = outputs.OutputLock(tmp_path / "run", "train.output_dir")
    again.acquire()
    again.release()
