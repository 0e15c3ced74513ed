"""Evaluation (held-out or a file, its schedule, keep_best), packing without cross-talk, train.epochs and
model.attn_implementation, on the local backend (FSDP and ZeRO-3 against it: tests/distributed)."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from lisa_dist.config import load_config
from lisa_dist.data import collate_rows, load_examples, pack_examples, split_heldout
from lisa_dist.errors import ConfigError
from lisa_dist.models import IGNORE_INDEX
from lisa_dist.run import build, train
from lisa_dist.run.evaluation import evaluate

from ..helpers import DEMO_DATA

TINY = ('--model.config_overrides={"num_hidden_layers":4,"hidden_size":64}', "--model.name=tiny-llama")


def overrides(tmp_path, *extra):
    return [
        f"--data.path={DEMO_DATA}",
        "--data.format=alpaca",
        "--data.max_length=1024",
        "--data.skip_bad_rows=true",
        f"--data.cache_dir={tmp_path / 'cache'}",
        *TINY,
        "--train.micro_batch_size=4",
        "--train.steps=4",
        f"--train.output_dir={tmp_path / 'run'}",
        "--optim.lr=3e-3",
        "--lisa.gamma=1",
        "--lisa.interval=2",
        "--logging.progress=false",
        *extra,
    ]


def cfg_for(tmp_path, *extra):
    return load_config(None, overrides(tmp_path, *extra))


def token_losses(model, batch):
    """Per-position next-token losses (0 where no label) of a collated batch."""
    inputs = (
        {"position_ids": batch["position_ids"]}
        if "position_ids" in batch
        else {"attention_mask": batch["attention_mask"]}
    )
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], **inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_each_example_its_unpacked_loss(tmp_path, attn):
    run = build(cfg_for(tmp_path, f"--model.attn_implementation={attn}"))
    model = run.backend.model.eval()
    examples = load_examples(run.cfg.data, run.tokenizer).select(range(12))
    packed = pack_examples(examples, 1024)
    assert len(packed) < len(examples)  # several examples share a row
    pad = run.tokenizer.pad_token_id
    row_losses = token_losses(model, collate_rows(packed[:], pad))
    # Where each example starts in its row, and which example it is (best-fit decreasing reorders them).
    index = {tuple(ids): k for k, ids in enumerate(examples["input_ids"])}
    assert len(index) == len(examples)
    starts = []
    for i in range(len(packed)):
        positions, ids = packed[i]["position_ids"], packed[i]["input_ids"]
        for j in (j for j, p in enumerate(positions) if p == 0):
            n = next((m for m in range(j + 1, len(positions)) if positions[m] == 0), len(positions)) - j
            starts.append((i, j, index[tuple(ids[j : j + n])]))
    assert sorted(k for _, _, k in starts) == list(range(len(examples)))  # every example exactly once
    for row, start, k in starts:
        alone = token_losses(model, collate_rows(examples[k : k + 1], pad))[0]
        n = len(examples[k]["input_ids"])
        # In the row, the loss of the example's token t sits at row position start + t - 1 (t >= 1).
        together = row_losses[row, start : start + n - 1]
        assert torch.allclose(together, alone[: n - 1], atol=1e-5, rtol=1e-5), (attn, k)
    # The first label of every packed example but the row's first is not a target.
    assert all(packed[i]["labels"][s] == IGNORE_INDEX for i, s, _ in starts if s > 0)


def test_eval_loss_is_the_same_packed_or_not(tmp_path):
    plain = build(cfg_for(tmp_path / "plain", "--data.eval_fraction=0.2"))
    packed = build(cfg_for(tmp_path / "packed", "--data.eval_fraction=0.2", "--data.packing=true"))
    assert len(packed.batches.dataset) < len(plain.batches.dataset)
    a, b = evaluate(plain, 0), evaluate(packed, 0)
    assert a["eval_tokens"] == b["eval_tokens"] > 0
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    assert plain.backend.model.training  # back in training mode


def test_held_out_examples_are_fixed_by_seed_and_never_trained_on(tmp_path):
    cfg = cfg_for(tmp_path)
    examples = load_examples(cfg.data, build(cfg).tokenizer)
    train_a, held_a = split_heldout(examples, 0.25, seed=3)
    _, held_b = split_heldout(examples, 0.25, seed=3)
    _, held_c = split_heldout(examples, 0.25, seed=4)
    assert held_a["input_ids"] == held_b["input_ids"] != held_c["input_ids"]
    assert len(held_a) == round(0.25 * len(examples)) and len(train_a) + len(held_a) == len(examples)
    assert not {tuple(x) for x in train_a["input_ids"]} & {tuple(x) for x in held_a["input_ids"]}


def test_eval_schedule_summary_and_keep_best(tmp_path):
    summary = train(
        cfg_for(
            tmp_path,
            "--data.eval_fraction=0.2",
            "--train.eval_every=2",
            "--train.steps=5",
            "--train.eval_batches=2",
            "--checkpoint.every=1",
            "--checkpoint.keep_last=1",
            "--checkpoint.keep_best=1",
        )
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]  # start, every 2, end
    assert all(r["eval_batches"] == 2 and r["eval_ppl"] == pytest.approx(2.718281828 ** r["eval_loss"]) for r in evals)
    assert summary["first_eval_loss"] == evals[0]["eval_loss"] and summary["last_eval_loss"] == evals[-1]["eval_loss"]
    best = min(evals[1:], key=lambda r: r["eval_loss"])
    assert summary["best_eval_loss"] == min(r["eval_loss"] for r in evals)
    root = tmp_path / "run" / "checkpoints"
    kept = sorted(p.name for p in root.glob("step-*"))
    # The newest, and the best by eval loss among the checkpoints (the eval before each).
    scored = {int(p.name[5:]): json.loads((p / "eval.json").read_text())["eval_loss"] for p in root.glob("step-*")}
    assert f"step-{best['step']}" in kept or min(scored.values()) <= best["eval_loss"]
    assert "step-5" in kept and len(kept) <= 2
    assert (root / "best").read_text().strip() == f"step-{min(scored, key=scored.get)}"


def test_eval_at_start_false_skips_only_the_first_evaluation(tmp_path):
    train(
        cfg_for(
            tmp_path,
            "--data.eval_fraction=0.2",
            "--train.eval_every=2",
            "--train.steps=4",
            "--train.eval_batches=1",
            "--train.eval_at_start=false",
        )
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]


def test_epochs_set_the_steps(tmp_path):
    # 95% held out: one epoch of the remaining examples is a few steps.
    args = [
        a
        for a in overrides(
            tmp_path, "--train.epochs=1", "--data.eval_fraction=0.95", "--train.eval_batches=1", "--lisa.interval=100"
        )
        if a != "--train.steps=4"
    ]
    summary = train(load_config(None, args))
    examples = load_examples(cfg_for(tmp_path).data, build(cfg_for(tmp_path / "b")).tokenizer)
    assert summary["steps"] == len(split_heldout(examples, 0.95, seed=42)[0]) // 4 > 1
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["train"]["epochs"], saved["train"]["steps"]) == (1, 100)  # what was asked: the default steps
    assert train(load_config(None, args)) == summary  # the same run, recognized as completed
    built = [a.replace(str(tmp_path / "run"), str(tmp_path / "built")) for a in args]
    cfg = load_config(None, built)
    run = build(cfg)  # build alone resolves them too, into the run
    assert run.steps == summary["steps"] and cfg.train.steps == 100
    assert (run.seed, run.sampler_seed, cfg.lisa.seed) == (42, 42, None)


@pytest.mark.parametrize(
    "extra, match",
    [
        (
            ["--train.epochs=2", "--train.steps=10"],
            r"train.epochs=2 and train.steps=10 both on the command line: give one",
        ),
        (["--data.eval_fraction=1.5"], r"data.eval_fraction=1.5.*\[0, 1\)"),
        (["--data.eval_fraction=0.1", "--data.eval_path=x.json"], r"data.eval_path.*or data.eval_fraction, not both"),
        (["--train.eval_every=5"], r"train.eval_every=5.*needs evaluation data"),
        (["--checkpoint.keep_best=1"], r"checkpoint.keep_best=1.*needs data.eval_path"),
        (["--data.packing=true", "--data.format=text"], r"data.packing=True.*already packed"),
        (["--model.attn_implementation=flash"], r"model.attn_implementation='flash'.*sdpa, eager, flash_attention_2"),
    ],
)
def test_bad_eval_settings_name_the_field(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        cfg_for(tmp_path, *extra)


def test_bad_evaluation_data_names_its_field(tmp_path):
    from lisa_dist.errors import DataError

    with pytest.raises(DataError, match=r"data.eval_path '.*missing.json' does not exist"):
        build(cfg_for(tmp_path, f"--data.eval_path={tmp_path / 'missing.json'}"))
    with pytest.raises(DataError, match=r"data.eval_fraction=0.9999 holds out all .* nothing is left to train on"):
        build(cfg_for(tmp_path, "--data.eval_fraction=0.9999"))


def test_flex_attention_is_refused_for_training_on_cpu(tmp_path):
    with pytest.raises(ConfigError, match=r"model.attn_implementation='flex_attention' trains on CUDA only"):
        build(cfg_for(tmp_path, "--model.attn_implementation=flex_attention"))


def test_an_unavailable_attention_names_the_field(tmp_path):
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"model.attn_implementation='flash_attention_2' is not available"):
        build(cfg_for(tmp_path, "--model.attn_implementation=flash_attention_2"))


def test_the_sdpa_default_falls_back_where_an_architecture_lacks_it(caplog):
    """Gemma2 has no sdpa in transformers: the default then runs transformers' own choice, with a warning."""
    from lisa_dist.models import build_skeleton, preset_config

    model = build_skeleton(preset_config("tiny-gemma2", {}), torch.float32, attn_implementation="sdpa")
    assert model.config._attn_implementation != "sdpa"
    assert "model.attn_implementation='sdpa'" in caplog.text


