import json
from pathlib import Path

import pytest

from lisa_dist.config import Config, load_config, parse_overrides, validate, validate_for_model
from lisa_dist.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs").glob("*.json"))


def valid(**sections) -> Config:
    cfg = load_config(None, ["--data.path=x.json"])
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.data.path and cfg.train.steps >= 1


def test_shipped_configs_exist():
    assert any(p.name == "demo.yaml" for p in SHIPPED)


def test_yaml_json_and_overrides(tmp_path):
    raw = {"lisa": {"gamma": 3, "interval": 7}, "data": {"path": "d.jsonl", "format": "text"}}
    (tmp_path / "c.json").write_text(json.dumps(raw))
    cfg = load_config(tmp_path / "c.json", ["--optim.lr=1e-3", "--lisa.enabled", "false", "--optim.betas=[0.8, 0.9]"])
    assert (cfg.lisa.gamma, cfg.lisa.interval, cfg.data.format) == (3, 7, "text")
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.lisa.enabled is False and cfg.optim.betas == [0.8, 0.9]
    (tmp_path / "c.yaml").write_text("lisa:\n  gamma: 4\ndata:\n  path: a.txt\n")
    assert load_config(tmp_path / "c.yaml").lisa.gamma == 4


def test_override_parsing():
    assert parse_overrides(["--a.b=1", "--c.d", "x", "--e.f=[1, 2]"]) == [("a.b", 1), ("c.d", "x"), ("e.f", [1, 2])]
    with pytest.raises(ConfigError, match=r"section.key=value"):
        parse_overrides(["gamma=2"])
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--lisa.gamma"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("--lisa.gama=2", "did you mean 'lisa.gamma'"),
        ("--lsia.gamma=2", "did you mean 'lisa'"),
        ("--optim.learning_rate=1", "unknown key in section 'optim'"),
    ],
)
def test_unknown_keys_name_the_closest_valid_one(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["--data.path=x", override])


def test_unknown_key_in_file(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  step: 3\n")
    with pytest.raises(ConfigError, match=r"did you mean 'train.steps'"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        ("--lisa.gamma=x", "lisa.gamma='x': expected an integer"),
        ("--lisa.enabled=3", "expected true or false"),
        ("--optim.lr=fast", "expected a number"),
        ("--optim.betas=0.9", "expected a list"),
    ],
)
def test_type_errors_name_field_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["--data.path=x", override])


@pytest.mark.parametrize(
    "override, field, allowed",
    [
        ("--lisa.gamma=0", "lisa.gamma=0", ">= 1"),
        ("--lisa.interval=0", "lisa.interval=0", ">= 1"),
        ("--optim.lr=0", "optim.lr=0.0", "> 0"),
        ("--optim.lr=-1e-3", "optim.lr=-0.001", "> 0"),
        ("--optim.weight_decay=-1", "optim.weight_decay", ">= 0"),
        ("--optim.betas=[0.9, 1.0]", "optim.betas", "[0, 1)"),
        ("--optim.eps=0", "optim.eps", "> 0"),
        ("--optim.schedule=step", "optim.schedule='step'", "cosine, linear, constant"),
        ("--optim.min_lr_ratio=2", "optim.min_lr_ratio", "[0, 1]"),
        ("--optim.max_grad_norm=-1", "optim.max_grad_norm", ">= 0"),
        ("--optim.warmup_steps=-1", "optim.warmup_steps", ">= 0"),
        ("--optim.always_lr_scale=-0.5", "optim.always_lr_scale=-0.5", ">= 0 (0 freezes"),
        ("--train.steps=0", "train.steps=0", ">= 1"),
        ("--train.micro_batch_size=0", "train.micro_batch_size", ">= 1"),
        ("--train.grad_accum=0", "train.grad_accum", ">= 1"),
        ("--train.precision=fp16", "train.precision='fp16'", "fp32, bf16"),
        ("--train.device=tpu", "train.device", "auto, cpu, cuda"),
        ("--data.format=csv", "data.format='csv'", "text, alpaca, chat"),
        ("--data.max_length=1", "data.max_length", ">= 2"),
        ("--lisa.strategy=greedy", "lisa.strategy", "uniform, weighted, fixed"),
        ("--lisa.strategy=weighted", "lisa.weights", "required"),
        ("--lisa.strategy=fixed", "lisa.fixed_layers", "required"),
        ("--lisa.weights=[-1, 2]", None, None),
        ("--model.dtype=float16", "model.dtype", "float32, bfloat16"),
        ("--backend.name=horovod", "backend.name='horovod'", "local"),
        ("--lora.enabled=true", "lora.enabled", "lisa.enabled=false"),
        ("--logging.level=LOUD", "logging.level", "INFO"),
    ],
)
def test_validation_errors_name_field_value_and_allowed(override, field, allowed):
    overrides = ["--data.path=x", override]
    if field is None:  # weights are only checked under the weighted strategy
        overrides.append("--lisa.strategy=weighted")
        field, allowed = "lisa.weights", "non-negative"
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert field in str(info.value) and allowed in str(info.value)


def test_always_lr_scale_defaults_by_method():
    """Unset: 0.3 under LISA (the quality study), 1 for full fine-tuning and LoRA; a given value stays."""
    assert load_config(None, ["--data.path=x"]).optim.always_lr_scale == 0.3
    assert load_config(None, ["--data.path=x", "--lisa.enabled=false"]).optim.always_lr_scale == 1.0
    lora = ["--data.path=x", "--lisa.enabled=false", "--lora.enabled=true"]
    assert load_config(None, lora).optim.always_lr_scale == 1.0
    assert load_config(None, ["--data.path=x", "--optim.always_lr_scale=1"]).optim.always_lr_scale == 1.0


def test_always_lr_scale_is_refused_with_lora():
    with pytest.raises(ConfigError, match=r"optim.always_lr_scale=0.5 .*LoRA baseline trains adapters only"):
        load_config(
            None, ["--data.path=x", "--lisa.enabled=false", "--lora.enabled=true", "--optim.always_lr_scale=0.5"]
        )


def test_missing_data_path():
    with pytest.raises(ConfigError, match=r"data.path"):
        load_config(None, [])


def test_fixed_layers_must_match_gamma():
    with pytest.raises(ConfigError, match=r"exactly lisa.gamma=2"):
        load_config(None, ["--data.path=x", "--lisa.strategy=fixed", "--lisa.fixed_layers=[1, 2, 3]"])


def test_gamma_checked_against_the_models_layers():
    cfg = valid(lisa__gamma=5)
    validate(cfg)
    validate_for_model(cfg, 8)
    with pytest.raises(ConfigError, match=r"lisa.gamma=5 .*1\.\.4"):
        validate_for_model(cfg, 4)
    cfg.lisa.enabled = False
    validate_for_model(cfg, 4)  # full fine-tuning ignores gamma


def test_weights_and_fixed_layers_checked_against_the_model():
    cfg = valid(lisa__strategy="weighted", lisa__weights=[1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="expected 4 weights"):
        validate_for_model(cfg, 4)
    cfg = valid(lisa__strategy="weighted", lisa__weights=[1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ConfigError, match=r"at least lisa.gamma=2 positive"):
        validate_for_model(cfg, 4)
    cfg = valid(lisa__strategy="fixed", lisa__fixed_layers=[0, 9])
    with pytest.raises(ConfigError, match=r"0\.\.3"):
        validate_for_model(cfg, 4)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "sec.yaml").write_text("lisa: 3\n")
    with pytest.raises(ConfigError, match="section 'lisa' must be a mapping"):
        load_config(tmp_path / "sec.yaml")
