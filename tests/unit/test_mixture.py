"""data.mixture: several sources drawn by weight, reproducibly from the seed; a hub-style dataset folder through
datasets.load_dataset (offline); per-source counts in the log and summary.json; a bad source names itself."""

import json
import logging

import pytest
import torch

from lisa_dist.config import load_config
from lisa_dist.data import MixtureOrder
from lisa_dist.errors import ConfigError, DataError
from lisa_dist.run import build, train

from ..helpers import DEMO_DATA

TINY = ["--model.name=tiny-llama", '--model.config_overrides={"num_hidden_layers":4,"hidden_size":64}']


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sources(tmp_path):
    """An Alpaca file (the demo's 252 rows) and a ShareGPT file of 40 short conversations."""
    chats = [
        {
            "conversations": [
                {"from": "human", "value": f"Count to {i}."},
                {"from": "gpt", "value": " ".join(map(str, range(1, i + 2)))},
            ]
        }
        for i in range(40)
    ]
    return str(DEMO_DATA), str(write_jsonl(tmp_path / "chats.jsonl", chats))


def overrides(tmp_path, mixture, *extra):
    return [
        f"--data.mixture={json.dumps(mixture)}",
        "--data.max_length=512",
        "--data.skip_bad_rows=true",
        f"--data.cache_dir={tmp_path / 'cache'}",
        *TINY,
        "--train.micro_batch_size=2",
        "--train.steps=3",
        f"--train.output_dir={tmp_path / 'run'}",
        "--lisa.gamma=1",
        "--lisa.interval=2",
        "--logging.progress=false",
        *extra,
    ]


def test_each_epoch_draws_sources_by_weight_reproducibly():
    order = MixtureOrder([100, 20], [1.0, 3.0], seed=7)
    assert order.draws == [30, 90] and order.size == 120  # 120 examples, drawn 1:3
    first = order(0)
    assert torch.equal(first, MixtureOrder([100, 20], [1.0, 3.0], seed=7)(0))  # every rank, every resume
    assert not torch.equal(first, order(1))  # each epoch draws anew
    small = first[first >= 100] - 100
    assert len(small) == 90 and set(small.tolist()) == set(range(20))  # the small source repeats, whole
    big = first[first < 100]
    assert len(big) == 30 and len(set(big.tolist())) == 30  # the large one is subsampled without repeats


def test_a_mixture_trains_and_reports_each_source(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lisa_dist")
    alpaca, chats = sources(tmp_path)
    mixture = [
        {"path": alpaca, "format": "alpaca", "weight": 1},
        {"path": chats, "format": "auto", "weight": 3, "eval_fraction": 0.1},
    ]
    cfg = load_config(None, overrides(tmp_path, mixture))
    run = build(cfg)
    train_rows = [s["rows"] for s in run.data_sources]
    assert run.data_sources[1]["held_out"] == 4 and train_rows[1] == 36
    assert run.batches.num_examples == sum(run.data_sources[i]["draws_per_epoch"] for i in range(2))
    drawn = run.batches.permutation(0)
    from_chats = int((drawn >= train_rows[0]).sum())
    assert from_chats == run.data_sources[1]["draws_per_epoch"] == round(sum(train_rows) * 3 / 4)
    assert run.eval_set is not None and len(run.eval_set.dataset) == 4
    summary = train(load_config(None, overrides(tmp_path / "again", mixture)))
    assert [s["path"] for s in summary["data_sources"]] == [alpaca, chats]
    assert summary["data_sources"][1]["format"] == "auto" and summary["data_sources"][0]["tokens"] > 0
    assert "data.mixture: " in caplog.text and "drawn per epoch" in caplog.text


def test_a_hub_style_dataset_folder_loads_through_datasets_with_its_subset(tmp_path):
    repo = tmp_path / "repo"
    (repo / "easy").mkdir(parents=True)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: easy\n  data_files:\n  - split: train\n    path: easy/*.jsonl\n---\n"
    )
    write_jsonl(repo / "easy" / "part.jsonl", [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(30)])
    mixture = [{"path": str(repo), "subset": "easy", "format": "alpaca"}, {"path": str(DEMO_DATA), "weight": 0.5}]
    run = build(load_config(None, overrides(tmp_path, mixture, "--data.format=alpaca")))
    assert run.data_sources[0]["examples"] == 30
    bad = [{"path": str(repo), "subset": "hard", "format": "alpaca"}]
    with pytest.raises(
        DataError,
        match=r"data.mixture\[0\] \(\S*repo\): data.path \S*repo\S* is neither a local "
        r"file or folder nor a dataset reachable on the hub \(split 'train', subset "
        r"'hard'\)",
    ):
        build(load_config(None, overrides(tmp_path / "bad", bad, "--data.format=alpaca")))


def test_a_bad_source_names_itself(tmp_path):
    alpaca, _ = sources(tmp_path)
    mixture = [{"path": alpaca}, {"path": str(tmp_path / "missing.jsonl")}]
    with pytest.raises(
        DataError,
        match=r"data.mixture\[1\] \(\S*missing.jsonl\): data.path '\S*missing.jsonl' does "
        r"not exist",
    ):
        build(load_config(None, overrides(tmp_path, mixture)))


@pytest.mark.parametrize(
    ("mixture", "extra", "message"),
    [
        (
            [{"path": "a.jsonl", "wieght": 2}],
            [],
            r"data.mixture\[0\].wieght is not a field \(did you mean 'weight'\?\)",
        ),
        ([{"path": "a.jsonl", "weight": 0}], [], r"data.mixture\[0\].weight=0 is not allowed: expected a number > 0"),
        ([{"format": "chat"}], [], r"data.mixture\[0\].path=None is not allowed"),
        ([{"path": "a.jsonl", "format": "csv"}], [], r"data.mixture\[0\].format='csv' is not allowed"),
        ([{"path": "a.jsonl"}], ["--data.path=b.jsonl"], "give data.path or data.mixture, not both"),
        ([{"path": "a.jsonl"}], ["--data.eval_fraction=0.1"], "give each source its eval_fraction"),
    ],
)
def test_bad_mixtures_name_the_field(tmp_path, mixture, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*overrides(tmp_path, mixture), *extra])
