"""The second reliability probe's defects (../shared/probes/reliability-probe-2.md), each test named by its D-number,
and the cases of the same kinds found beside them. One process, the local backend; the multi-rank ones (D2, D3, D23,
Ctrl-C under torchrun) are in tests/e2e/test_preemption.py."""

import errno
import json
import logging
import os
import re
import signal
import time

import pytest
import torch

from lisa_dist import cli
from lisa_dist.backends.build_locks import clear_stale_build_locks
from lisa_dist.config import load_config
from lisa_dist.errors import CheckpointError, ConfigError
from lisa_dist.models import build_preset, find_layout
from lisa_dist.run import build, outputs, preemption, save, train, train_step

from ..helpers import tiny_overrides, write_text_data

GPT2 = '--model.config_overrides={"n_embd": 64, "n_layer": 4, "n_head": 4}'


def _train(tmp_path, data_file, *extra, steps=4):
    return cli.main(["train", *tiny_overrides(tmp_path, data_file, f"--train.steps={steps}", *extra)])


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- D1: export never writes over what it exports --------------------------------------------------------------------


@pytest.mark.parametrize(
    "out",
    ["run/checkpoints", "run", "run/checkpoints/step-4", "run/checkpoints/step-4/hf", "."],
    ids=["the-checkpoints-folder", "the-run", "the-step", "inside-the-step", "above-the-run"],
)
def test_d1_export_refuses_a_folder_that_is_holds_or_lies_inside_its_source(tmp_path, data_file, out, capsys):
    assert _train(tmp_path, data_file, "--checkpoint.every=2") == 0
    run = tmp_path / "run"
    before = _files(run)
    code = cli.main(["export", str(run / "checkpoints"), str(tmp_path / out), "--overwrite"])
    assert code == 2
    assert "writing there would change or replace the checkpoint it reads" in capsys.readouterr().err
    assert _files(run) == before


def test_d1_export_overwrite_never_replaces_another_runs_checkpoints(tmp_path, data_file, capsys):
    assert _train(tmp_path / "a", data_file, "--checkpoint.every=2") == 0
    assert _train(tmp_path / "b", data_file, "--checkpoint.every=2") == 0
    before = _files(tmp_path / "b" / "run")
    code = cli.main(["export", str(tmp_path / "a" / "run" / "checkpoints"), str(tmp_path / "b" / "run"), "--overwrite"])
    assert code == 2 and "holds the training checkpoint" in capsys.readouterr().err
    assert _files(tmp_path / "b" / "run") == before


# -- D6: save_final replaces final/ whole -----------------------------------------------------------------------------


def test_d6_save_final_replaces_an_earlier_final_folder_whole(tmp_path, data_file):
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001.safetensors"}}))
    (final / "notes.txt").write_text("stale")
    assert _train(tmp_path, data_file, "--checkpoint.save_final=true", "--train.overwrite=true") == 0
    assert not (final / "model.safetensors.index.json").exists() and not (final / "notes.txt").exists()
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert not list(final.parent.glob(".final*"))  # no staging or replaced folder left beside it
    cfg = load_config(
        None, tiny_overrides(tmp_path / "again", data_file, f"--model.name={final}", "--model.config_overrides={}")
    )
    assert cfg.model.name == str(final)
    from lisa_dist.models import load_model

    load_model(cfg.model, seed=0)  # the folder loads: nothing stale changes how


# -- D5, D20: every folder a run writes is locked, once ---------------------------------------------------------------


def test_d5_a_runs_default_checkpoint_folder_is_locked(tmp_path, data_file):
    first = load_config(None, tiny_overrides(tmp_path, data_file))
    lock = outputs.OutputLock(outputs.checkpoint_root(first).resolve(), "checkpoint.dir")
    lock.acquire()  # what the first run's main rank holds while it trains (train() takes it)
    try:
        from lisa_dist.run.trainer import _lock_outputs

        second = load_config(
            None, tiny_overrides(tmp_path / "b", data_file, f"--checkpoint.dir={tmp_path / 'run' / 'checkpoints'}")
        )
        with pytest.raises(
            ConfigError,
            match=r"checkpoint.dir=.*run/checkpoints' is in use by another run: process "
            rf"{os.getpid()}",
        ):
            _lock_outputs(second)
    finally:
        lock.release()
    held = _lock_outputs_of(first)
    assert sorted(h.folder.name for h in held) == ["checkpoints", "run"]


