"""Models users bring: layer discovery, a 3-step LISA run and an export on a tiny random config of each family.

A vision-language model (Gemma-3 4B-27B) trains its language tower: LISA samples the language model's layers, and
the vision tower and the multi-modal projector stay frozen (no gradients, no optimizer state, never run on text).
"""

import json
import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lisa_dist.config import LoraConfig, load_config
from lisa_dist.errors import ConfigError
from lisa_dist.method import apply_lora
from lisa_dist.models import build_preset, find_layout, preset_config, resolve_path
from lisa_dist.run import build, save, train_step
from lisa_dist.tools import Setup, estimate, export, shapes_of, shapes_of_model

from ..helpers import DEMO_DATA

VISION = {"model.vision_tower", "model.multi_modal_projector"}
LANGUAGE = "model.language_model"
# Written out by hand from the transformers sources: family -> (preset, model class, layer list, always-trained
# modules, tied head). Each preset has 4 layers.
FAMILIES = {
    "llama-3.x": ("tiny-llama3", "LlamaForCausalLM", "model.layers", {"model.embed_tokens", "model.norm"}, True),
    "qwen2.5": (
        "tiny-qwen2",
        "Qwen2ForCausalLM",
        "model.layers",
        {"model.embed_tokens", "model.norm", "lm_head"},
        False,
    ),
    "qwen3": ("tiny-qwen3", "Qwen3ForCausalLM", "model.layers", {"model.embed_tokens", "model.norm", "lm_head"}, False),
    "qwen3-moe": (
        "tiny-qwen3-moe",
        "Qwen3MoeForCausalLM",
        "model.layers",
        {"model.embed_tokens", "model.norm", "lm_head"},
        False,
    ),
    "gemma-2": ("tiny-gemma2", "Gemma2ForCausalLM", "model.layers", {"model.embed_tokens", "model.norm"}, True),
    "gemma-3-text": ("tiny-gemma3", "Gemma3ForCausalLM", "model.layers", {"model.embed_tokens", "model.norm"}, True),
    "mistral": (
        "tiny-mistral",
        "MistralForCausalLM",
        "model.layers",
        {"model.embed_tokens", "model.norm", "lm_head"},
        False,
    ),
    "phi-3": ("tiny-phi3", "Phi3ForCausalLM", "model.layers", {"model.embed_tokens", "model.norm", "lm_head"}, False),
    "olmo-2": (
        "tiny-olmo2",
        "Olmo2ForCausalLM",
        "model.layers",
        {"model.embed_tokens", "model.norm", "lm_head"},
        False,
    ),
    "gpt-neox": (
        "tiny-gpt-neox",
        "GPTNeoXForCausalLM",
        "gpt_neox.layers",
        {"gpt_neox.embed_in", "gpt_neox.final_layer_norm", "lm_head"},
        False,
    ),
    "gemma-3-vision": (
        "tiny-gemma3-vl",
        "Gemma3ForConditionalGeneration",
        f"{LANGUAGE}.layers",
        {f"{LANGUAGE}.embed_tokens", f"{LANGUAGE}.norm"},
        True,
    ),
}
STEPS, GAMMA, LAYERS = 3, 2, 4
EXACT = ("params", "grads", "masters", "moments", "host")  # the planner's exact figures


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A few demo responses as text rows: 3 steps of 2 blocks of 32 tokens need little."""
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    rows = [json.loads(line)["output"] for line in DEMO_DATA.read_text().splitlines()[:12]]
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    return path


def _numel(named) -> int:
    return sum(p.numel() for _, p in named)


def _under(name: str, modules: set[str]) -> bool:
    return any(name.startswith(f"{m}.") for m in modules)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_discovery(family):
    preset, cls, path, always, tied = FAMILIES[family]
    model, _ = build_preset(preset)
    layout = find_layout(model)
    vision = VISION if family == "gemma-3-vision" else set()

    assert type(model).__name__ == cls
    assert layout.layers_path == path and layout.num_layers == LAYERS and layout.layers is resolve_path(model, path)
    assert set(layout.always) == always and set(layout.frozen) == vision
    assert (layout.head is None) == tied
    named = dict(model.named_parameters())  # a tied weight appears once, under the embedding's name
    trained = layout.always_trained_params()
    assert {n for n, _ in trained} == {n for n in named if not _under(n, {path} | vision)}
    assert [id(p) for _, p in trained].count(id(model.get_input_embeddings().weight)) == 1
    frozen = layout.frozen_params()
    assert {n for n, _ in frozen} == {n for n in named if _under(n, vision)}
    in_layers = [(n, p) for i in range(LAYERS) for n, p in layout.layers[i].named_parameters()]
    assert _numel(trained) + _numel(in_layers) + _numel(frozen) == _numel(named.items())


def _args(tmp_path, data_file, preset) -> list[str]:
    return [
        f"--data.path={data_file}",
        "--data.format=text",
        "--data.max_length=32",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--model.name={preset}",
        "--train.micro_batch_size=2",
        f"--train.steps={STEPS}",
        f"--train.output_dir={tmp_path / 'run'}",
        "--train.device=cpu",
        "--optim.lr=3e-3",
        f"--lisa.gamma={GAMMA}",
        "--lisa.interval=2",
        "--logging.progress=false",
    ]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _lisa_steps(run) -> dict[str, torch.Tensor]:
    """STEPS steps; after each, exactly the active layers have moved. Returns the weights before the first."""
    first = _snapshot(run.backend.model)
    for step in range(STEPS):
        before = _snapshot(run.backend.model)
        record = train_step(run, step)
        assert math.isfinite(record["loss"]), (step, record["loss"])
        active = record["active_layers"]
        assert len(active) == GAMMA and set(active) <= set(range(run.layout.num_layers))
        for i, layer in enumerate(run.trainable.layers):
            moved = [not torch.equal(before[n], p) for n, p in layer]
            assert any(moved) if i in active else not any(moved), (step, i, active)
    assert run.switches == 2  # periods of 2 steps: a switch at steps 1 and 3
    return first


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_three_step_lisa_run_and_export(tmp_path, data_file, family, caplog):
    preset, cls, *_ = FAMILIES[family]
    with caplog.at_level(logging.INFO, logger="lisa_dist"):
        run = build(load_config(None, _args(tmp_path, data_file, preset)))
    first = _lisa_steps(run)
    model, optimizer = run.backend.model, run.backend.optimizer
    for name, p in run.trainable.always:
        assert not torch.equal(first[name], p), name
    frozen = run.layout.frozen_params()
    assert bool(frozen) == (family == "gemma-3-vision")
    for name, p in frozen:  # the vision tower: never trained, no gradient, no optimizer state
        assert torch.equal(first[name], p) and not p.requires_grad and p.grad is None and p not in optimizer.state
    if frozen:
        assert "vision-language model" in caplog.text and "model.vision_tower (" in caplog.text

    save(run, STEPS)
    checkpoint = export(tmp_path / "run" / "checkpoints", tmp_path / "hf")
    trained = torch.load(checkpoint / "state" / "model.pt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(loaded).__name__ == cls
    exported = loaded.state_dict()
    assert exported.keys() == trained.keys() == model.state_dict().keys()
    for name, value in trained.items():
        assert torch.equal(exported[name], value), name


VL_TRAINED = 16_768  # the tied embedding (261 x 64) and the final norm


def test_planner_stores_the_vision_tower_frozen():
    model, _ = build_preset("tiny-gemma3-vl")
    vision = {n: p.numel() for n, p in model.named_parameters() if _under(n, VISION)}
    shapes = shapes_of(preset_config("tiny-gemma3-vl"))
    assert {p.name: p.numel for p in shapes.frozen} == vision
    assert sum(p.numel for p in shapes.always) == VL_TRAINED
    total = sum(p.numel() for p in model.parameters())
    assert shapes.num_params == total
    lisa = estimate(shapes, "lisa", Setup(backend="local", world_size=1, precision="fp32", gamma=GAMMA))
    layer = sum(p.numel for p in shapes.layers[0])
    assert lisa.params == 4 * total  # every weight stored, the vision tower included
    assert lisa.moments == 2 * 4 * (VL_TRAINED + GAMMA * layer)  # and none of its moments


@pytest.mark.parametrize(
    "extra", [(), ("--lisa.frozen_storage=bfloat16", "--train.precision=bf16")], ids=["fp32", "frozen-bf16"]
)
def test_planner_matches_the_vision_language_run(tmp_path, data_file, extra):
    """frozen-bf16: the vision tower is stored in bf16 like the frozen layers; the planner knows, byte for byte."""
    cfg = load_config(None, [*_args(tmp_path, data_file, "tiny-gemma3-vl"), *extra])
    run = build(cfg)
    for step in range(STEPS):
        train_step(run, step)
    predicted = estimate(shapes_of_model(run.layout.model), "lisa", Setup.from_config(cfg), active=run.active)
    measured = run.backend.state_bytes()
    assert {k: measured[k] for k in EXACT} == {k: predicted.as_dict()[k] for k in EXACT}


def test_lora_leaves_the_vision_tower_alone():
    model, _ = build_preset("tiny-gemma3-vl")
    assert any(n.endswith("q_proj") for n, _ in model.model.vision_tower.named_modules())  # SigLIP's names too
    model, trainable = apply_lora(model, LoraConfig(enabled=True, r=2, target_modules=["q_proj", "v_proj"]))
    names = [n for n, _ in trainable.always]
    assert names and all(f"{LANGUAGE}.layers." in n and "lora_" in n for n in names)


def test_layers_inside_the_vision_tower_are_refused():
    model, _ = build_preset("tiny-gemma3-vl")
    with pytest.raises(ConfigError, match=r"model.vision_tower"):
        find_layout(model, "model.vision_tower.vision_model.encoder.layers")
