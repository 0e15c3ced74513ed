"""The local backend and the one training loop: optimizer state only for active params, equivalences, metrics."""

import itertools
import json
import shutil

import pytest
import torch

from lisa_dist import cli
from lisa_dist.config import load_config
from lisa_dist.method import lr_at
from lisa_dist.run import build, read_jsonl, train, train_step

from ..helpers import DEMO_DATA, REPO, tiny_overrides, write_text_data

FP32 = 4


@pytest.fixture
def data_file(tmp_path):
    return write_text_data(tmp_path / "data.jsonl")


def tiny_cfg(tmp_path, data_file, *overrides):
    return load_config(None, tiny_overrides(tmp_path, data_file, *overrides))


def run_steps(cfg, steps=None):
    run = build(cfg)
    losses = [train_step(run, s)["loss"] for s in range(steps or cfg.train.steps)]
    return run, losses


def test_adam_state_only_for_active_and_always_trained(tmp_path, data_file):
    run = build(tiny_cfg(tmp_path, data_file))
    opt = run.backend.optimizer
    always = run.trainable.always
    seen_active = {}
    for step in range(8):
        record = train_step(run, step)
        active = run.active
        expected = run.trainable.num_params(active)
        assert record["trainable_params"] == expected
        assert run.backend.optimizer_state_bytes() == 2 * FP32 * expected == record["optimizer_state_bytes"]
        live = {id(p) for p in opt.state}
        for i, layer in enumerate(run.trainable.layers):
            in_state = [id(p) in live for _, p in layer]
            assert all(in_state) if i in active else not any(in_state), (step, i, active)
            if i not in active:
                assert all(p.grad is None and not p.requires_grad for _, p in layer)
        # Always-trained modules keep one step count that rises across switches...
        assert all(int(opt.state[p]["step"]) == step + 1 for _, p in always)
        # ...while a layer's count restarts when it becomes active again.
        seen_active = {i: seen_active.get(i, 0) + 1 for i in active}
        for i in active:
            assert all(int(opt.state[p]["step"]) == seen_active[i] for _, p in run.trainable.layers[i])
    assert run.switches == 4


def test_frozen_layers_never_change(tmp_path, data_file):
    cfg = tiny_cfg(tmp_path, data_file, "--lisa.strategy=fixed", "--lisa.fixed_layers=[2]")
    run = build(cfg)
    before = {n: p.detach().clone() for n, p in run.backend.model.named_parameters()}
    for step in range(3):
        train_step(run, step)
    layer_names = {n for layer in run.trainable.layers for n, _ in layer}
    for name, p in run.backend.model.named_parameters():
        changed = not torch.equal(before[name], p)
        frozen = name in layer_names and not name.startswith(f"{run.layout.layers_path}.2.")
        assert changed != frozen, name


def test_gamma_equal_to_layers_is_bitwise_full_finetuning(tmp_path, data_file):
    # At full fine-tuning's always-trained lr (LISA's default scales it by 0.3).
    lisa_run, lisa_losses = run_steps(tiny_cfg(tmp_path, data_file, "--lisa.gamma=4", "--optim.always_lr_scale=1"))
    full_run, full_losses = run_steps(tiny_cfg(tmp_path, data_file, "--lisa.enabled=false"))
    assert lisa_losses == full_losses
    full_state = full_run.backend.model.state_dict()
    for name, value in lisa_run.backend.model.state_dict().items():
        assert torch.equal(value, full_state[name]), name
    assert lisa_run.switches == 3 and full_run.switches == 0


def test_loss_is_independent_of_the_micro_batch_split(tmp_path):
    # Alpaca examples of different lengths and response sizes: the loss is a mean over the global batch's
    # supervised tokens, not a mean of per-micro-batch means.
    shutil.copy(DEMO_DATA, tmp_path / "alpaca.jsonl")
    alpaca = ("--data.format=alpaca", "--data.max_length=384", "--data.skip_bad_rows=true")
    _, whole = run_steps(tiny_cfg(tmp_path, tmp_path / "alpaca.jsonl", *alpaca, "--train.micro_batch_size=8"), steps=3)
    _, split = run_steps(tiny_cfg(tmp_path, tmp_path / "alpaca.jsonl", *alpaca, "--train.grad_accum=2"), steps=3)
    assert split == pytest.approx(whole, abs=1e-6)


def test_bf16_autocast_and_activation_checkpointing(tmp_path, data_file):
    _, plain = run_steps(tiny_cfg(tmp_path, data_file), steps=3)
    _, ac = run_steps(tiny_cfg(tmp_path, data_file, "--train.activation_checkpointing=true"), steps=3)
    assert ac == pytest.approx(plain, abs=1e-6)
    run, bf16 = run_steps(tiny_cfg(tmp_path, data_file, "--train.precision=bf16"), steps=3)
    assert bf16 == pytest.approx(plain, rel=5e-2)
    assert all(p.dtype == torch.float32 for p in run.backend.model.parameters())


