"""Layer discovery for every registered family, tiny presets, and loading models by name."""

from __future__ import annotations

from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lisa_dist import cli
from lisa_dist.config import ModelConfig
from lisa_dist.errors import ConfigError
from lisa_dist.models import (
    FAMILIES,
    PRESETS,
    build_preset,
    byte_tokenizer,
    find_layout,
    load_model,
    resolve_path,
    tiny_config,
)

# Written out by hand, independently of the registry: family -> (layer list, block class, final norm).
EXPECTED = {
    "llama": ("model.layers", "LlamaDecoderLayer", "model.norm"),
    "mistral": ("model.layers", "MistralDecoderLayer", "model.norm"),
    "mixtral": ("model.layers", "MixtralDecoderLayer", "model.norm"),
    "qwen2": ("model.layers", "Qwen2DecoderLayer", "model.norm"),
    "qwen2_moe": ("model.layers", "Qwen2MoeDecoderLayer", "model.norm"),
    "qwen3": ("model.layers", "Qwen3DecoderLayer", "model.norm"),
    "qwen3_moe": ("model.layers", "Qwen3MoeDecoderLayer", "model.norm"),
    "gemma": ("model.layers", "GemmaDecoderLayer", "model.norm"),
    "gemma2": ("model.layers", "Gemma2DecoderLayer", "model.norm"),
    "gemma3_text": ("model.layers", "Gemma3DecoderLayer", "model.norm"),
    "gemma3": ("model.language_model.layers", "Gemma3DecoderLayer", "model.language_model.norm"),
    "olmo2": ("model.layers", "Olmo2DecoderLayer", "model.norm"),
    "phi": ("model.layers", "PhiDecoderLayer", "model.final_layernorm"),
    "phi3": ("model.layers", "Phi3DecoderLayer", "model.norm"),
    "gpt2": ("transformer.h", "GPT2Block", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "GPTNeoXLayer", "gpt_neox.final_layer_norm"),
    "opt": ("model.decoder.layers", "OPTDecoderLayer", "model.decoder.final_layer_norm"),
}
VOCAB = len(byte_tokenizer())


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import; patch the constant too so no test waits on the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_registered_family_is_tested():
    assert set(FAMILIES) == set(EXPECTED)


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_layout_of_family(model_type):
    path, block, norm = EXPECTED[model_type]
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, num_layers=3))
    layout = find_layout(model)

    assert layout.layers_path == path and layout.num_layers == 3
    assert layout.layers is resolve_path(model, path)
    assert [type(b).__name__ for b in layout.layers] == [block] * 3
    named = dict(model.named_parameters())
    for i, layer in enumerate(layout.layers):
        assert all(named[f"{path}.{i}.{n}"] is p for n, p in layer.named_parameters())

    always = layout.always_trained_params()
    frozen = {n for n, _ in layout.frozen_params()}  # a vision-language model's vision tower
    assert {n for n, _ in always} == {n for n in named if not n.startswith(f"{path}.")} - frozen
    layer_params = [p for i in range(3) for p in layout.layer_params(i)]
    assert not {id(p) for p in layer_params} & {id(p) for _, p in always}
    assert _numel(p for _, p in always) + _numel(layer_params) + _numel(named[n] for n in frozen) == _numel(
        model.parameters()
    )

    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    always_ids = {id(p) for _, p in always}
    assert id(embed.weight) in always_ids and id(head.weight) in always_ids
    modules = list(layout.always.values())
    assert embed in modules and resolve_path(model, norm) in modules
    assert (head in modules) == (head.weight is not embed.weight)
    assert model_type in layout.describe()

    logits = model(torch.randint(0, VOCAB, (2, 5))).logits
    assert logits.shape == (2, 5, VOCAB)


@pytest.mark.parametrize("tied", [False, True])
def test_tied_embeddings_counted_once(tied):
    model = AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=tied))
    layout = find_layout(model)
    always = layout.always_trained_params()
    layer_numel = _numel(p for i in range(layout.num_layers) for p in layout.layer_params(i))
    assert _numel(p for _, p in always) + layer_numel == _numel(model.parameters())
    assert [id(p) for _, p in always].count(id(model.get_input_embeddings().weight)) == 1
    assert ("lm_head" in layout.always) is not tied
    assert len(always) == (2 if tied else 3)  # embedding, final norm, and the head when it is its own weight


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)


class MoEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))


class Custom(nn.Module):
    """A non-Hugging Face model: a ModuleList per keyword, of `n` modules made by the factory."""

    def __init__(self, **lists: tuple[int, type]) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        for name, (n, factory) in lists.items():
            setattr(self, name, nn.ModuleList(factory() for _ in range(n)))


