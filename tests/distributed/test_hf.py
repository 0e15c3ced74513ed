"""transformers.Trainer + LisaCallback (lisa_dist.integrations.hf) against lisa_dist's own trainer.

Two real ranks under torchrun for DDP, FSDP2 (accelerate) and ZeRO-2 (Trainer's DeepSpeed integration): the same
model, micro-batches, seed and constant learning rate as the lisa_dist reference, so the per-step losses and the
layer schedule must agree; the Adam moment bytes of every rank after every step must be exactly what
lisa_dist.tools.memory gives for the always-trained params and the active layers only. Resuming from Trainer's own
checkpoints must give the uninterrupted run's losses and schedule, bitwise.
"""

from __future__ import annotations

import json
import sys

import pytest
from transformers import Trainer, TrainingArguments

from lisa_dist.integrations.hf import LisaCallback, LisaTrainer

from ..helpers import DRIVERS, local_reference, run_launcher, tiny_overrides, torchrun, write_text_data

STEPS = 8
EXTRA = ("--optim.schedule=constant", f"--train.steps={STEPS}")
# Trainer reduces the loss and the gradients in its own order (its loss is a mean per micro-batch times the world
# size over the global token count): the losses agree with lisa_dist's to about 1e-6.
TOL = 1e-5


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_text_data(tmp_path_factory.mktemp("data") / "text.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_file):
    """lisa_dist's local backend computing the micro-batches of 2 ranks: losses and active layers per step."""
    records, _ = local_reference(tmp_path_factory.mktemp("ref"), data_file, *EXTRA, micro=4, world=2)
    return [r["loss"] for r in records], [r["active_layers"] for r in records]


def run_trainer(tmp_path, data_file, out_name, backend, *flags, nproc=2):
    out = tmp_path / out_name
    args = [str(out), "--backend", backend, *flags, "--", *tiny_overrides(tmp_path / "hf", data_file, *EXTRA)]
    if nproc == 1:
        run_launcher([sys.executable, str(DRIVERS / "hf_driver.py"), *args])
    else:
        torchrun("hf_driver.py", args, nproc=nproc)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def check_against_reference(ranks, reference):
    ref_losses, ref_layers = reference
    for result in ranks:
        steps = result["steps"]
        assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
        assert [s["loss"] for s in steps] == pytest.approx(ref_losses, abs=TOL, rel=0), result["rank"]
        assert [s["active_layers"] for s in steps] == ref_layers
        for s in steps:
            # Adam moments for the always-trained params and the active layers only (this rank's shard).
            assert s["moment_bytes"] == s["expected_moment_bytes"], (result["rank"], s)
    assert len({tuple(layers) for layers in ref_layers}) > 1  # the layers did switch


@pytest.mark.parametrize("backend", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp"])  # ddp: 17 s, test-slow
def test_trainer_matches_lisa_dist(tmp_path, data_file, reference, backend):
    check_against_reference(run_trainer(tmp_path, data_file, "out", backend), reference)


def test_zero2_matches_lisa_dist_and_resumes_from_trainer_checkpoints(tmp_path, data_file, reference):
    ranks = run_trainer(tmp_path, data_file, "a", "zero2", "--save-steps", "3")
    check_against_reference(ranks, reference)
    for result in ranks:
        # Each switch rebuilt the engine; the old ones are gone.
        assert {s["live_engines"] for s in result["steps"]} == {1}
    check_resume(tmp_path, data_file, "zero2", ranks[0], checkpoint=6)


def check_resume(tmp_path, data_file, backend, uninterrupted, checkpoint, nproc=2):
    """Resume from Trainer's checkpoint-N of `uninterrupted`: the remaining steps' losses and layers, bitwise."""
    folder = tmp_path / "a" / "trainer" / f"checkpoint-{checkpoint}"
    resumed = run_trainer(tmp_path, data_file, f"b{checkpoint}", backend, "--resume", str(folder), nproc=nproc)[0]
    tail = uninterrupted["steps"][checkpoint:]
    assert [s["step"] for s in resumed["steps"]] == [s["step"] for s in tail]
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in tail]
    assert [s["active_layers"] for s in resumed["steps"]] == [s["active_layers"] for s in tail]
    # The schedule after the checkpoint: the same periods, drawn again from the same seed.
    later = [entry for entry in uninterrupted["schedule"] if entry[0] >= checkpoint]
    assert [entry for entry in resumed["schedule"] if entry[0] >= checkpoint] == later


@pytest.mark.slow  # 36 s on 2 cores; make test resumes Trainer checkpoints on ZeRO-2 and in the example
def test_one_device_resumes_mid_period_and_at_a_switch(tmp_path, data_file):
    uninterrupted = run_trainer(tmp_path, data_file, "a", "local", "--save-steps", "3", nproc=1)[0]
    for s in uninterrupted["steps"]:
        assert s["moment_bytes"] == s["expected_moment_bytes"]
    check_resume(tmp_path, data_file, "local", uninterrupted, checkpoint=3, nproc=1)  # period 1 continues
    check_resume(tmp_path, data_file, "local", uninterrupted, checkpoint=6, nproc=1)  # period 3 starts


@pytest.mark.slow  # about 50 s on 2 cores: run by make test-slow
def test_fsdp_resumes_from_sharded_trainer_checkpoints(tmp_path, data_file):
    uninterrupted = run_trainer(tmp_path, data_file, "a", "fsdp", "--save-steps", "3")[0]
    check_resume(tmp_path, data_file, "fsdp", uninterrupted, checkpoint=3)


# ZeRO-1 and ZeRO-3 add little beside ZeRO-2 (make test) and run in make test-slow (ZeRO-3: 20 s on 2 cores, moved
# there to keep make test under 15 minutes from a fresh clone).
@pytest.mark.parametrize(
    "backend", [pytest.param("zero1", marks=pytest.mark.slow), pytest.param("zero3", marks=pytest.mark.slow)]
)
def test_other_zero_stages_match_lisa_dist(tmp_path, data_file, reference, backend):
    check_against_reference(run_trainer(tmp_path, data_file, "out", backend), reference)


# -- what LisaTrainer refuses, with the field to change ---------------------------------------------------------


@pytest.fixture
def tiny_model():
    from lisa_dist.config import ModelConfig
    from lisa_dist.models import load_model

    model, _ = load_model(ModelConfig(name="tiny-llama", config_overrides={"num_hidden_layers": 4}), seed=0)
    return model


def args(tmp_path, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


def test_a_plain_trainer_with_the_callback_stops_with_a_pointer_to_lisatrainer(tmp_path, tiny_model):
    import torch

    data = [{"input_ids": torch.ones(1, 8, dtype=torch.long), "labels": torch.ones(1, 8, dtype=torch.long)}] * 4
    trainer = Trainer(
        model=tiny_model,
        args=args(tmp_path, max_steps=1),
        train_dataset=data,
        data_collator=lambda rows: rows[0],
        callbacks=[LisaCallback(gamma=1, interval=2)],
    )
    with pytest.raises(RuntimeError, match="LisaTrainer"):
        trainer.train()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optim": "sgd"}, r"TrainingArguments.optim='sgd'.*adamw_torch"),
    ],
)
def test_unsupported_arguments_name_the_field(tmp_path, tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LisaTrainer(model=tiny_model, args=args(tmp_path, **kwargs), callbacks=[LisaCallback(gamma=1, interval=2)])


def test_callback_settings_are_checked_against_the_model(tmp_path, tiny_model):
    with pytest.raises(ValueError, match=r"LisaCallback: lisa.gamma=5 is not allowed: expected in 1..4"):
        LisaTrainer(model=tiny_model, args=args(tmp_path), callbacks=[LisaCallback(gamma=5, interval=2)])
    with pytest.raises(ValueError, match="exactly one LisaCallback"):
        LisaTrainer(model=tiny_model, args=args(tmp_path))
    with pytest.raises(ValueError, match="strategy='grad_norm'"):
        LisaCallback(strategy="grad_norm")


@pytest.mark.slow  # 22 s on 2 cores: make test-slow (make test runs the Trainer's resume on ZeRO-2)
def test_the_example_fine_tunes_and_resumes(tmp_path):
    import yaml

    from ..helpers import REPO

    cfg = yaml.safe_load((REPO / "examples" / "hf_trainer_lisa.yaml").read_text())
    cfg["model"]["config_overrides"] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4}
    cfg["data"]["path"] = str(REPO / cfg["data"]["path"])
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    cfg["trainer"].update(output_dir=str(tmp_path / "run"), max_steps=3, save_steps=2, logging_steps=1)
    cfg["lisa"] = {"gamma": 1, "interval": 2}
    config = tmp_path / "hf.yaml"
    config.write_text(yaml.safe_dump(cfg))
    example = [sys.executable, str(REPO / "examples" / "hf_trainer_lisa.py"), str(config)]
    assert "done: 3 steps" in run_launcher(example).stdout
    cfg["trainer"]["max_steps"] = 4
    config.write_text(yaml.safe_dump(cfg))
    # Continues from checkpoint-3, the newest: the optimizer is built with the layers of step 3's period (it starts at
    # step 2), then step 4 trains.
    resumed = run_launcher([*example, "--resume"]).stdout
    assert "done: 4 steps" in resumed and "layers): [(2, " in resumed
    assert (tmp_path / "run" / "final" / "config.json").exists()