def _lock_outputs_of(cfg):
    from lisa_dist.run.trainer import _lock_outputs

    held = _lock_outputs(cfg)
    for lock in held:
        lock.release()
    return held


def test_d20_a_checkpoint_dir_equal_to_the_output_dir_does_not_lock_the_run_out(tmp_path, data_file):
    out = tmp_path / "run"
    assert _train(tmp_path, data_file, f"--checkpoint.dir={out}", "--checkpoint.every=2") == 0
    assert (out / "step-4" / "trainer.json").is_file()


# -- D21: a changed model under checkpoint.override --------------------------------------------------------------------


def test_d21_a_model_change_that_does_not_load_says_so_and_keeps_the_checkpoints(tmp_path, data_file, caplog):
    assert _train(tmp_path, data_file, "--checkpoint.every=2") == 0
    before = _files(tmp_path / "run" / "checkpoints")
    with caplog.at_level(logging.ERROR, logger="lisa_dist"):
        code = _train(
            tmp_path,
            data_file,
            "--checkpoint.every=2",
            "--checkpoint.override=true",
            '--model.config_overrides={"num_hidden_layers":6,"hidden_size":64}',
            steps=6,
        )
    assert code == 2  # bad input, not "could not write" (5)
    text = caplog.text
    assert "does not load into this run's model" in text
    assert "size mismatch" in text or "Missing key(s)" in text or "Unexpected key(s)" in text  # the detail kept
    assert "checkpoint.override let these changes through: model.config_overrides" in text
    assert "train.overwrite" not in text
    assert _files(tmp_path / "run" / "checkpoints") == before


# -- D2, D3, D22: a failed save ----------------------------------------------------------------------------------------


def test_d3_a_checkpoint_exception_from_dcp_is_cleaned_up_like_any_failure(tmp_path, data_file, monkeypatch):
    """torch.distributed.checkpoint raises CheckpointException, a BaseException: the save must still remove its
    temporary folder and stop with CheckpointError naming the disk's cause."""
    from torch.distributed.checkpoint.api import CheckpointException

    run = build(load_config(None, tiny_overrides(tmp_path, data_file)))
    train_step(run, 0)

    def dcp_full(path):
        raise CheckpointException("save", {0: OSError(errno.ENOSPC, "No space left on device")})

    monkeypatch.setattr(run.backend, "save_state", dcp_full)
    with pytest.raises(
        CheckpointError,
        match="no space left on the device; the previous checkpoint is intact and its temporary folder was removed",
    ):
        save(run, 1)
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))


def test_d22_a_short_write_says_the_disk_is_full(tmp_path, data_file, monkeypatch):
    run = build(load_config(None, tiny_overrides(tmp_path, data_file)))
    train_step(run, 0)

    def short_write(*args, **kwargs):  # what torch.save's writer says when the disk fills mid-file
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 805440 vs 805392")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(
        CheckpointError,
        match=r"no space left on the device: a write was cut short \(the disk is "
        r"full or over quota; [0-9.]+ MiB free there now\)",
    ):
        save(run, 1)


def test_d2_the_main_ranks_failure_to_make_the_folder_reaches_the_save_as_one_error(tmp_path, data_file):
    """The main rank's mkdir failing (the checkpoint folder replaced by a file mid-run) is raised through the same
    agreement as every other failure, not before a barrier the others wait in (the 2-rank hang: e2e)."""
    run = build(load_config(None, tiny_overrides(tmp_path, data_file)))
    train_step(run, 0)
    root = tmp_path / "run" / "checkpoints"
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_text("not a folder")
    with pytest.raises(
        CheckpointError,
        match=r"saving checkpoint step-1 into .*checkpoints failed: a part of the "
        r"path is a file, not a folder",
    ):
        save(run, 1)