def test_generic_fallback_picks_the_longest_block_list():
    model = Custom(blocks=(3, Block), heads=(2, Block))
    layout = find_layout(model)
    assert layout.layers_path == "blocks" and layout.layers is model.blocks
    assert {n for n, _ in layout.always_trained_params()} == {
        "embed.weight",
        "heads.0.proj.weight",
        "heads.0.proj.bias",
        "heads.1.proj.weight",
        "heads.1.proj.bias",
    }
    # Neither a Hugging Face model nor a registered family: every module outside the blocks that holds parameters.
    assert layout.always == {
        "embed": model.embed,
        "heads.0.proj": model.heads[0].proj,
        "heads.1.proj": model.heads[1].proj,
    }


def test_generic_fallback_ignores_lists_inside_blocks():
    model = Custom(blocks=(3, MoEBlock))
    assert find_layout(model).layers is model.blocks


def test_unknown_layout_of_known_family_falls_back():
    model = Custom(blocks=(3, Block))
    model.config = SimpleNamespace(model_type="llama")
    assert find_layout(model).layers is model.blocks


def test_layers_path_override():
    model = Custom(blocks=(3, Block), heads=(2, Block))
    layout = find_layout(model, "heads")
    assert layout.layers is model.heads and layout.num_layers == 2
    assert "blocks.2.proj.weight" in dict(layout.always_trained_params())

    llama = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert find_layout(llama, "model.layers").layers is llama.model.layers


def test_error_without_any_module_list():
    with pytest.raises(ConfigError) as info:
        find_layout(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert "no nn.ModuleList found" in str(info.value) and "model.layers_path" in str(info.value)


def test_error_on_ambiguous_module_lists():
    with pytest.raises(ConfigError) as info:
        find_layout(Custom(blocks=(3, Block), towers=(3, MoEBlock)))
    message = str(info.value)
    assert "blocks (3 x Block)" in message and "towers (3 x MoEBlock)" in message
    assert "towers.0.experts (6 x Linear)" in message and "model.layers_path" in message


def test_error_on_bad_override():
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(ConfigError) as info:
        find_layout(model, "model.layerz")
    assert "'layerz'" in str(info.value) and "model.layers (2 x LlamaDecoderLayer)" in str(info.value)
    with pytest.raises(ConfigError, match=r"not an nn.ModuleList"):
        find_layout(model, "model.norm")


def test_layout_of_peft_model_is_relative_to_the_wrapper():
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    layers = find_layout(model).layers
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    for override in (None, "model.layers"):
        layout = find_layout(wrapped, override)
        assert layout.layers is layers and layout.layers_path == "base_model.model.model.layers"
        named = dict(wrapped.named_parameters())
        assert all(named[n] is p for n, p in layout.always_trained_params())
        assert "base_model.model.lm_head" in layout.always


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_deterministic_and_runs(name):
    model, tokenizer = build_preset(name, {}, seed=3)
    again, _ = build_preset(name, {}, seed=3)
    assert _same_weights(model, again)
    assert model.config.get_text_config().vocab_size == len(tokenizer) == VOCAB
    assert find_layout(model).num_layers == 4
    ids = tokenizer("hello", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], VOCAB)


