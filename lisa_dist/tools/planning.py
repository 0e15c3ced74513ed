"""The memory planner's view of a run's config (`lisa-dist estimate --config`): the model's shapes, offline, and the
Setup of the config on a number of GPUs, its backend read as the planner names it (DeepSpeed: the ZeRO stage of
backend.ds_config)."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from lisa_dist.config import Config, capabilities, config_overrides_of, validate_for_model
from lisa_dist.ds_config import read_ds_config
from lisa_dist.errors import ConfigError
from lisa_dist.models import override_config
from lisa_dist.tools.memory import ModelShapes, PlannerBackend, Setup, model_config, shapes_of

ZERO_STAGES: dict[int, PlannerBackend] = {1: "zero1", 2: "zero2", 3: "zero3"}


def planner_backend(cfg: Config) -> PlannerBackend:
    """backend.name as the planner names it: local, fsdp, or zero1/zero2/zero3 from the ds_config's ZeRO stage
    (zero3_offload when it offloads the optimizer to the CPU)."""
    if not capabilities(cfg.backend.name).engine_config:
        return cast(PlannerBackend, cfg.backend.name)  # local and fsdp: the planner's names too
    zero = read_ds_config(cfg.backend.ds_config or "").get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in ZERO_STAGES:
        raise ConfigError(
            f"backend.ds_config={cfg.backend.ds_config!r}: zero_optimization.stage={stage!r}; the "
            "planner knows ZeRO stages 1, 2 and 3"
        )
    offload = (zero.get("offload_optimizer") or {}).get("device") == "cpu"
    return "zero3_offload" if stage == 3 and offload else ZERO_STAGES[stage]


def config_world_size(cfg: Config, gpus: int | None) -> int:
    """The world size to plan `cfg` for: `gpus`, which a launched backend needs; one rank for the local backend."""
    if gpus is not None:
        return gpus
    if not capabilities(cfg.backend.name).launched:
        return 1
    raise ConfigError(
        f"backend.name={cfg.backend.name} runs under a launcher on several GPUs: give their number "
        "(the world size, all nodes), e.g. --gpus 8; a recipe's header names the GPUs it is for"
    )


def plan_config(cfg: Config, world_size: int, **replaced: Any) -> tuple[ModelShapes, Setup]:
    """The shapes of `cfg`'s model (a hub id known offline, a local folder's config.json or a preset; LoRA's rows at
    lora.r) and its Setup on `world_size` ranks, with `replaced` Setup fields (the planner's flags) instead of the
    config's. The config is checked against the model as a run would check it (gamma against the layers)."""
    config = model_config(cfg.model.name, field="model.name")
    overrides = {k: v for k, v in config_overrides_of(cfg.model).items() if k != "attn_implementation"}
    if overrides:  # as the run will load it (a folder's or the registry's config, changed)
        config = override_config(config, config.to_dict(), overrides, cfg.model.name)
    shapes = shapes_of(
        config,
        cfg.model.name,
        lora_r=cfg.lora.r,
        lora_targets=_lora_targets(cfg, config),
        layers_path=cfg.model.layers_path,
    )
    validate_for_model(cfg, len(shapes.layers))
    setup = Setup.from_config(cfg, planner_backend(cfg), world_size)
    return shapes, dataclasses.replace(setup, lora_r=cfg.lora.r, **replaced)


def _lora_targets(cfg: Config, config: Any) -> list[str] | None:
    """lora.target_modules; unset, peft's default for the family, which for a vision-language model (peft has none)
    is its language model's (Gemma-3: q_proj and v_proj, names its vision tower's attention shares)."""
    text = config.get_text_config()
    if cfg.lora.target_modules is not None or text is config:
        return cfg.lora.target_modules
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(text.model_type)
    return list(targets) if targets is not None else None
