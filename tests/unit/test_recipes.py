"""The recipes of configs/recipes/: each loads and validates, its model (from the offline registry of published hub
configs) is built on the meta device and laid out (layers, tied head, gamma against L), its chat template masks the
assistant turns, and `lisa-dist estimate --config` prints the figures its header states, so the header cannot go
stale. Also the registry itself and the planner's reading of a config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lisa_dist.cli import main as cli_main
from lisa_dist.config import CHAT_TEMPLATES, load_config, validate_for_model
from lisa_dist.data.chat import BUILTIN_TEMPLATES, encode_messages
from lisa_dist.errors import ConfigError
from lisa_dist.models import HUB_CONFIGS, MODEL_ALIASES, build_skeleton, byte_tokenizer, find_layout, hub_config, hub_id
from lisa_dist.tools import MODEL_PRESETS, model_config, planner_backend

from .test_chat_templates import CONVERSATION, FAMILIES
from .test_data import supervised_runs

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
GIB = 1024**3
CARDS = (24, 40, 48, 80, 141)
"""GiB of the GPUs a header names as the smallest that fits: 24 GB cards, A100 40GB, L40S/A6000, A100/H100, H200."""
# The chat behaviour of each family's own template (tests/unit/test_chat_templates.py), keyed by model_type.
FAMILY_TEMPLATE = {"llama": "llama3", "qwen2": "chatml", "qwen3": "qwen3", "mistral": "mistral", "gemma3": "gemma"}
# transformers' parameter count of each recipe model's registry config, tied weights once; the hub pages show 8.03B,
# 70.6B, 7.62B, 8.19B, 7.25B and 12.2B.
PUBLISHED_SIZES = {
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "meta-llama/Llama-3.1-70B-Instruct": 70_553_706_496,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "mistralai/Mistral-7B-Instruct-v0.3": 7_248_023_552,
    "google/gemma-3-12b-it": 12_187_325_040,
}


@pytest.fixture(autouse=True)
def _at_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name ds_configs/ relative to the repository, as the launchers run them


def _id(path: Path) -> str:
    return path.stem


def test_the_issues_recipes_are_shipped():
    models = {load_config(p).model.name: p for p in RECIPES}
    assert set(PUBLISHED_SIZES) <= set(models)
    backends = {(cfg.model.name, cfg.backend.name, cfg.lisa.frozen_storage) for cfg in map(load_config, RECIPES)}
    assert ("meta-llama/Llama-3.1-70B", "fsdp", "nf4") in backends
    assert any(cfg.backend.ds_config == "ds_configs/zero3.json" for cfg in map(load_config, RECIPES))


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_every_recipe_names_a_hub_model_the_registry_knows(path):
    name = load_config(path).model.name
    assert hub_id(name) == name, f"{path.name}: model.name={name!r} is not in lisa_dist.models.HUB_CONFIGS"


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_model_builds_on_meta_and_fits_the_config(path):
    cfg = load_config(path)  # loads and validates the whole config
    fields = HUB_CONFIGS[cfg.model.name]
    model = build_skeleton(hub_config(cfg.model.name), torch.float32)
    layout = find_layout(model, cfg.model.layers_path)
    text = fields.get("text_config", fields)
    assert layout.num_layers == text["num_hidden_layers"]
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_SIZES[cfg.model.name]
    assert (layout.head is None) == fields["tie_word_embeddings"], "the tied head is found as published"
    validate_for_model(cfg, layout.num_layers)
    cfg.lisa.gamma = layout.num_layers + 1
    with pytest.raises(ConfigError, match=rf"lisa.gamma={cfg.lisa.gamma} .* expected in 1..{layout.num_layers}"):
        validate_for_model(cfg, layout.num_layers)
    # Text-only training: a vision tower neither trains at every step nor is sampled.
    always = [name for name, _ in layout.always_trained_params(cfg.lisa.train_embeddings)]
    assert not [name for name in always if "vision" in name]
    assert not [name for name, _ in layout.layers.named_parameters() if "vision" in name]


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_chat_template_masks_exactly_the_assistant_turns(path):
    cfg = load_config(path)
    family = FAMILY_TEMPLATE[HUB_CONFIGS[cfg.model.name]["model_type"]]
    own, expected = FAMILIES[family]
    tokenizer = byte_tokenizer()
    # A recipe's built-in replaces the tokenizer's template; empty keeps the model's own, whose behaviour the family
    # copy has.
    tokenizer.chat_template = BUILTIN_TEMPLATES[cfg.data.chat_template] if cfg.data.chat_template else own
    ids, labels = encode_messages([dict(m) for m in CONVERSATION], tokenizer)
    runs = [tokenizer.decode(r, skip_special_tokens=False) for r in supervised_runs(ids, labels)]
    assert runs == expected


def _header(path: Path, part: str | None = None) -> str:
    """The header comment, or its part from the line starting `part` (Launch, Planned) to the next blank line."""
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    if part is None:
        return header
    start = header.index(f"# {part}")
    return header[start : header.find("\n#\n", start)]


def _planned(header: str, what: str) -> float:
    found = re.search(rf"{what} ([\d.]+)", header)
    assert found, f"the header states no '{what} N'"
    return float(found.group(1))


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_header_states_what_the_planner_prints(path, capsys):
    header = _header(path, "Planned")
    command = re.search(r"`lisa-dist estimate (--config (\S+)[^`]*)`", header)
    assert command and command.group(2) == f"configs/recipes/{path.name}", "the header names its planner command"
    assert cli_main(["estimate", *command.group(1).split(), "--json"]) == 0
    lisa = json.loads(capsys.readouterr().out)["lisa"]
    for what, key in (
        ("state", "state"),
        ("activations", "activations"),
        ("buffers", "buffers"),
        ("CUDA runtime", "runtime"),
        ("total", "gpu_total"),
        ("host", "host"),
    ):
        assert _planned(header, what) == round(lisa[key] / GIB, 2), f"{path.name}: {what}"
    gpu = int(_planned(header, "fits"))
    assert re.search(rf"fits {gpu} GiB: (yes|no)", header).group(1) == (
        "yes" if lisa["gpu_total"] <= 0.9 * gpu * GIB else "no"
    )
    smallest = next(size for size in CARDS if lisa["gpu_total"] <= 0.9 * size * GIB)
    assert int(_planned(header, r"smallest card it fits \(90% of it\):")) == smallest
    launch = _header(path, "Launch")
    assert f"configs/recipes/{path.name}" in launch
    runner = re.search(r"(lisa-dist train|launch/\S+\.sh)", launch).group(1)
    assert runner == "lisa-dist train" or (REPO / runner).is_file()


def test_docs_table_lists_every_recipe_with_its_planned_total():
    rows = {
        line.split("|")[1].strip(" `"): line
        for line in (REPO / "docs" / "recipes.md").read_text().splitlines()
        if line.startswith("| `")
    }
    assert set(rows) == {path.name for path in RECIPES}
    for path in RECIPES:
        assert f"| {_planned(_header(path, 'Planned'), 'total'):.2f}" in rows[path.name], path.name


def test_short_names_are_aliases_of_hub_ids():
    assert MODEL_PRESETS is MODEL_ALIASES and set(MODEL_ALIASES.values()) <= set(HUB_CONFIGS)
    assert model_config("llama-3-8b").to_dict() == hub_config("meta-llama/Meta-Llama-3-8B").to_dict()
    with pytest.raises(ConfigError, match=r"not a hub model known offline .*a local folder holding its config.json"):
        hub_config("meta-llama/Llama-9-1T")


def test_builtin_templates_are_the_ones_the_config_accepts():
    assert set(BUILTIN_TEMPLATES) == set(CHAT_TEMPLATES)


def test_builtin_llama3_renders_llama_3_1s_chat_format():
    """The Instruct tokenizers' rendering: the system header with its dates, trimmed turns, a tool call as JSON with
    "parameters", its result as a JSON-encoded ipython turn."""
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = BUILTIN_TEMPLATES["llama3"]
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    messages = [
        {"role": "system", "content": " Answer briefly. "},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "4."},
    ]
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) == (
        f"<s>{header.format('system')}Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        f"Answer briefly.<|eot_id|>{header.format('user')}What is 2+2?<|eot_id|>"
        f'{header.format("assistant")}{{"name": "add", "parameters": {{"a": 2, "b": 2}}}}<|eot_id|>'
        f'{header.format("ipython")}"4"<|eot_id|>{header.format("assistant")}4.<|eot_id|>'
    )
    prompt = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(f"What is 2+2?<|eot_id|>{header.format('assistant')}")


@pytest.mark.parametrize(
    "ds_config, expected",
    [
        ("ds_configs/zero1.json", "zero1"),
        ("ds_configs/zero2.json", "zero2"),
        ("ds_configs/zero3.json", "zero3"),
        ("ds_configs/zero3_offload.json", "zero3_offload"),
    ],
)
def test_planner_reads_the_zero_stage_of_the_ds_config(ds_config, expected):
    cfg = load_config(None, ["--data.path=x.jsonl", "--backend.name=deepspeed", f"--backend.ds_config={ds_config}"])
    assert planner_backend(cfg) == expected


def test_estimate_config_errors_name_the_problem(tmp_path, capsys):
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("model: {name: tiny-llama}\ndata: {path: x.jsonl}\nbackend: {name: fsdp}\n")
    assert cli_main(["estimate", "--config", str(fsdp)]) == 2
    assert "give their number (the world size, all nodes), e.g. --gpus 8" in capsys.readouterr().err
    offline = tmp_path / "offline.yaml"
    offline.write_text("model: {name: some-org/some-model}\ndata: {path: x.jsonl}\n")
    assert cli_main(["estimate", "--config", str(offline)]) == 2
    err = capsys.readouterr().err
    assert "model.name 'some-org/some-model': not a preset" in err and "meta-llama/Llama-3.1-70B" in err
    assert "a local folder holding the model's config.json works for any model" in err


def test_estimate_config_reads_a_local_folder_and_takes_flags_over_the_config(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({**HUB_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"], "num_hidden_layers": 4})
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: {folder}}}\ndata: {{path: x.jsonl, max_length: 1024}}\nlisa: {{gamma: 3}}\n")
    assert cli_main(["estimate", "--config", str(recipe), "--micro-batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "(4 layers), backend local, 1 GPU(s)" in out and "LISA gamma 3" in out and "micro-batch 2 x 1024" in out
    assert cli_main(["estimate", "--config", str(recipe), "--gamma", "5"]) == 2
    assert "--gamma 5: expected in 1..4" in capsys.readouterr().err