def test_preset_seed_dtype_and_caller_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    model, _ = build_preset("tiny-llama", {}, seed=1)
    assert torch.equal(torch.rand(3), expected)  # the build leaves the caller's RNG alone
    other, _ = build_preset("tiny-llama", {}, seed=2)
    assert not _same_weights(model, other)
    assert not model.config.tie_word_embeddings
    bf16, _ = build_preset("tiny-llama", {}, seed=1, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert _same_weights(model.to(torch.bfloat16), bf16)


def test_config_overrides():
    model, _ = build_preset("tiny-qwen2", {"num_hidden_layers": 2, "intermediate_size": 96}, seed=0)
    assert find_layout(model).num_layers == 2 and model.config.intermediate_size == 96
    with pytest.raises(ConfigError, match="'no_such_field'"):
        build_preset("tiny-llama", {"no_such_field": 1}, seed=0)
    with pytest.raises(ConfigError, match="tiny-llama"):
        build_preset("tiny-nothing", {}, seed=0)


def test_load_preset_through_config():
    model, tokenizer = load_model(ModelConfig(name="tiny-gpt2", config_overrides={"n_layer": 3}), seed=5)
    assert find_layout(model).num_layers == 3 and tokenizer.pad_token == "<pad>"
    assert _same_weights(model, build_preset("tiny-gpt2", {"n_layer": 3}, seed=5)[0])


def test_load_model_round_trip(tmp_path):
    model, tokenizer = build_preset("tiny-llama", {}, seed=7)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    loaded, loaded_tok = load_model(ModelConfig(name=str(tmp_path)), seed=0)
    assert type(loaded) is type(model) and _same_weights(model, loaded)
    assert loaded_tok("héllo").input_ids == tokenizer("héllo").input_ids
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id

    bf16, _ = load_model(ModelConfig(name=str(tmp_path), dtype="bfloat16"), seed=0)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_tokenizer_override_and_pad_fallback(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    _, loaded = load_model(ModelConfig(name="tiny-llama", tokenizer=str(tmp_path)), seed=0)
    assert loaded.pad_token == loaded.eos_token == "</s>"


def test_unknown_name_error():
    with pytest.raises(ConfigError) as info:
        load_model(ModelConfig(name="no-such-org/no-such-model"), seed=0)
    message = str(info.value)
    assert "model.name='no-such-org/no-such-model'" in message
    assert all(name in message for name in PRESETS)
    assert "local folder" in message and ".gguf" in message and "hub" in message


def test_other_load_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"no such .gguf file"):
        load_model(ModelConfig(name=str(tmp_path / "missing.gguf")), seed=0)
    with pytest.raises(ConfigError, match="cannot load a causal language model"):
        load_model(ModelConfig(name=str(tmp_path)), seed=0)
    with pytest.raises(ConfigError, match=r"model.dtype"):
        load_model(ModelConfig(name="tiny-llama", dtype="float8"), seed=0)


def _write_gguf(model: nn.Module, tokenizer, path) -> None:
    """A float32 GGUF of a tiny qwen2 with its byte vocabulary, as llama.cpp's converter would lay it out."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    tokens = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in tokenizer.all_special_tokens else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        module, kind = name.rsplit(".", 1)
        writer.add_tensor(f"{names.get_name(module)}.{kind}", tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_load_gguf(tmp_path):
    model, tokenizer = build_preset("tiny-qwen2", {"num_hidden_layers": 2}, seed=4)
    _write_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    loaded, loaded_tok = load_model(ModelConfig(name=str(tmp_path / "tiny.gguf")), seed=0)
    assert type(loaded) is type(model) and _same_weights(model, loaded)
    assert loaded_tok("héllo <|im_end|>").input_ids == tokenizer("héllo <|im_end|>").input_ids


TIED_PRESETS = [name for name in sorted(PRESETS) if PRESETS[name]().tie_word_embeddings]


@pytest.mark.parametrize("name", TIED_PRESETS)
def test_tied_presets_hold_transformers_own_parameter_count(name):
    from lisa_dist.models import open_model
    from lisa_dist.tools import model_config, shapes_of

    expected = _numel(AutoModelForCausalLM.from_config(PRESETS[name]()).parameters())
    skeleton, _, _ = open_model(ModelConfig(name=name), seed=0)
    assert _numel(skeleton.parameters()) == expected
    model, _ = load_model(ModelConfig(name=name), seed=0)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert _numel(model.parameters()) == expected
    assert shapes_of(model_config(name), name).num_params == expected  # the planner counts the tie once


def test_tied_local_folder_and_lisa_dist_layers(tmp_path, capsys):
    from lisa_dist.models import open_model

    config = tiny_config("llama", num_layers=3, tie_word_embeddings=True)
    reference = AutoModelForCausalLM.from_config(config)
    reference.save_pretrained(tmp_path / "tied")
    byte_tokenizer().save_pretrained(tmp_path / "tied")
    expected = _numel(reference.parameters())
    skeleton, _, _ = open_model(ModelConfig(name=str(tmp_path / "tied")), seed=0)
    assert _numel(skeleton.parameters()) == expected
    model, _ = load_model(ModelConfig(name=str(tmp_path / "tied")), seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert cli.main(["layers", "tiny-gpt2"]) == 0
    out = capsys.readouterr().out
    assert f"{_numel(AutoModelForCausalLM.from_config(PRESETS['tiny-gpt2']()).parameters()):,} params" in out


def test_generic_fallback_lists_the_final_norm_as_always_trained():
    # A family lisa_dist does not know: the generic fallback finds the blocks, and the final norm trains always.
    model = AutoModelForCausalLM.from_config(tiny_config("gptj", num_layers=3))
    assert model.config.model_type not in FAMILIES
    layout = find_layout(model)
    assert layout.layers_path == "transformer.h"
    assert layout.always["transformer.ln_f"] is model.transformer.ln_f
    assert {"transformer.wte", "lm_head"} <= set(layout.always)
