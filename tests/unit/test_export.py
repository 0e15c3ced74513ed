"""Export at scale: sharded safetensors in the dtype asked for, written a shard at a time from tensors fetched a
module at a time; exact against `save_pretrained` (float32) and a plain cast (bfloat16); model.config_overrides."""

import json
import weakref

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from lisa_dist import cli
from lisa_dist.config import ModelConfig, load_config
from lisa_dist.errors import ConfigError
from lisa_dist.method import apply_lora
from lisa_dist.models import FolderSpec, build_preset, open_model, save_hf_folder
from lisa_dist.run import build, save, train, train_step
from lisa_dist.tools import exporter

from ..helpers import tiny_overrides

WIDE = '--model.config_overrides={"num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 256}'


def trained(tmp_path, data_file, *extra):
    """A 3-step local run saved as a checkpoint; returns the run (holding the weights) and the checkpoints folder."""
    cfg = load_config(None, tiny_overrides(tmp_path, data_file, "--train.steps=3", WIDE, *extra))
    run = build(cfg)
    for step in range(3):
        train_step(run, step)
    save(run, 3)
    return run, tmp_path / "run" / "checkpoints"


def folder_tensors(folder):
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_float32_is_save_pretrained_bitwise_and_bfloat16_a_plain_cast_in_bounded_shards(tmp_path, data_file):
    run, ckpt = trained(tmp_path, data_file)
    reference = tmp_path / "reference"
    run.backend.model.save_pretrained(reference)  # what `lisa-dist export` wrote before it streamed
    expected = load_file(reference / "model.safetensors")
    limit = 100_000
    out = tmp_path / "fp32"
    assert cli.main(["export", str(ckpt), str(out), "--dtype", "float32", "--max-shard-size", "100KB"]) == 0
    got = folder_tensors(out)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 3 and set(index["weight_map"]) == set(expected)
    assert {f.name for f in files} == set(index["weight_map"].values())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in expected.values())
    for file in files:  # a module larger than the limit (an MLP matrix, 128 KB) gets a file of its own
        shard = load_file(file)
        size = sum(t.numel() * t.element_size() for t in shard.values())
        assert size <= limit or len({k.rsplit(".", 1)[0] for k in shard}) == 1
    probe = torch.arange(24, dtype=torch.long).reshape(2, 12) % 200 + 5
    with torch.no_grad():
        assert torch.equal(
            AutoModelForCausalLM.from_pretrained(out)(input_ids=probe).logits, run.backend.model(input_ids=probe).logits
        )
    bf16 = tmp_path / "bf16"
    assert cli.main(["export", str(ckpt), str(bf16), "--dtype", "bfloat16"]) == 0
    got = load_file(bf16 / "model.safetensors")
    assert all(torch.equal(got[k], expected[k].to(torch.bfloat16)) for k in expected)
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(bf16).dtype == torch.bfloat16


def test_the_exporter_never_holds_more_than_one_shard_of_tensors(tmp_path, data_file, monkeypatch):
    _, ckpt = trained(tmp_path, data_file)
    live, peak, fetched = [0], [0], []
    read = exporter._reader

    def counting(backend, state):
        source = read(backend, state)

        class Counted:
            names = source.names

            def __call__(self, names):
                tensors = source(names)
                for tensor in tensors.values():
                    size = tensor.numel() * tensor.element_size()
                    live[0] += size
                    peak[0] = max(peak[0], live[0])
                    fetched.append(size)
                    weakref.finalize(tensor, lambda n=size: live.__setitem__(0, live[0] - n))
                return tensors

        return Counted()

    monkeypatch.setattr(exporter, "_reader", counting)
    limit = 500_000  # a decoder layer fits: its attention and MLP (4 x 96 KB, 3 x 128 KB)
    exporter.export(ckpt, tmp_path / "hf", dtype="float32", max_shard_size=limit)
    model_bytes = sum(t.numel() * 4 for t in folder_tensors(tmp_path / "hf").values())
    assert sum(fetched) == model_bytes  # every tensor read once
    assert model_bytes > 3 * limit and 0 < peak[0] <= limit and live[0] == 0


def test_the_default_dtype_is_the_published_one_and_a_tied_head_is_written_once(tmp_path, data_file):
    folder = tmp_path / "published"
    model, tokenizer = build_preset("tiny-llama3")
    model.to(torch.bfloat16).save_pretrained(folder)  # published in bfloat16, tied head
    tokenizer.save_pretrained(folder)
    _, ckpt = trained(tmp_path, data_file, f"--model.name={folder}", "--model.config_overrides={}")
    assert cli.main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    got = load_file(tmp_path / "hf" / "model.safetensors")
    assert {t.dtype for t in got.values()} == {torch.bfloat16} and "lm_head.weight" not in got
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.tie_word_embeddings


