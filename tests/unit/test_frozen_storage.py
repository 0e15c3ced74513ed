"""Frozen layers stored quantized (int8, NF4) or cast (bf16) on the local backend: no update is ever lost, what is
saved and exported is exact, resume is exact; frozen embeddings and 8-bit Adam; config errors name the field."""

import pytest
import torch
from safetensors.torch import load_file

from lisa_dist.config import load_config
from lisa_dist.errors import ConfigError
from lisa_dist.run import build, save, train, train_step

from ..helpers import tiny_overrides, write_text_data

QUANTIZED = ("nf4", "int8")
# Layers 0 and 1 take turns (one at a time, 2 steps each); layers 2 and 3 are never sampled.
TAKE_TURNS = ("--lisa.strategy=weighted", "--lisa.weights=[1,1,0,0]")


@pytest.fixture
def data_file(tmp_path):
    return write_text_data(tmp_path / "data.jsonl")


def cfg_for(tmp_path, data_file, *extra):
    return load_config(None, tiny_overrides(tmp_path, data_file, *extra))


def layer_weights(run, i):
    """Layer i's exact weights as the backend holds them (a quantized block's from its host copies)."""
    prefix = f"{run.layout.layers_path}.{i}."
    return {n: t.detach().clone() for n, t in run.backend.exact_state_dict().items() if n.startswith(prefix)}


@pytest.mark.parametrize("storage", QUANTIZED)
def test_never_sampled_layers_are_exported_bitwise(tmp_path, data_file, storage):
    original = build(cfg_for(tmp_path / "ref", data_file)).backend.model.state_dict()
    cfg = cfg_for(tmp_path, data_file, f"--lisa.frozen_storage={storage}", "--checkpoint.save_final=true", *TAKE_TURNS)
    summary = train(cfg)
    assert summary["layers_visited"] == [0, 1]
    exported = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    for name, value in exported.items():
        changed = not torch.equal(value, original[name])
        never_trained = ".layers.2." in name or ".layers.3." in name
        assert changed != never_trained, name  # untouched ones bitwise, every trained one moved
        assert value.dtype == torch.float32


@pytest.mark.parametrize("storage", (*QUANTIZED, "bfloat16"))
def test_a_layer_starts_its_next_period_from_the_weights_it_left_with(tmp_path, data_file, storage):
    extra = ["--train.precision=bf16"] if storage == "bfloat16" else []
    run = build(
        cfg_for(tmp_path, data_file, f"--lisa.frozen_storage={storage}", *TAKE_TURNS, "--train.steps=8", *extra)
    )
    left_with, quantized_seen = {}, False
    for step in range(8):
        before = {i: layer_weights(run, i) for i in range(2)}
        train_step(run, step)
        (active,) = run.active
        if step % 2 == 0 and active in left_with:  # a new period: the layer re-entered
            for name, value in before[active].items():
                assert torch.equal(value, left_with[active][name]), (step, name)
        left_with[active] = layer_weights(run, active)
        other = run.trainable.layers[1 - active]
        quantized_seen |= any(type(p) is not torch.nn.Parameter for _, p in other)
        assert all(not p.requires_grad for _, p in other)
    assert quantized_seen == (storage in QUANTIZED)


@pytest.mark.parametrize(
    "extra",
    [
        ("--lisa.frozen_storage=nf4",),
        ("--lisa.frozen_storage=int8", "--lisa.train_embeddings=false"),
        pytest.param(("--lisa.frozen_storage=nf4", "--optim.adam_8bit=all"), marks=pytest.mark.slow),
    ],
    ids=["nf4", "int8-frozen-embeddings", "nf4-adam8"],
)
def test_exact_resume_with_quantized_storage(tmp_path, data_file, extra):
    steps = ["--train.steps=6"]
    straight = build(cfg_for(tmp_path / "straight", data_file, *steps, *extra))
    expected = [train_step(straight, s)["loss"] for s in range(6)]
    first = build(cfg_for(tmp_path, data_file, *steps, *extra))
    losses = [train_step(first, s)["loss"] for s in range(3)]
    save(first, 3)
    resumed = build(cfg_for(tmp_path, data_file, *steps, *extra))
    assert resumed.start_step == 3
    losses += [train_step(resumed, s)["loss"] for s in range(3, 6)]
    assert losses == expected  # bitwise
    final, reference = resumed.backend.exact_state_dict(), straight.backend.exact_state_dict()
    assert final.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(value, final[name]), name


