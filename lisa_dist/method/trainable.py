"""What each fine-tuning method trains: LISA and full fine-tuning share the layer split, LoRA trains adapters."""

from __future__ import annotations

from torch import nn

from lisa_dist.config import LoraConfig
from lisa_dist.errors import ConfigError, first_line
from lisa_dist.method.optim import NamedParams, TrainableSet
from lisa_dist.models import ModelLayout, frozen_modules


def layer_named_params(layout: ModelLayout) -> list[NamedParams]:
    return [
        [(f"{layout.layers_path}.{i}.{name}", p) for name, p in block.named_parameters()]
        for i, block in enumerate(layout.layers)
    ]


def lisa_trainable(layout: ModelLayout, train_embeddings: bool = True, always_lr_scale: float = 1.0) -> TrainableSet:
    """Always-trained modules (less the input embedding without `train_embeddings`; none at `always_lr_scale` 0,
    optim.always_lr_scale: they join the frozen ones), plus every decoder layer as a unit that can be switched on
    and off; a vision-language model's vision tower is frozen always."""
    always = layout.always_trained_params(train_embeddings)
    frozen = layout.frozen_params()
    if always_lr_scale == 0:
        always, frozen = [], frozen + always
    return TrainableSet(always=always, layers=layer_named_params(layout), frozen=frozen)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> tuple[nn.Module, TrainableSet]:
    """Wrap `model` with peft LoRA adapters; only the adapters train, at every step. A vision-language model's
    vision tower gets none: it is frozen always (`frozen_modules`)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    frozen = {id(m) for tower in frozen_modules(model).values() for m in tower.modules()}
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        exclude_modules=[name for name, m in model.named_modules() if id(m) in frozen] or None,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, peft_cfg)
    except ValueError as exc:  # peft's NoMatchingPeftModuleError and its other target checks
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        first = first_line(exc)
        raise ConfigError(
            f"lora.target_modules={cfg.target_modules!r}: {first}. This model's linear layers are "
            f"named {', '.join(linear)}"
        ) from None
    return model, TrainableSet(always=[(n, p) for n, p in model.named_parameters() if p.requires_grad])