def test_lora_exports_merged_by_peft_module_by_module(tmp_path, data_file):
    _, ckpt = trained(
        tmp_path, data_file, "--lisa.enabled=false", "--lora.enabled=true", "--lora.r=4", "--optim.lr=5e-2"
    )
    assert cli.main(["export", str(ckpt), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    cfg = load_config(ckpt / "step-3" / "config.yaml")
    reference = open_model(cfg.model, seed=cfg.train.seed)[0]
    reference.to_empty(device="cpu")
    reference, _ = apply_lora(reference, cfg.lora)
    reference.load_state_dict(torch.load(ckpt / "step-3" / "state" / "model.pt"))
    expected = reference.merge_and_unload().state_dict()
    got = load_file(tmp_path / "hf" / "model.safetensors")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    base = torch.load(ckpt / "step-3" / "state" / "model.pt")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[q], base[f"base_model.model.{q.replace('.weight', '.base_layer.weight')}"])


def test_save_final_writes_the_dtype_and_shards_asked_for(tmp_path, data_file):
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            data_file,
            "--train.steps=2",
            WIDE,
            "--checkpoint.save_final=true",
            "--checkpoint.export_dtype=bfloat16",
            "--checkpoint.max_shard_size=150KB",
        ),
    )
    train(cfg)
    final = tmp_path / "run" / "final"
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.dtype == torch.bfloat16 and (final / "tokenizer_config.json").is_file()


def test_moe_experts_are_written_in_the_hub_layout_as_save_pretrained_writes_them(tmp_path):
    model, _ = build_preset("tiny-qwen3-moe")
    model.save_pretrained(tmp_path / "reference")
    expected = load_file(tmp_path / "reference" / "model.safetensors")
    state = model.state_dict()
    save_hf_folder(
        tmp_path / "hf",
        model,
        lambda names: {n: state[n] for n in names},
        FolderSpec(torch.float32, 20_000, progress=False),
    )
    got = folder_tensors(tmp_path / "hf")
    assert any(".experts.0." in k for k in expected)  # per-expert tensors on disk, fused ones in the model
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_checkpoint_that_lacks_a_tensor_is_named_before_anything_is_read(tmp_path, data_file):
    _, ckpt = trained(tmp_path, data_file)
    state_file = ckpt / "step-3" / "state" / "model.pt"
    state = torch.load(state_file)
    del state["model.layers.2.mlp.up_proj.weight"]
    torch.save(state, state_file)  # (the manifest would refuse it first: this is what stands behind it)
    with pytest.raises(ConfigError, match=r"lacks 1 tensor.*model.layers.2.mlp.up_proj.weight"):
        exporter._open(ckpt / "step-3")


@pytest.mark.parametrize(
    ("value", "message"),
    [("5 parsecs", "expected a size above 0"), ("0", "expected a size above 0"), ("-1GB", "expected a size")],
)
def test_a_bad_shard_size_is_named(tmp_path, data_file, value, message):
    with pytest.raises(ConfigError, match=f"checkpoint.max_shard_size=.*{message}"):
        load_config(None, tiny_overrides(tmp_path, data_file, f"--checkpoint.max_shard_size={value}"))
    with pytest.raises(ConfigError, match=r"checkpoint.export_dtype.*float16"):
        load_config(None, tiny_overrides(tmp_path, data_file, "--checkpoint.export_dtype=fp8"))


def test_config_overrides_apply_to_a_local_folder_and_a_preset(tmp_path):
    folder = tmp_path / "model"
    model, tokenizer = build_preset("tiny-qwen3")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    overrides = {
        "max_position_embeddings": 8192,
        "attention_dropout": 0.1,
        "attn_implementation": "eager",
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
    }
    skeleton, _, _ = open_model(ModelConfig(name=str(folder), config_overrides=overrides), seed=0)
    config = skeleton.config
    assert config.max_position_embeddings == 8192 and config.attention_dropout == 0.1
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 4.0
    assert config._attn_implementation == "eager"
    assert AutoConfig.from_pretrained(folder).max_position_embeddings == 2048  # the folder is untouched
    with pytest.raises(ConfigError, match=r"no field 'max_position_embedding' .*mean 'max_position_embeddings'"):
        open_model(ModelConfig(name=str(folder), config_overrides={"max_position_embedding": 4096}), seed=0)
    with pytest.raises(ConfigError, match=r"no field 'hiden_size' .*did you mean 'hidden_size'"):
        open_model(ModelConfig(name="tiny-llama", config_overrides={"hiden_size": 32}), seed=0)
    preset, _, _ = open_model(ModelConfig(name="tiny-llama", preset_overrides={"num_hidden_layers": 3}), seed=0)
    assert preset.config.num_hidden_layers == 3  # the old name still loads