def test_a_run_feeds_tensorboard_with_train_and_eval_scalars(tmp_path):
    """logging.tensorboard: the trainer's records (training and evaluation) read back from the event file."""
    from .test_trackers import tensorboard_scalars

    train(
        cfg_for(
            tmp_path,
            "--logging.tensorboard=true",
            "--data.eval_fraction=0.2",
            "--train.eval_batches=1",
            "--train.steps=2",
        )
    )
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in records if "loss" in r])
    assert [s for s, _ in scalars["eval/eval_loss"]] == [0, 2]
    assert [v for _, v in scalars["eval/eval_loss"]] == pytest.approx(
        [r["eval_loss"] for r in records if "eval_loss" in r]
    )


def test_best_fit_decreasing_fills_rows_tighter_than_in_order():
    from lisa_dist.data import best_fit_decreasing

    lengths = [6, 5, 4, 3, 2, 5, 1, 4, 6, 2]  # 38 tokens: in order, greedy needs 6 rows of 10
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for members in bins for i in members) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in members) <= 10 for members in bins)
    assert len(bins) == 4  # ceil(38 / 10): the fewest possible
    assert bins == best_fit_decreasing(lengths, 10)  # deterministic
    assert all(members == sorted(members) for members in bins)  # a row keeps its examples' order
    assert best_fit_decreasing([], 10) == [] and best_fit_decreasing([10, 10], 10) == [[0], [1]]


def test_packing_reports_its_fill_and_packs_within_windows(tmp_path):
    from lisa_dist.data import fill_rate
    from lisa_dist.models.tokenizer import byte_tokenizer

    examples = load_examples(cfg_for(tmp_path).data, byte_tokenizer())
    whole, windowed = pack_examples(examples, 1024), pack_examples(examples, 1024, window=8)
    assert fill_rate(whole, 1024) >= fill_rate(windowed, 1024) > 0.5
    assert (
        sum(map(len, whole["input_ids"]))
        == sum(map(len, windowed["input_ids"]))
        == sum(map(len, examples["input_ids"]))
    )
