"""What each backend supports is data (`Capabilities`), and each set of allowed values is one `Literal`: validation,
resume, export, the CLI's choices and the documentation read them instead of comparing names or repeating lists."""

import argparse
import dataclasses
import typing

import pytest

from lisa_dist import config
from lisa_dist.backends import REGISTRY, capabilities
from lisa_dist.cli import _parser as build_parser
from lisa_dist.config import CAPABILITIES, CHOICES, Capabilities, Config, load_config, set_value
from lisa_dist.errors import ConfigError


def test_every_backend_name_has_a_class_and_capabilities():
    assert tuple(REGISTRY) == tuple(CAPABILITIES) == config.BACKENDS
    for name, cls in REGISTRY.items():
        assert cls.capabilities is CAPABILITIES[name] == capabilities(name)
        assert isinstance(cls.capabilities, Capabilities)


def test_capabilities_are_frozen_data():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CAPABILITIES["local"].compile = False  # type: ignore[misc]


def test_capabilities_of_each_backend():
    local, fsdp, ds = (CAPABILITIES[n] for n in ("local", "fsdp", "deepspeed"))
    for caps in (local, fsdp):
        assert caps.frozen_storage and caps.eight_bit_state and caps.compile and caps.grad_norm_sampling
        assert caps.reshards_checkpoints and not caps.engine_config
    assert local.lora and not fsdp.lora and not local.launched and fsdp.launched
    assert not (
        ds.frozen_storage
        or ds.eight_bit_state
        or ds.compile
        or ds.grad_norm_sampling
        or ds.lora
        or ds.reshards_checkpoints
    )
    assert ds.engine_config and ds.launched
    assert [c.checkpoint_format for c in (local, fsdp, ds)] == ["torch", "dcp", "deepspeed"]


def test_unknown_backend_names_the_field():
    with pytest.raises(ConfigError, match=r"backend.name='ddp' is not allowed: expected one of local, fsdp, deepspeed"):
        capabilities("ddp")


@pytest.mark.parametrize(
    ("capability", "args", "match"),
    [
        ("compile", ["--train.compile=true"], "train.compile=True is not allowed: needs backend.name=fsdp"),
        ("frozen_storage", ["--lisa.frozen_storage=int8"], "lisa.frozen_storage='int8' is not allowed: needs backend"),
        ("eight_bit_state", ["--optim.adam_8bit=all"], "optim.adam_8bit='all' is not allowed: needs backend"),
        ("grad_norm_sampling", ["--lisa.strategy=grad_norm"], "grad_norm needs per-layer gradient norms"),
    ],
)
def test_validation_asks_the_capabilities(monkeypatch, capability, args, match):
    """Taking a capability away from the local backend is what makes validation refuse: no name is compared."""
    load_config(None, ["--data.path=x.json", *args])
    monkeypatch.setitem(CAPABILITIES, "local", dataclasses.replace(CAPABILITIES["local"], **{capability: False}))
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["--data.path=x.json", *args])


def test_backends_with_lists_the_supporting_backends():
    assert config.backends_with("compile") == "local or fsdp"
    assert config.backends_with("lora") == "local"
    assert config.backends_with("engine_config") == "deepspeed"


def test_allowed_values_are_declared_once_as_literals():
    hints = {
        f"{s.name}.{k}": h
        for s in dataclasses.fields(Config)
        for k, h in typing.get_type_hints(s.default_factory).items()
    }
    assert typing.get_origin(hints["lisa.frozen_storage"]) is typing.Literal
    assert (
        typing.get_args(hints["lisa.frozen_storage"]) == config.FROZEN_STORAGE == ("float32", "bfloat16", "int8", "nf4")
    )
    assert typing.get_args(hints["backend.name"]) == config.BACKENDS
    assert typing.get_args(hints["checkpoint.export_dtype"]) == (*config.EXPORT_DTYPES, "")
    literal = {name for name, hint in hints.items() if typing.get_origin(hint) is typing.Literal}
    assert literal == set(CHOICES)
    assert {
        "model.dtype",
        "data.format",
        "train.precision",
        "train.device",
        "optim.adam_8bit",
        "logging.level",
    } <= literal


@pytest.mark.parametrize(
    ("dotted", "value", "match"),
    [
        (
            "lisa.frozen_storage",
            "fp8",
            "lisa.frozen_storage='fp8' is not allowed: expected one of float32, bfloat16, int8, nf4",
        ),
        ("train.precision", True, r"train.precision=True: expected one of fp32, bf16 \(a string\)"),
        ("checkpoint.export_dtype", "fp8", "expected one of float32, bfloat16, float16, '' \\(empty\\)"),
    ],
)
def test_a_literal_field_refuses_other_values_naming_field_value_and_allowed(dotted, value, match):
    with pytest.raises(ConfigError, match=match):
        set_value(Config(), dotted, value)


def test_literal_fields_still_take_their_values():
    cfg = Config()
    for dotted, allowed in CHOICES.items():
        for value in allowed:
            set_value(cfg, dotted, value)
    assert cfg.checkpoint.export_dtype == ""


def _estimate_choices() -> dict[str, tuple]:
    estimate = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {a.dest: tuple(a.choices) for a in estimate["estimate"]._actions if a.choices}


def test_the_cli_reads_the_same_choices():
    choices = _estimate_choices()
    assert choices["frozen_storage"] == config.FROZEN_STORAGE
    assert choices["precision"] == config.PRECISIONS
    assert choices["param_dtype"] == choices["host_dtype"] == config.DTYPES
    assert choices["adam_8bit"] == config.ADAM_8BIT


def test_frozen_storage_help_names_the_backends_that_run_it():
    estimate = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    action = next(a for a in estimate["estimate"]._actions if a.dest == "frozen_storage")
    assert "local or fsdp" in action.help