def test_frozen_embeddings_stay_while_the_head_trains(tmp_path, data_file):
    run = build(cfg_for(tmp_path, data_file, "--lisa.train_embeddings=false"))
    embed, head = run.layout.embedding.weight, run.layout.head.weight
    before_embed, before_head = embed.detach().clone(), head.detach().clone()
    for step in range(2):
        train_step(run, step)
    assert torch.equal(embed, before_embed) and embed.grad is None and not embed.requires_grad
    assert not torch.equal(head, before_head)
    assert run.backend.optimizer.state.get(embed) is None


def test_a_tied_embedding_trains_as_the_head(tmp_path, data_file):
    run = build(
        cfg_for(
            tmp_path,
            data_file,
            "--lisa.train_embeddings=false",
            '--model.config_overrides={"num_hidden_layers":4,"hidden_size":64,"tie_word_embeddings":true}',
        )
    )
    weight = run.layout.embedding.weight
    before = weight.detach().clone()
    train_step(run, 0)
    assert weight.requires_grad and not torch.equal(weight, before)


def test_8bit_moments_are_smaller_and_training_matches_closely(tmp_path, data_file):
    wide = '--model.config_overrides={"num_hidden_layers":4,"hidden_size":64,"vocab_size":512}'
    plain = build(cfg_for(tmp_path / "plain", data_file, wide))
    eight = build(cfg_for(tmp_path / "eight", data_file, wide, "--optim.adam_8bit=always"))
    a = [train_step(plain, s)["loss"] for s in range(3)]
    b = [train_step(eight, s) for s in range(3)]
    assert b[-1]["optimizer_state_bytes"] < plain.backend.optimizer_state_bytes()
    assert [r["loss"] for r in b] == pytest.approx(a, rel=1e-3)
    embed = eight.layout.embedding.weight
    assert type(eight.backend.optimizer.state[embed]["exp_avg"]).__name__ == "OptimState8bit"
    layer_param = eight.trainable.layers[eight.active[0]][0][1]
    assert type(eight.backend.optimizer.state[layer_param]["exp_avg"]) is torch.Tensor  # layers: fp32 (always)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--backend.frozen_dtype=bfloat16"], r"'backend.frozen_dtype' is now 'lisa.frozen_storage'"),
        (["--lisa.frozen_storage=fp8"], r"lisa.frozen_storage='fp8'.*float32, bfloat16, int8, nf4"),
        (["--lisa.frozen_storage=bfloat16"], r"lisa.frozen_storage='bfloat16'.*train.precision=bf16"),
        (["--lisa.frozen_storage=nf4", "--model.dtype=bfloat16"], r"model.dtype='bfloat16'.*float32"),
        (
            ["--lisa.frozen_storage=nf4", "--backend.name=deepspeed", "--backend.ds_config=ds_configs/zero2.json"],
            r"lisa.frozen_storage='nf4'.*backend.name=local or fsdp",
        ),
        (
            ["--optim.adam_8bit=all", "--backend.name=deepspeed", "--backend.ds_config=ds_configs/zero3.json"],
            r"optim.adam_8bit='all'.*backend.name=local or fsdp",
        ),
        (
            ["--lisa.train_embeddings=false", "--lisa.enabled=false", "--lora.enabled=true"],
            r"lisa.train_embeddings=False.*LoRA baseline",
        ),
        (["--optim.adam_8bit=some"], r"optim.adam_8bit='some'.*none, always, all"),
        (["--optim.adam_8bit=yes"], r"optim.adam_8bit=True: expected one of none, always, all"),
        (["--lisa.host_dtype=int8"], r"lisa.host_dtype='int8'.*float32, bfloat16"),
        (["--train.loss=fused"], r"train.loss='fused'.*plain, chunked"),
        (["--train.loss_chunk_tokens=0"], r"train.loss_chunk_tokens=0"),
    ],
)
def test_bad_storage_settings_name_the_field(tmp_path, data_file, extra, match):
    with pytest.raises(ConfigError, match=match):
        cfg_for(tmp_path, data_file, *extra)
