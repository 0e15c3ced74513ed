"""Checkpoints on the local backend: exact resume, nothing lost, corruption detected, config changes refused, export."""

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from lisa_dist import cli
from lisa_dist.config import load_config
from lisa_dist.errors import ConfigError
from lisa_dist.run import build, checkpoint, read_jsonl, save, train, train_step
from lisa_dist.tools import export

from ..helpers import tiny_overrides

STEPS = 8


def cfg_for(tmp_path, data_file, *extra):
    return load_config(None, tiny_overrides(tmp_path, data_file, f"--train.steps={STEPS}", *extra))


def straight(tmp_path, data_file, *extra):
    run = build(cfg_for(tmp_path / "straight", data_file, *extra))
    return [train_step(run, s)["loss"] for s in range(STEPS)], run


def stop_after(tmp_path, data_file, steps, *extra):
    """Train `steps` steps, save, and drop the run (as a preempted job would)."""
    run = build(cfg_for(tmp_path, data_file, *extra))
    losses = [train_step(run, s)["loss"] for s in range(steps)]
    save(run, steps)
    return losses


def resumed(tmp_path, data_file, *extra):
    run = build(cfg_for(tmp_path, data_file, *extra))
    return run.start_step, [train_step(run, s)["loss"] for s in range(run.start_step, STEPS)], run


@pytest.mark.parametrize(
    "stop, extra",
    [(3, ()), (4, ()), (3, ("--lisa.strategy=grad_norm",))],
    ids=["mid-period", "period-boundary", "grad_norm"],
)
def test_exact_resume(tmp_path, data_file, stop, extra):
    """grad_norm: the layer-importance estimates are part of the checkpoint, so the schedule goes on unchanged."""
    expected, reference = straight(tmp_path, data_file, *extra)
    first = stop_after(tmp_path, data_file, stop, *extra)
    start, rest, run = resumed(tmp_path, data_file, *extra)
    assert start == stop
    assert first + rest == expected  # bitwise, fp32
    for name, value in reference.backend.model.state_dict().items():
        assert torch.equal(value, run.backend.model.state_dict()[name]), name


def test_checkpoint_is_atomic_with_manifest_and_latest(tmp_path, data_file):
    stop_after(tmp_path, data_file, 2)
    root = tmp_path / "run" / "checkpoints"
    folder = root / "step-2"
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert {"trainer.json", "config.yaml", "versions.json", "rng/rank0.pt", "state/model.pt", "state/optim.pt"} <= set(
        manifest
    )
    assert all(entry["bytes"] == (folder / name).stat().st_size for name, entry in manifest.items())
    assert "sha256" in manifest["trainer.json"]
    assert (root / "latest").read_text().strip() == "step-2"
    assert not list(root.glob("*.tmp-*"))


def test_keep_last_and_stale_temporary_folders(tmp_path, data_file):
    run = build(cfg_for(tmp_path, data_file, "--checkpoint.keep_last=2"))
    root = tmp_path / "run" / "checkpoints"
    for step in range(4):
        train_step(run, step)
        if step == 1:
            (root / "step-9.tmp-crashed").mkdir(parents=True)  # a save that died half way
        save(run, step + 1)
    assert [p.name for _, p in checkpoint.checkpoints(root)] == ["step-4", "step-3"]
    assert not list(root.glob("*.tmp-*"))
    # The newest good checkpoint survives pruning even when newer broken ones exist.
    (root / "step-7").mkdir()
    checkpoint.prune(root, keep_last=1)
    assert [p.name for _, p in checkpoint.checkpoints(root)] == ["step-7", "step-4"]


