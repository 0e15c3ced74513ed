"""Bad input gets one message naming the file, line or field and the cause (exit 2), never a raw traceback."""

import json
import logging
import subprocess
import sys

import pytest
import torch

from lisa_dist import cli
from lisa_dist.config import ModelConfig, load_config
from lisa_dist.data import load_examples, load_examples_with_stats
from lisa_dist.errors import ConfigError, DataError
from lisa_dist.models import build_preset, load_model

from ..helpers import REPO, launcher_env, tiny_overrides, write_text_data

ROW = {"instruction": "Say hi", "input": "", "output": "Hi there"}


@pytest.fixture
def tok():
    from lisa_dist.models import byte_tokenizer

    return byte_tokenizer()


def data_cfg(tmp_path, path, fmt="alpaca", **extra):
    return load_config(
        None,
        [
            f"--data.path={path}",
            f"--data.format={fmt}",
            f"--data.cache_dir={tmp_path / 'c'}",
            *[f"--data.{k}={v}" for k, v in extra.items()],
        ],
    ).data


def test_a_non_utf8_line_is_named_and_can_be_skipped(tmp_path, tok):
    path = tmp_path / "a.jsonl"
    path.write_bytes(
        json.dumps(ROW).encode()
        + b"\n"
        + b'{"instruction": "caf\xe9", "output": "x"}\n'
        + json.dumps(ROW).encode()
        + b"\n"
    )
    with pytest.raises(DataError, match=r"a.jsonl, line 2: not UTF-8 text \(byte 0xe9 at column 21\)"):
        load_examples(data_cfg(tmp_path, path), tok)
    _, stats = load_examples_with_stats(data_cfg(tmp_path, path, skip_bad_rows="true"), tok)
    assert stats.examples == 2 and stats.skipped_rows == 1


def test_a_malformed_json_line_has_its_one_based_line_number(tmp_path, tok):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(ROW) + "\n\n" + '{"instruction": "x", "output": }\n')
    with pytest.raises(DataError, match=r"a.jsonl, line 3: malformed JSON \(Expecting value at column 32\)"):
        load_examples(data_cfg(tmp_path, path), tok)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "is empty"),
        ("  \n\t\n", "is empty"),
        (json.dumps([ROW]) + "\n" + json.dumps(ROW) + "\n", "line 2: more JSON after the list"),
        ('[{"instruction": "x",\n "output": }]', r"line 2: malformed JSON"),
    ],
)
def test_unusable_json_files(tmp_path, tok, text, reason):
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(DataError, match=reason):
        load_examples(data_cfg(tmp_path, path), tok)


def test_truncated_rows_are_counted_in_the_log(tmp_path, tok, caplog):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({**ROW, "output": "word " * n}) + "\n" for n in (1, 60, 2, 80)))
    with caplog.at_level(logging.INFO, logger="lisa_dist.data.sources"):
        _, stats = load_examples_with_stats(data_cfg(tmp_path, path, max_length=300), tok)
    assert stats.truncated_rows == 2
    assert "2 truncated to data.max_length=300" in caplog.text


def test_model_folders_that_do_not_load(tmp_path):
    model, tokenizer = build_preset("tiny-llama")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=rf"{weights} is not a readable safetensors file \(truncated"):
        load_model(ModelConfig(name=str(tmp_path / "m")), seed=0)
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"the folder has no config.json"):
        load_model(ModelConfig(name=str(tmp_path / "m")), seed=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_names_the_field(tmp_path, caplog):
    data = write_text_data(tmp_path / "d.jsonl")
    with caplog.at_level(logging.ERROR, logger="lisa_dist"):
        code = cli.main(["train", *tiny_overrides(tmp_path, data, "--train.device=cuda")])
    assert code == 2
    assert "train.device='cuda' but torch sees no CUDA device" in caplog.text


@pytest.mark.parametrize(
    "flag, value",
    [("--seq-len", "-5"), ("--gpu-mem", "0"), ("--gpus", "0"), ("--gpu-mem", "nan"), ("--gpu-mem", "inf")],
)
def test_estimate_refuses_non_positive_and_non_finite_sizes(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["estimate", "--model", "llama-2-7b", flag, value])
    assert stop.value.code == 2
    assert f"argument {flag}: '{value}': expected a finite value > 0" in capsys.readouterr().err


def test_train_help_lists_the_sections_an_example_and_where_fields_are_documented(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "model, data, lisa, lora, optim, train, backend, checkpoint, logging" in out
    assert "lisa-dist train configs/demo_tiny.yaml" in out and "lisa-dist config --doc" in out


def test_config_doc_prints_every_field_with_its_documentation(capsys):
    from dataclasses import fields

    from lisa_dist.config import Config

    assert cli.main(["config", "--doc"]) == 0
    out = capsys.readouterr().out
    for section in fields(Config):
        for field in fields(getattr(Config(), section.name)):
            assert f"{section.name}.{field.name} = " in out, field.name
    assert "Decoder layers active at once, in 1..L." in out


def test_a_distributed_backend_without_a_launcher_says_how_to_start_more(tmp_path):
    data = write_text_data(tmp_path / "d.jsonl")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lisa_dist.cli",
            "train",
            *tiny_overrides(tmp_path, data, "--backend.name=fsdp", "--train.steps=1"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=launcher_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend.name=fsdp without a launcher: running as one rank" in proc.stderr
    assert "launch/torchrun.sh (NPROC_PER_NODE=N)" in proc.stderr