# -- D4: Ctrl-C --------------------------------------------------------------------------------------------------------


def test_d4_ctrl_c_asks_for_a_checkpoint_and_a_second_one_stops_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with preemption.stop_on_signals():
        assert signal.getsignal(signal.SIGINT) is preemption._request_stop
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert preemption.STOP.requested and not exits
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert exits == [preemption.EXIT_INTERRUPTED]
    assert not preemption.STOP.requested  # moot once the block ends
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_d4_ctrl_c_in_training_saves_a_checkpoint_and_exits_75(tmp_path, data_file, caplog):
    cfg = load_config(None, tiny_overrides(tmp_path, data_file, "--train.steps=1000", "--checkpoint.every=500"))
    from lisa_dist.run import trainer

    real = trainer.train_step

    def interrupted_at_5(run, step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        return real(run, step)

    trainer.train_step = interrupted_at_5
    try:
        with caplog.at_level(logging.WARNING, logger="lisa_dist"):
            code = cli._train(cfg)
    finally:
        trainer.train_step = real
    assert code == 75
    assert "received SIGINT: finishing this step, then saving a checkpoint (Ctrl-C again stops at once" in caplog.text
    assert (tmp_path / "run" / "checkpoints" / "step-5" / "trainer.json").is_file()


# -- D7: train_embeddings=false freezes every input embedding ---------------------------------------------------------


@pytest.mark.parametrize(
    "preset, frozen",
    [
        ("tiny-gpt2", ["transformer.wpe.weight"]),
        ("tiny-opt", ["model.decoder.embed_positions.weight"]),
        ("tiny-llama", ["model.embed_tokens.weight"]),
        ("tiny-gpt-neox", ["gpt_neox.embed_in.weight"]),
    ],
)
def test_d7_frozen_embeddings_include_learned_positions_in_every_family(preset, frozen):
    model, _ = build_preset(preset)
    layout = find_layout(model)
    assert [name for name, _ in layout.frozen_embedding_params(False)] == frozen
    assert layout.frozen_embedding_params(True) == []


def test_d7_gpt2_with_frozen_embeddings_trains_no_embedding_and_backward_stops_at_the_lowest_layer(tmp_path, data_file):
    def first_record(folder, value):
        cfg = load_config(
            None,
            tiny_overrides(
                folder,
                data_file,
                "--model.name=tiny-gpt2",
                GPT2,
                f"--lisa.train_embeddings={value}",
                "--lisa.strategy=fixed",
                "--lisa.fixed_layers=[2]",
            ),
        )
        run = build(cfg)
        record = train_step(run, 0)
        return run, record

    _, on = first_record(tmp_path / "on", "true")
    frozen, off = first_record(tmp_path / "off", "false")
    wpe = frozen.backend.model.transformer.wpe.weight
    assert not wpe.requires_grad and wpe.grad is None
    assert on["trainable_params"] - off["trainable_params"] == wpe.numel()
    assert off["optimizer_state_bytes"] < on["optimizer_state_bytes"]
    blocks = frozen.backend.model.transformer.h
    assert all(p.grad is None for i in (0, 1) for p in blocks[i].parameters())  # nothing flows below layer 2


# -- D8: changed data at resume ----------------------------------------------------------------------------------------


def _same_size_and_mtime_edit(path):
    stat = path.stat()
    text = path.read_text()
    changed = text.replace("a", "A", 1)
    assert changed != text and len(changed) == len(text)
    path.write_text(changed)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_d8_data_changed_since_the_checkpoint_is_refused_naming_the_file(tmp_path, data_file, caplog):
    assert _train(tmp_path, data_file, "--checkpoint.every=2") == 0
    _same_size_and_mtime_edit(data_file)
    with caplog.at_level(logging.ERROR, logger="lisa_dist"):
        assert _train(tmp_path, data_file, "--checkpoint.every=2", steps=6) == 2
    assert f"the training data changed since checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-4'}" in caplog.text
    assert f"{data_file}: its content changed" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lisa_dist"):
        assert _train(tmp_path, data_file, "--checkpoint.every=2", "--checkpoint.override=true", steps=6) == 0
    assert "resuming on changed data (checkpoint.override)" in caplog.text
    assert "tokenized" in caplog.text  # the edit was not served from the stale token cache


# -- D9 and other non-finite numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["optim.lr", "optim.max_grad_norm", "backend.timeout_s", "data.eval_fraction"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_d9_non_finite_config_numbers_are_refused_naming_the_field(tmp_path, field, value):
    with pytest.raises(ConfigError, match=rf"{field}=.*(expected a finite number|is not allowed)"):
        load_config(None, tiny_overrides(tmp_path, tmp_path / "d.jsonl", f"--{field}={value}"))


@pytest.mark.parametrize(
    "flag, value", [("--temperature", "-2"), ("--temperature", "nan"), ("--top-p", "0"), ("--top-p", "1.5")]
)
def test_sampling_options_are_checked_before_anything_loads(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["chat", "/nonexistent", flag, value])
    assert stop.value.code == 2 and f"argument {flag}: '{value}': expected a value in" in capsys.readouterr().err


# -- D10-D19: one line for the user's mistakes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported")
    model, tokenizer = build_preset("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_d10_a_truncated_weights_file_under_generate_is_one_line(tmp_path, exported, capsys):
    broken = tmp_path / "m"
    broken.mkdir()
    for path in exported.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    assert cli.main(["generate", str(broken), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "does not load as a Hugging Face model folder: SafetensorError" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu", "is not a device: expected cpu, cuda or cuda:N"),
        ("cuda", "this torch is built without CUDA|no GPU is visible"),
    ],
)
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_d11_generate_on_a_device_this_machine_lacks_is_one_line(exported, device, message, capsys):
    assert cli.main(["generate", str(exported), "--prompt", "hi", "--device", device]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_d12_chat_with_standard_input_closed_ends_cleanly(exported, monkeypatch):
    def lost(prompt=""):
        raise RuntimeError("input(): lost sys.stdin")

    monkeypatch.setattr("builtins.input", lost)
    assert cli.main(["chat", str(exported)]) == 0


def test_d13_a_model_folder_without_tokenizer_files_is_one_line(tmp_path, capsys):
    model, _ = build_preset("tiny-llama")
    model.save_pretrained(tmp_path / "notok")
    assert cli.main(["layers", str(tmp_path / "notok")]) == 2
    err = capsys.readouterr().err
    assert "cannot load a tokenizer from it" in err and "set model.tokenizer" in err


def test_d14_max_length_beyond_learned_positions_names_both(tmp_path, data_file):
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            data_file,
            "--model.name=tiny-gpt2",
            '--model.config_overrides={"n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 128}',
            "--data.max_length=256",
        ),
    )
    with pytest.raises(
        ConfigError,
        match=r"data.max_length=256 is not allowed: expected <= 128: the model's learned "
        "position embedding has 128 positions",
    ):
        build(cfg)
    model, _ = build_preset("tiny-llama")
    assert find_layout(model).learned_positions() is None  # rotary: no limit to enforce


def test_d15_wandb_online_without_a_server_is_one_line_within_its_timeout(tmp_path, data_file, monkeypatch, caplog):
    wandb = pytest.importorskip("wandb")
    from lisa_dist.run import metrics

    def unreachable(**kwargs):
        assert kwargs["settings"].init_timeout == metrics.INIT_TIMEOUT_S <= 30
        raise wandb.errors.CommError("Timed out while retrying: no such host")

    # Credentials "configured", without touching W&B's own state (a real login would stay for the later tests).
    monkeypatch.setattr(wandb, "login", lambda **kwargs: True)
    monkeypatch.setattr(wandb, "init", unreachable)
    with caplog.at_level(logging.ERROR, logger="lisa_dist"):
        assert _train(tmp_path, data_file, "--logging.wandb=true", "--logging.wandb_mode=online") == 2
    assert "logging.wandb_mode='online': W&B did not start within" in caplog.text
    assert "no such host" in caplog.text


def test_d16_damaged_metrics_and_summary_files_are_one_line_or_read_around(tmp_path, data_file, caplog):
    assert _train(tmp_path, data_file, "--checkpoint.every=2") == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], '{"step": 2, "lo', *lines[2:]]) + "\n")
    with caplog.at_level(logging.ERROR, logger="lisa_dist"):
        assert _train(tmp_path, data_file, "--checkpoint.every=2", steps=6) == 2
    assert f"{metrics}, line 2: not a JSON record" in caplog.text
    (tmp_path / "run" / "summary.json").write_text('{"steps": 4, "firs')
    assert _train(tmp_path, data_file, "--checkpoint.every=2") == 0  # completed: reported from the checkpoint