@pytest.mark.parametrize("damage", ["truncate-state", "flip-trainer-json", "delete-manifest", "missing-file"])
def test_corrupted_checkpoint_is_reported_and_the_previous_good_one_used(tmp_path, data_file, damage, caplog):
    expected, _ = straight(tmp_path, data_file)
    run = build(cfg_for(tmp_path, data_file, "--checkpoint.keep_last=3"))
    for step in range(4):
        train_step(run, step)
        if step in (1, 3):
            save(run, step + 1)
    newest = tmp_path / "run" / "checkpoints" / "step-4"
    if damage == "truncate-state":
        data = (newest / "state" / "optim.pt").read_bytes()
        (newest / "state" / "optim.pt").write_bytes(data[: len(data) // 2])
    elif damage == "flip-trainer-json":
        text = (newest / "trainer.json").read_text()
        (newest / "trainer.json").write_text(text.replace('"step": 4', '"step": 5'))
    elif damage == "delete-manifest":
        (newest / "manifest.json").unlink()
    else:
        (newest / "rng" / "rank0.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="lisa_dist.run.resume"):
        start, rest, _ = resumed(tmp_path, data_file)
    assert start == 2
    assert rest == expected[2:]
    assert "step-4 is unusable" in caplog.text


def test_changed_config_is_refused_unless_override(tmp_path, data_file, caplog):
    stop_after(tmp_path, data_file, 3)
    with pytest.raises(ConfigError, match=r"lisa.gamma: 1 -> 2.*checkpoint.override=true"):
        build(cfg_for(tmp_path, data_file, "--lisa.gamma=2"))
    with pytest.raises(ConfigError, match=r"global batch .*: 4 -> 8"):
        build(cfg_for(tmp_path, data_file, "--train.grad_accum=2"))
    with caplog.at_level(logging.WARNING, logger="lisa_dist.run.resume"):
        run = build(cfg_for(tmp_path, data_file, "--lisa.seed=5", "--checkpoint.override=true"))
    assert run.start_step == 3 and "lisa.seed: None -> 5" in caplog.text


def test_resume_none_and_an_explicit_checkpoint(tmp_path, data_file):
    stop_after(tmp_path, data_file, 3)
    # A fresh start beside another run's checkpoints would prune them (or be resumed from them later): refused.
    with pytest.raises(
        ConfigError,
        match=r"checkpoint.resume=none, but .*checkpoints holds the checkpoints step-3 "
        r"of an earlier run.*checkpoint.resume=auto.*train.overwrite=true",
    ):
        build(cfg_for(tmp_path, data_file, "--checkpoint.resume=none"))
    assert (
        build(
            cfg_for(tmp_path, data_file, "--checkpoint.resume=none", f"--checkpoint.dir={tmp_path / 'own'}")
        ).start_step
        == 0
    )
    with pytest.raises(ConfigError, match="is not a usable checkpoint: the folder does not exist"):
        build(cfg_for(tmp_path, data_file, f"--checkpoint.resume={tmp_path / 'nope'}"))
    with pytest.raises(ConfigError, match="a folder of checkpoints, not one checkpoint"):
        build(cfg_for(tmp_path, data_file, f"--checkpoint.resume={tmp_path / 'run' / 'checkpoints'}"))
    step3 = tmp_path / "run" / "checkpoints" / "step-3"
    assert build(cfg_for(tmp_path, data_file, f"--checkpoint.resume={step3}")).start_step == 3


def test_train_checkpoints_periodically_and_resumes_its_metrics(tmp_path, data_file):
    cfg = cfg_for(tmp_path, data_file, "--checkpoint.every=3")
    train(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for _, p in checkpoint.checkpoints(root)] == ["step-8", "step-6"]
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # Resuming a finished run trains nothing more and keeps the metrics whole; it returns the run's summary.
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    summary = train(cfg_for(tmp_path, data_file, "--checkpoint.every=3"))
    assert summary == written and summary["first_loss"] == records[0]["loss"]
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == list(range(1, STEPS + 1))


def test_export_from_a_local_checkpoint(tmp_path, data_file):
    stop_after(tmp_path, data_file, 3)
    run = build(cfg_for(tmp_path, data_file))  # resumed: holds the checkpoint's weights
    out = tmp_path / "hf"
    assert cli.main(["export", str(tmp_path / "run" / "checkpoints"), str(out)]) == 0
    probe = torch.arange(24, dtype=torch.long).reshape(2, 12) % 200 + 5
    with torch.no_grad():
        expected = run.backend.model(input_ids=probe).logits
        got = AutoModelForCausalLM.from_pretrained(out)(input_ids=probe).logits
    assert torch.equal(got, expected)
    assert (out / "tokenizer_config.json").is_file()
    with pytest.raises(ConfigError, match="holds no usable checkpoint"):
        export(tmp_path / "empty", tmp_path / "x")
