"""The one place that knows which modules of a model are its decoder layers and which are always trained.

FSDP wrapping, activation checkpointing and the LISA sampler all go through `find_layout`. Families are looked up by
Hugging Face `config.model_type` in `FAMILIES`; anything else falls back to the longest homogeneous `nn.ModuleList`,
and `model.layers_path` overrides both. Paths are attribute chains resolved with getattr, never eval'd or matched.
A vision-language family also names the modules it keeps frozen always (its vision tower and projector): LISA
samples the language model's layers only, and training on text never runs the vision tower.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lisa_dist.errors import ConfigError


@dataclass(frozen=True)
class Family:
    """Where one model family keeps its blocks, relative to the `*ForCausalLM` model."""

    layers: str
    norm: str
    extra: tuple[str, ...] = ()
    """Further always-trained modules (learned position embeddings, projections); a path that is None is skipped."""
    frozen: tuple[str, ...] = ()
    """Modules frozen always, outside the layers and the always-trained set: a vision-language model's vision tower
    and multi-modal projector (no gradients, no optimizer state)."""


_LLAMA_LIKE = Family("model.layers", "model.norm")

FAMILIES: dict[str, Family] = {
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "olmo2",
        ),
        _LLAMA_LIKE,
    ),
    # Gemma-3 4B-27B (Gemma3ForConditionalGeneration, which AutoModelForCausalLM builds for model_type gemma3).
    "gemma3": Family(
        "model.language_model.layers",
        "model.language_model.norm",
        frozen=("model.vision_tower", "model.multi_modal_projector"),
    ),
    "phi": Family("model.layers", "model.final_layernorm"),
    "gpt2": Family("transformer.h", "transformer.ln_f", ("transformer.wpe",)),
    "gpt_neox": Family("gpt_neox.layers", "gpt_neox.final_layer_norm"),
    "opt": Family(
        "model.decoder.layers",
        "model.decoder.final_layer_norm",
        ("model.decoder.embed_positions", "model.decoder.project_in", "model.decoder.project_out"),
    ),
}


def resolve_path(root: nn.Module, path: str) -> object:
    """Follow a dotted attribute path (`"model.layers"`, `"model.layers.0"`) from `root`.

    Raises AttributeError naming the part of the path that does not exist.
    """
    obj: object = root
    walked: list[str] = []
    for part in path.split("."):
        if not part or not hasattr(obj, part):
            where = ".".join(walked) or "the model"
            raise AttributeError(f"{path!r}: {where} ({type(obj).__name__}) has no attribute {part!r}")
        obj = getattr(obj, part)
        walked.append(part)
    return obj


@dataclass
class ModelLayout:
    """The decoder layers of `model` and the modules trained at every step.

    `layers_path` is relative to `model`, so `f"{layers_path}.{i}.{name}"` is the name `model.named_parameters()`
    gives a parameter of layer i.
    """

    model: nn.Module
    layers_path: str
    layers: nn.ModuleList
    always: dict[str, nn.Module] = field(default_factory=dict)
    family: str = "unknown"
    final_norm: nn.Module | None = None
    """The norm after the last block (None when the family is unknown)."""
    head: nn.Module | None = None
    """The LM head, None when it is tied to the input embedding."""
    embedding: nn.Module | None = None
    """The input embedding (when tied, its weight is also the head's)."""
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    """Modules frozen always, by name (a vision tower, `Family.frozen`): neither sampled nor always trained."""

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_params(self, i: int) -> list[nn.Parameter]:
        return list(self.layers[i].parameters())

    def always_trained_params(self, train_embeddings: bool = True) -> list[tuple[str, nn.Parameter]]:
        """Every parameter of the model outside the decoder layers and the modules frozen always, each once (tied
        weights appear once); without `train_embeddings`, less the input embedding's (a tied embedding stays: it
        trains as the head)."""
        out = {id(p) for p in self.layers.parameters()} | self._frozen_ids()
        out |= {id(p) for _, p in self.frozen_embedding_params(train_embeddings)}
        return [(name, p) for name, p in self.model.named_parameters() if id(p) not in out]

    def frozen_params(self) -> list[tuple[str, nn.Parameter]]:
        """The params of the modules frozen always (`frozen`), each once; empty for a text-only model."""
        frozen = self._frozen_ids()
        return [(name, p) for name, p in self.model.named_parameters() if id(p) in frozen]

    def _frozen_ids(self) -> set[int]:
        return {id(p) for module in self.frozen.values() for p in module.parameters()}

    def frozen_embedding_params(self, train_embeddings: bool) -> list[tuple[str, nn.Parameter]]:
        """Without `train_embeddings`, the params of every input embedding outside the decoder layers and the
        modules frozen always: the token embedding unless it is tied to the head (then it trains as the head), and
        any other `nn.Embedding`, such as learned position embeddings (GPT-2's `wpe`, OPT's `embed_positions`) or
        token-type embeddings, in any family. Frozen, they leave backward nothing to do below the lowest active
        layer."""
        if train_embeddings:
            return []
        in_layers = {id(p) for p in self.layers.parameters()}
        embeddings: list[nn.Module] = [m for m in self.model.modules() if isinstance(m, nn.Embedding)]
        if self.embedding is not None and not isinstance(self.embedding, nn.Embedding):
            embeddings.append(self.embedding)
        mine = {id(p) for m in embeddings for p in m.parameters()} - in_layers - self._frozen_ids()
        if self.head is None and self.embedding is not None:  # tied: the shared matrix trains as the head
            mine -= {id(p) for p in self.embedding.parameters()}
        if self.head is not None:
            mine -= {id(p) for p in self.head.parameters()}
        return [(name, p) for name, p in self.model.named_parameters() if id(p) in mine]

    def learned_positions(self) -> int | None:
        """The positions a learned position embedding has rows for (GPT-2's n_positions, OPT's
        max_position_embeddings); None for a model without one (rotary embeddings extrapolate)."""
        config = getattr(self.model, "config", None)
        limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        # A vision tower's patch positions are not the text's (and the tower never sees a text token).
        skip = {id(m) for m in self.layers.modules()} | {id(m) for f in self.frozen.values() for m in f.modules()}
        learned = [
            m
            for m in self.model.modules()
            if isinstance(m, nn.Embedding) and m is not self.embedding and id(m) not in skip
        ]
        return int(limit) if learned and limit else None

    def describe(self) -> str:
        """One line: the model, its layers and its params by role; for a vision-language model, what stays frozen."""
        total = sum(p.numel() for p in self.model.parameters())
        always = sum(p.numel() for _, p in self.always_trained_params())
        frozen = sum(p.numel() for _, p in self.frozen_params())
        block = type(self.layers[0]).__name__ if self.num_layers else "-"
        line = (
            f"{type(self.model).__name__} ({self.family}): L={self.num_layers} x {block} at {self.layers_path}, "
            f"{total:,} params ({always:,} always trained, {total - always - frozen:,} in layers"
            f"{f', {frozen:,} frozen always' if frozen else ''}; tied weights once)"
        )
        return f"{line}; {self.frozen_summary()}" if self.frozen else line

    def frozen_summary(self) -> str:
        """What a vision-language model trains, in words: the language tower's layers and not the vision tower."""
        parts = [f"{name} ({sum(p.numel() for p in m.parameters()):,} params)" for name, m in self.frozen.items()]
        return (
            f"vision-language model {type(self.model).__name__}: LISA samples the language tower's "
            f"{self.num_layers} layers at {self.layers_path}; {' and '.join(parts)} stay frozen (no gradients, "
            "no optimizer state; training on text never runs them)"
        )


def find_layout(model: nn.Module, layers_path: str | None = None) -> ModelLayout:
    """Find the decoder layers of `model`: the `layers_path` override, else the family registry, else the longest
    `nn.ModuleList` of one block class.

    Pass the plain Hugging Face model. A peft-wrapped model also works: paths (override and registry) are resolved
    on its base model, and the returned `layers_path` and `always` names are re-expressed relative to `model` itself.
    Raises ConfigError listing every candidate `nn.ModuleList` when no unambiguous layer list is found.
    """
    base = _unwrapped(model)
    family_name = _model_type(base)
    family = FAMILIES.get(family_name or "")
    found = (
        _resolve_override(base, layers_path)
        if layers_path is not None
        else (_from_family(base, family) if family else None)
    )
    if found is None:
        family = None
    layers = found if found is not None else _generic_layers(base)
    names = {id(module): name for name, module in model.named_modules()}
    embed, head = _embeddings(base)
    norm = _optional(base, family.norm) if family else None
    # An unknown family: every module outside the blocks that holds parameters itself (the final norm among them).
    extra = [_optional(base, path) for path in family.extra] if family else _owners_outside(base, layers)
    always = list({id(m): m for m in (embed, *extra, norm, head) if m is not None and id(m) in names}.values())
    frozen = frozen_modules(model)
    _refuse_frozen_layers(layers, frozen)
    return ModelLayout(
        model=model,
        layers_path=names[id(layers)],
        layers=layers,
        always={names[id(m)]: m for m in always},
        family=family_name or type(base).__name__,
        final_norm=norm,
        head=head,
        embedding=embed,
        frozen=frozen,
    )


def frozen_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules `model`'s family keeps frozen always (`Family.frozen`: a vision tower and its projector), named
    relative to `model` (a peft wrapper too); empty for a text-only or unregistered family."""
    base = _unwrapped(model)
    family = FAMILIES.get(_model_type(base) or "")
    found = [m for m in (_optional(base, path) for path in (family.frozen if family else ())) if m is not None]
    names = {id(module): name for name, module in model.named_modules()}
    return {names[id(m)]: m for m in found}


def _refuse_frozen_layers(layers: nn.ModuleList, frozen: dict[str, nn.Module]) -> None:
    for name, module in frozen.items():
        if any(m is layers for m in module.modules()):
            raise ConfigError(
                f"the decoder layers chosen lie inside {name}, which this family keeps frozen always: "
                "set model.layers_path to the language model's layers"
            )


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model under a peft wrapper; the model itself otherwise."""
    unwrap = getattr(model, "get_base_model", None)
    return unwrap() if callable(unwrap) else model


def _model_type(base: nn.Module) -> str | None:
    return getattr(getattr(base, "config", None), "model_type", None)


def _resolve_override(base: nn.Module, path: str) -> nn.ModuleList:
    try:
        found = resolve_path(base, path)
    except AttributeError as exc:
        raise ConfigError(f"model.layers_path={path!r} does not resolve: {exc}. {_candidates_hint(base)}") from None
    if not isinstance(found, nn.ModuleList):
        raise ConfigError(
            f"model.layers_path={path!r} is a {type(found).__name__}, not an nn.ModuleList. {_candidates_hint(base)}"
        )
    return found


def _from_family(base: nn.Module, family: Family) -> nn.ModuleList | None:
    # A variant that reuses a model_type but moves its blocks falls through to the generic search.
    try:
        found = resolve_path(base, family.layers)
        resolve_path(base, family.norm)
    except AttributeError:
        return None
    return found if isinstance(found, nn.ModuleList) else None


def _generic_layers(base: nn.Module) -> nn.ModuleList:
    lists = _module_lists(base)
    # Lists nested in another list (per-layer MoE experts, say) are parts of a block, never the blocks themselves.
    outer = [
        (path, ml)
        for path, ml in lists
        if len(ml) and _homogeneous(ml) and not any(path.startswith(f"{other}.") for other, _ in lists)
    ]
    if not outer:
        raise ConfigError(f"cannot find the decoder layers of {type(base).__name__}: {_candidates_hint(base)}")
    longest = max(len(ml) for _, ml in outer)
    best = [(path, ml) for path, ml in outer if len(ml) == longest]
    if len(best) > 1:
        raise ConfigError(
            f"cannot tell which list holds the decoder layers of {type(base).__name__}: "
            f"{', '.join(path for path, _ in best)} all have {longest} blocks. {_candidates_hint(base)}"
        )
    return best[0][1]


def _module_lists(root: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(name, m) for name, m in root.named_modules() if isinstance(m, nn.ModuleList) and name]


def _homogeneous(ml: nn.ModuleList) -> bool:
    return len({type(m) for m in ml}) == 1


def _owners_outside(base: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """Modules outside `layers` that hold parameters themselves, each parameter counted at its first owner (a tied
    head is not listed again)."""
    inside = {id(m) for m in layers.modules()}
    seen: set[int] = set()
    owners = []
    for module in base.modules():
        own = {id(p) for p in module._parameters.values() if p is not None} - seen
        if own and id(module) not in inside:
            owners.append(module)
        seen |= own
    return owners


def _candidates_hint(base: nn.Module) -> str:
    lists = _module_lists(base)
    if not lists:
        found = "no nn.ModuleList found"
    else:
        found = "candidates: " + ", ".join(f"{path} ({_shape(ml)})" for path, ml in lists)
    return f"{found}; set model.layers_path to the dotted path of the decoder block list"


def _shape(ml: nn.ModuleList) -> str:
    if not len(ml):
        return "empty"
    classes = sorted({type(m).__name__ for m in ml})
    return f"{len(ml)} x {'/'.join(classes)}"


def _embeddings(base: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The input embedding and the LM head, the head None when tied (training the embedding trains it)."""
    embed = _hf_module(base, "get_input_embeddings")
    head = _hf_module(base, "get_output_embeddings")
    if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", False):
        head = None
    return embed, head


def _hf_module(base: nn.Module, getter: str) -> nn.Module | None:
    if not hasattr(base, getter):
        return None
    try:
        found = getattr(base, getter)()
    except (NotImplementedError, AttributeError):
        return None
    return found if isinstance(found, nn.Module) else None


def _optional(base: nn.Module, path: str) -> nn.Module | None:
    try:
        found = resolve_path(base, path)
    except AttributeError:
        return None
    return found if isinstance(found, nn.Module) else None