def test_d17_plot_into_a_file_is_one_line(tmp_path, data_file, capsys):
    assert _train(tmp_path, data_file) == 0
    assert cli.main(["plot", str(tmp_path / "run"), "--out", str(data_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_d18_lora_target_modules_that_match_nothing_name_the_model_s_layers(tmp_path, data_file, caplog):
    with caplog.at_level(logging.ERROR, logger="lisa_dist"):
        assert (
            _train(
                tmp_path, data_file, "--lisa.enabled=false", "--lora.enabled=true", "--lora.target_modules=[nope_proj]"
            )
            == 2
        )
    assert "lora.target_modules=['nope_proj']" in caplog.text and "q_proj" in caplog.text


def test_d19_config_overrides_transformers_refuses_are_one_line(tmp_path, data_file, caplog):
    with caplog.at_level(logging.ERROR, logger="lisa_dist"):
        assert (
            _train(tmp_path, data_file, '--model.config_overrides={"hidden_size": 60, "num_attention_heads": 7}') == 2
        )
    assert "model.config_overrides of tiny-llama" in caplog.text and "not a multiple" in caplog.text


# -- D24: switching a file's steps to epochs ---------------------------------------------------------------------------


def test_d24_the_command_line_switches_a_files_steps_to_epochs_and_back(tmp_path):
    steps_file = tmp_path / "steps.yaml"
    steps_file.write_text("train: {steps: 7}\ndata: {path: d.jsonl}\n")
    cfg = load_config(steps_file, ["--train.epochs=2"])
    assert cfg.train.epochs == 2
    epochs_file = tmp_path / "epochs.yaml"
    epochs_file.write_text("train: {epochs: 2}\ndata: {path: d.jsonl}\n")
    cfg = load_config(epochs_file, ["--train.steps=5"])
    assert cfg.train.epochs == 0 and cfg.train.steps == 5
    with pytest.raises(ConfigError, match="both on the command line: give one"):
        load_config(steps_file, ["--train.epochs=2", "--train.steps=3"])
    both = tmp_path / "both.yaml"
    both.write_text("train: {steps: 7, epochs: 2}\ndata: {path: d.jsonl}\n")
    with pytest.raises(ConfigError, match=r"both in the config file.*--train.epochs=N trains N epochs"):
        load_config(both)


# -- DeepSpeed's op build lock -----------------------------------------------------------------------------------------


def test_a_build_lock_no_live_build_holds_is_removed_and_a_live_ones_kept(tmp_path, caplog):
    dead = tmp_path / "shm_comm" / "lock"
    young = tmp_path / "young_op" / "lock"
    live = tmp_path / "live_op" / "lock"
    for lock in (dead, young, live):
        lock.parent.mkdir()
        lock.touch()
    for lock in (dead, live):
        os.utime(lock, (time.time() - 600, time.time() - 600))
    cwd = os.getcwd()
    os.chdir(live.parent)  # this process "builds" there, as ninja and the compiler do
    try:
        with caplog.at_level(logging.WARNING, logger="lisa_dist"):
            removed = clear_stale_build_locks(tmp_path)
    finally:
        os.chdir(cwd)
    assert removed == [dead] and not dead.exists() and young.exists() and live.exists()
    assert f"removed {dead}" in caplog.text


# -- found beside the probe's cases ------------------------------------------------------------------------------------


def test_a_run_whose_data_folder_gains_a_file_is_refused_at_resume(tmp_path, data_file):
    folder = tmp_path / "data"
    folder.mkdir()
    write_text_data(folder / "a.jsonl")
    assert _train(tmp_path, folder, "--checkpoint.every=2") == 0
    write_text_data(folder / "b.jsonl")
    assert _train(tmp_path, folder, "--checkpoint.every=2", steps=6) == 2


def test_train_still_refuses_an_explicit_checkpoint_that_is_not_one(tmp_path, data_file):
    with pytest.raises(ConfigError):
        train(load_config(None, tiny_overrides(tmp_path, data_file, f"--checkpoint.resume={tmp_path}")))


def test_export_never_replaces_the_model_its_checkpoint_was_trained_from(tmp_path, data_file, exported, capsys):
    base = tmp_path / "base"
    base.mkdir()
    for path in exported.iterdir():
        (base / path.name).write_bytes(path.read_bytes())
    assert (
        _train(tmp_path, data_file, f"--model.name={base}", "--model.config_overrides={}", "--checkpoint.every=2") == 0
    )
    before = _files(base)
    for out in (base, tmp_path):
        assert cli.main(["export", str(tmp_path / "run" / "checkpoints"), str(out), "--overwrite"]) == 2
    assert "the model the checkpoint was trained from" in capsys.readouterr().err
    assert _files(base) == before


def test_save_final_failing_on_the_main_rank_is_one_error_and_keeps_the_earlier_final(
    tmp_path, data_file, monkeypatch, caplog
):
    assert _train(tmp_path, data_file, "--checkpoint.save_final=true", "--checkpoint.every=2") == 0
    final = tmp_path / "run" / "final"
    before = _files(final)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", full)
    with caplog.at_level(logging.ERROR, logger="lisa_dist"):
        assert _train(tmp_path, data_file, "--checkpoint.save_final=true", "--checkpoint.every=2", steps=6) == 5
    assert f"checkpoint.save_final: writing {final} failed: no space left on the device" in caplog.text
    assert _files(final) == before and not list(final.parent.glob(".final*"))


def test_a_users_step_folder_in_the_checkpoint_folder_is_never_deleted(tmp_path, data_file, caplog):
    root = tmp_path / "run" / "checkpoints"
    mine = root / "step-2"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    keep = root / "step-1"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine too")
    with caplog.at_level(logging.WARNING, logger="lisa_dist"):
        assert _train(tmp_path, data_file, "--checkpoint.every=2", "--checkpoint.keep_last=1") == 0
    aside = list(root.glob("step-2.not-a-checkpoint-*"))
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine"
    assert (keep / "notes.txt").read_text() == "mine too"  # pruning leaves what lisa_dist did not write
    assert "was not a lisa_dist checkpoint" in caplog.text


def test_a_misspelt_resume_mode_gets_a_suggestion(tmp_path, data_file):
    with pytest.raises(ConfigError, match=r"checkpoint.resume='lastest' .* \(did you mean 'latest'\?\)"):
        train(load_config(None, tiny_overrides(tmp_path, data_file, "--checkpoint.resume=lastest")))


def test_the_same_data_reached_by_another_path_resumes(tmp_path, data_file, monkeypatch):
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "data.jsonl").write_bytes(data_file.read_bytes())
    monkeypatch.chdir(tmp_path / "a")
    assert _train(tmp_path, "data.jsonl", "--checkpoint.every=2") == 0
    monkeypatch.chdir(tmp_path / "b")  # the relative data.path now names another file with the same bytes
    assert _train(tmp_path, "data.jsonl", "--checkpoint.every=2", steps=6) == 0