def test_lora_baseline_trains_only_adapters(tmp_path, data_file):
    cfg = tiny_cfg(tmp_path, data_file, "--lisa.enabled=false", "--lora.enabled=true", "--lora.r=4")
    run = build(cfg)
    base = {n: p.detach().clone() for n, p in run.backend.model.named_parameters() if not p.requires_grad}
    adapters = sum(p.numel() for _, p in run.trainable.always)
    assert run.trainable.layers == [] and adapters > 0
    for step in range(3):
        record = train_step(run, step)
    assert record["optimizer_state_bytes"] == 2 * FP32 * adapters
    for name, p in run.backend.model.named_parameters():
        if name in base:
            assert torch.equal(base[name], p), name


def test_train_writes_per_step_metrics_and_summary(tmp_path, data_file):
    cfg = tiny_cfg(tmp_path, data_file, "--train.steps=12", "--checkpoint.save_final=true")
    summary = train(cfg)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    fields = {
        "step",
        "loss",
        "lr",
        "tokens",
        "tokens_per_s",
        "active_layers",
        "trainable_params",
        "optimizer_state_bytes",
        "grad_norm",
    }
    assert fields <= set(records[0])
    assert records[-1]["tokens"] > records[0]["tokens"] > 0
    assert summary["switches"] == 6 and summary["last_loss"] < summary["first_loss"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 12
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_cli_train_and_errors(tmp_path, data_file, capsys):
    args = [
        "train",
        f"--data.path={data_file}",
        "--data.format=text",
        "--data.max_length=64",
        f"--data.cache_dir={tmp_path / 'c'}",
        "--model.config_overrides={num_hidden_layers: 2, hidden_size: 32}",
        "--train.steps=2",
        f"--train.output_dir={tmp_path / 'run'}",
        "--logging.progress=false",
        "--lisa.gamma=1",
    ]
    assert cli.main(args) == 0
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2
    assert cli.main([*args, "--lisa.gamma=3"]) == 2  # the tiny model has 2 layers
    assert cli.main(["train", "--lisa.gama=2"]) == 2
    assert "did you mean 'lisa.gamma'" in capsys.readouterr().err
    assert cli.main(["config", f"--data.path={data_file}"]) == 0
    assert "gamma: 2" in capsys.readouterr().out


def test_warmup_then_cosine_schedule():
    cfg = load_config(None, ["--data.path=x", "--optim.lr=1.0", "--optim.warmup_steps=4", "--optim.min_lr_ratio=0.1"])
    lrs = [lr_at(s, cfg.optim, 24) for s in range(24)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[14] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_at(24, cfg.optim, 24) == pytest.approx(0.1)
    cfg.optim.schedule = "linear"
    assert lr_at(14, cfg.optim, 24) == pytest.approx(0.55)
    cfg.optim.schedule = "constant"
    assert {lr_at(s, cfg.optim, 24) for s in range(4, 24)} == {1.0}


@pytest.mark.parametrize("name", ["full_finetune.yaml", "lora.yaml", "pretrain_text.yaml", "lean_memory.yaml"])
def test_shipped_example_configs_train(tmp_path, name):
    """Each shipped method config runs two steps on a shrunk model (its data swapped for the repo's)."""
    text = name == "pretrain_text.yaml"
    data = tmp_path / "d.jsonl"
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    data.write_text("".join(json.dumps({"text": r["output"]} if text else r) + "\n" for r in rows))
    cfg = load_config(
        REPO / "configs" / name,
        [
            f"--data.path={data}",
            f"--data.cache_dir={tmp_path / 'c'}",
            "--train.steps=2",
            f"--train.output_dir={tmp_path / 'run'}",
            "--logging.progress=false",
            "--model.config_overrides={num_hidden_layers: 2, hidden_size: 32, intermediate_size: 64}",
        ],
    )
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["last_loss"] > 0


@pytest.mark.parametrize("baseline", ["badam", "naive_lisa"])
def test_baselines_train_through_the_loop_with_the_configured_loss(tmp_path, data_file, baseline):
    from benchmarks.lib import build_baseline

    losses = {}
    for loss in ("plain", "chunked"):
        args = [f"--train.loss={loss}", "--train.loss_chunk_tokens=7", f"--train.output_dir={tmp_path / loss}"]
        args += ["--lisa.enabled=false"] if baseline == "badam" else []
        cfg = tiny_cfg(tmp_path, data_file, *args)
        backend = build_baseline(baseline, cfg, "model.layers", 4)
        assert backend.loss_chunk_tokens == (7 if loss == "chunked" else 0)
        summary = train(cfg, backend)
        assert summary["steps"] == cfg.train.steps and backend.model is not None  # the caller keeps the model
        losses[loss] = [r["loss"] for r in read_jsonl(tmp_path / loss / "metrics.jsonl")]
    assert losses["chunked"] == pytest.approx(losses["plain"], rel=1e-5)


def test_memory_is_measured_on_logging_steps_only(tmp_path, data_file):
    run = build(tiny_cfg(tmp_path, data_file, "--logging.log_every=2", "--train.steps=4"))
    assert train_step(run, 0) is None and run.backend.state_bytes() == {}  # no measurement in between
    record = train_step(run, 1)
    assert record["state_bytes"] == run.backend.state_bytes() and record["state_bytes"]["params"] > 0
