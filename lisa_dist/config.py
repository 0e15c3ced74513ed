"""Typed configuration: one dataclass per concern, loaded from YAML/JSON plus `--section.key=value` overrides.

All validation lives here: `validate()` checks what the config alone can tell, `validate_for_model()` what needs
the model (gamma against the number of decoder layers). Every error names the field, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lisa_dist.errors import ConfigError

# The allowed values of every string field with a fixed set, declared once: the fields' annotations, validation,
# the CLI's choices and the generated configuration reference all read these (typing.get_args).
BackendName = Literal["local", "fsdp", "deepspeed"]
DataFormat = Literal["text", "alpaca", "chat", "sharegpt", "auto"]
Strategy = Literal["uniform", "weighted", "fixed", "grad_norm"]
Schedule = Literal["cosine", "linear", "constant"]
Precision = Literal["fp32", "bf16"]
Dtype = Literal["float32", "bfloat16"]
ExportDtype = Literal["float32", "bfloat16", "float16"]
FrozenStorage = Literal["float32", "bfloat16", "int8", "nf4"]
Quantized = Literal["int8", "nf4"]
Adam8bit = Literal["none", "always", "all"]
AdamImplementation = Literal["auto", "fused", "foreach", "for_loop"]
Loss = Literal["plain", "chunked"]
Device = Literal["auto", "cpu", "cuda"]
Attention = Literal["sdpa", "eager", "flash_attention_2", "flex_attention"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
WandbMode = Literal["offline", "online"]

BACKENDS: tuple[str, ...] = typing.get_args(BackendName)
DATA_FORMATS: tuple[str, ...] = typing.get_args(DataFormat)
STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)
SCHEDULES: tuple[str, ...] = typing.get_args(Schedule)
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
DTYPES: tuple[str, ...] = typing.get_args(Dtype)
EXPORT_DTYPES: tuple[str, ...] = typing.get_args(ExportDtype)
FROZEN_STORAGE: tuple[str, ...] = typing.get_args(FrozenStorage)
QUANTIZED: tuple[str, ...] = typing.get_args(Quantized)
ADAM_8BIT: tuple[str, ...] = typing.get_args(Adam8bit)
ADAM_IMPLEMENTATIONS: tuple[str, ...] = typing.get_args(AdamImplementation)
LOSSES: tuple[str, ...] = typing.get_args(Loss)
DEVICES: tuple[str, ...] = typing.get_args(Device)
ATTENTION: tuple[str, ...] = typing.get_args(Attention)
LOG_LEVELS: tuple[str, ...] = typing.get_args(LogLevel)
WANDB_MODES: tuple[str, ...] = typing.get_args(WandbMode)


@dataclass
class ModelConfig:
    name: str = "tiny-llama"
    """A preset (`tiny-llama`, ...), a local Hugging Face folder, a `.gguf` file, or a hub id."""
    layers_path: str | None = None
    """Dotted attribute path of the decoder block list (e.g. `model.layers`), overriding the built-in registry."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id; defaults to the model's own (presets use a built-in byte-level tokenizer)."""
    dtype: Dtype = "float32"
    """Storage dtype of the weights: float32 or bfloat16."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the model's Hugging Face config changed at load, for a preset, a local folder or a hub id alike:
    e.g. {max_position_embeddings: 65536, rope_scaling: {rope_type: yarn, factor: 4.0}, attention_dropout: 0.1};
    attn_implementation here sets model.attn_implementation. A field the config lacks is refused, with the closest
    name. A nested config's fields (a vision-language model's text_config) are merged, not replaced."""
    preset_overrides: dict[str, Any] = field(default_factory=dict)
    """The old name of config_overrides (earlier runs' configs still load); give one of the two."""
    trust_remote_code: bool = False
    """Passed to transformers when loading a folder or hub id."""
    attn_implementation: Attention = "sdpa"
    """Attention kernel, passed to transformers: sdpa, eager, flash_attention_2 (CUDA, the flash-attn package) or
    flex_attention. Packed rows (data.packing) keep their examples apart under each (flash_attention_2: each
    packed micro-batch goes as one row of its real tokens, the only batch its varlen kernel reads as packed)."""


def config_overrides_of(model: ModelConfig | dict[str, Any]) -> dict[str, Any]:
    """model.config_overrides, or its old name model.preset_overrides (earlier runs' configs), as a new dict: of the
    dataclass, or of a saved config.yaml's `model` mapping."""
    if isinstance(model, ModelConfig):
        return dict(model.config_overrides or model.preset_overrides)
    return dict(model.get("config_overrides") or model.get("preset_overrides") or {})


@dataclass
class DataConfig:
    path: str = ""
    """A local .json/.jsonl/.parquet/.txt file, a folder of them, or a hub dataset id."""
    format: DataFormat = "alpaca"
    """text (packed raw text), alpaca (instruction/input/output), chat (OpenAI messages: system, user, assistant
    with tool_calls, tool), sharegpt (conversations of from/value turns), or auto (from the first row's fields)."""
    max_length: int = 512
    """Tokens per example: the packing block for text, the truncation length otherwise."""
    split: str = "train"
    """Split to read from a hub dataset."""
    skip_bad_rows: bool = False
    """Skip rows that are malformed or empty after tokenization (counted and logged) instead of stopping."""
    cache_dir: str = ".cache/lisa_dist/data"
    """Where tokenized datasets are cached, keyed by source, format, length and tokenizer."""
    text_field: str = "text"
    """Field holding the text in json/jsonl/parquet files of the text format."""
    messages_field: str = "messages"
    """Field holding the list of {role, content} messages in the chat format."""
    conversations_field: str = "conversations"
    """Field holding the list of {from, value} turns in the sharegpt format."""
    subset: str = ""
    """A hub dataset's configuration name (datasets.load_dataset's `name`)."""
    revision: str = ""
    """A hub dataset's revision: a branch, tag or commit."""
    mixture: list[dict[str, Any]] = field(default_factory=list)
    """Several sources instead of data.path, each {path: a file, folder or hub id; optional format, subset,
    revision, split, text_field, messages_field, conversations_field (default: this section's), weight (default 1:
    each epoch draws examples, or packed rows, in proportion to the weights, from train.seed), eval_fraction (its
    held-out share)}."""
    chat_template: str = ""
    """chat/sharegpt: a Jinja file, or a built-in (chatml; llama3: Llama 3.1's, for a base model's tokenizer without
    one), replacing the tokenizer's chat template (or giving one to a tokenizer without); saved with the tokenizer in
    final/ and exports."""
    packing: bool = False
    """alpaca/chat: put several examples in one row of up to max_length tokens; position_ids restart at each
    example and no token attends across examples (transformers' packed-sequence masks)."""
    eval_path: str = ""
    """An evaluation file (same format as path), never trained on."""
    eval_fraction: float = 0.0
    """Instead of eval_path: this fraction of the training examples held out for evaluation, chosen once by
    train.seed and never trained on."""


@dataclass
class LisaConfig:
    enabled: bool = True
    """false trains every layer: the full fine-tuning baseline, through the same loop."""
    gamma: int = 2
    """Decoder layers active at once, in 1..L."""
    interval: int = 20
    """Steps per sampling period (K in the paper)."""
    strategy: Strategy = "uniform"
    """uniform (the paper's Algorithm 1), weighted (lisa.weights), fixed (lisa.fixed_layers) or grad_norm (layers
    drawn in proportion to their gradient norm while they trained, all-reduced over ranks; local and fsdp)."""
    weights: list[float] | None = None
    """Per-layer sampling weights for the weighted strategy, one per decoder layer."""
    fixed_layers: list[int] | None = None
    """Layer indices for the fixed strategy."""
    seed: int | None = None
    """Seed of the layer sampler; defaults to train.seed."""
    importance_floor: float = 0.3
    """grad_norm: share of the probability spread evenly over all layers, so that every layer is still visited."""
    importance_decay: float = 0.5
    """grad_norm: weight of a layer's previous norm estimate when a step observes it again."""
    frozen_storage: FrozenStorage = "float32"
    """How decoder layers that are not active are stored: float32, bfloat16 (cast; needs train.precision=bf16), int8
    or nf4 (torchao-quantized on the device, the exact weights kept in host memory in lisa.host_dtype). A layer
    trains in fp32 from its exact weights; local and fsdp (fsdp: each rank quantizes and keeps its own shard)."""
    host_dtype: Dtype = "float32"
    """int8/nf4: dtype of the exact host copies of the frozen weights, float32 or bfloat16 (bfloat16 rounds a
    layer's trained weights when it leaves)."""
    train_embeddings: bool = True
    """Train the input embeddings at every step (the paper's LISA). false freezes them (every backend): the token
    embedding and any learned position or token-type embedding (GPT-2's wpe, OPT's embed_positions), stored like the
    frozen layers (bfloat16 when they are cast or quantized under bf16 compute); the final norm and the head still
    train. A tied embedding trains as the head only: its lookup gets no gradient. Either way backward stops at the
    lowest active layer."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft) instead of LISA: the second baseline method."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """LoRA scaling numerator."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] | None = None
    """Module names to adapt; null lets peft pick its default for the model family."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate, > 0."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (biases, norms and 1-d params are never decayed)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam beta1, beta2, each in [0, 1)."""
    eps: float = 1e-8
    """Adam epsilon, > 0."""
    schedule: Schedule = "cosine"
    """cosine, linear or constant, after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to lr."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of lr, in [0, 1]."""
    always_lr_scale: float | None = None
    """The always-trained params' (embeddings, final norm, head) lr as a multiple of the layers' (optim.lr, and the
    schedule's value at each step), >= 0. They train at every step while LISA trains each layer a period at a time.
    Unset: 0.3 under LISA (the quality study: 0.3 and 0 both ahead of 1, docs/quality.md), 1 for full fine-tuning
    and LoRA. 0 freezes them (every backend): no gradient and no Adam state, stored like a frozen embedding
    (lisa.train_embeddings); backward stops at the lowest active layer."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clipping over trainable params; 0 disables."""
    adam_8bit: Adam8bit = "none"
    """Adam moments in 8 bits (torchao's AdamW8bit, blockwise; params under 4,096 elements keep fp32 moments):
    none, always (the always-trained params: embeddings, final norm, head) or all (the active layers too)."""
    implementation: AdamImplementation = "auto"
    """torch AdamW's kernel: fused (one kernel per step over all params; CPU and CUDA), foreach (batched per param
    group), for_loop (one param at a time), or auto: fused where the params' device supports it, else foreach on
    GPUs and for_loop elsewhere. The same arithmetic each way; not the 8-bit moments (torchao's compiled update)."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to run."""
    epochs: int = 0
    """Instead of steps: passes over the training data; the steps follow from its size and the global batch
    (world size x micro_batch_size x grad_accum). Giving both is an error."""
    eval_every: int = 0
    """With evaluation data (data.eval_path or data.eval_fraction): evaluate at the start, every eval_every steps
    (0: no others) and at the end."""
    eval_batches: int = 0
    """Cap on the evaluation micro-batches per evaluation (0: the whole evaluation set)."""
    eval_at_start: bool = True
    """With evaluation data: also evaluate before the first step (false: skip it, e.g. in a sweep whose runs all
    start from the same weights and need the baseline once)."""
    micro_batch_size: int = 4
    """Examples per forward pass per rank."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seed: int = 42
    """Seed of model init, data order and (by default) the layer sampler."""
    precision: Precision = "fp32"
    """fp32, or bf16 (autocast compute, fp32 weights and optimizer state)."""
    activation_checkpointing: bool = False
    """Recompute each decoder block's activations in backward."""
    compile: bool = False
    """torch.compile each decoder block (inductor; local and fsdp backends). All blocks share two graphs, trainable
    and frozen, so LISA switches do not recompile; each step's record counts the graphs (compiled_graphs)."""
    device: Device = "auto"
    """auto, cpu or cuda."""
    tf32: bool = False
    """CUDA: fp32 matmuls on TF32 tensor cores (about 8x faster on an A100/H100, 10-bit mantissa products): what
    train.precision=fp32 runs at near bf16 speed with. false keeps fp32 matmuls exact (IEEE fp32)."""
    loss: Loss = "plain"
    """plain (the head's logits for every token, then cross-entropy) or chunked (head and cross-entropy over
    train.loss_chunk_tokens supervised tokens at a time, recomputed in backward: the full logits never exist; Liger's
    fused kernel on CUDA when liger-kernel is installed)."""
    loss_chunk_tokens: int = 1024
    """train.loss=chunked: supervised tokens per chunk."""
    output_dir: str = "runs/default"
    """Metrics, summary and exported models go here."""
    overwrite: bool = False
    """Start afresh in an output_dir that holds another run's metrics, summary or checkpoints: they are deleted
    first. Without it such a start is refused, so that nothing already saved is lost."""


@dataclass
class BackendConfig:
    name: BackendName = "local"
    """local (one process), fsdp (FSDP2) or deepspeed (ZeRO-1/2/3), the last two under a launcher."""
    timeout_s: float = 300.0
    """Seconds a collective of a training step may wait (for a dead or stuck rank) before every rank fails. The
    slowest legitimate one is the LISA switch (a ZeRO-3 engine rebuild), all ranks busy alike: see README."""
    io_timeout_s: float = 3600.0
    """Seconds a rank may wait for another's I/O: the main rank tokenizing the data, a checkpoint being written,
    hashed or pruned, the final model being exported."""
    ds_config: str | None = None
    """deepspeed: the ZeRO JSON (ds_configs/*.json); its "auto" fields are filled from this config."""
    replicate: int = 1
    """fsdp: replicas of the sharded model (HSDP); 1 shards over all ranks, N shards within groups of WORLD/N."""
    reshard_after_forward: bool = True
    """fsdp: free a block's gathered params after its forward (re-gathered in backward)."""


CheckpointFormat = Literal["torch", "dcp", "deepspeed"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports, as data: validation, resume and export ask this instead of comparing names. Each
    backend class declares its own (`LocalBackend.capabilities`), the entry of `CAPABILITIES` under its name."""

    frozen_storage: bool = False
    """lisa.frozen_storage other than float32: frozen layers cast or quantized apart from the trained ones."""
    eight_bit_state: bool = False
    """optim.adam_8bit: the backend builds its own optimizer, which may keep 8-bit moments."""
    compile: bool = False
    """train.compile: the decoder blocks stay plain modules the backend runs (no engine of its own around them)."""
    grad_norm_sampling: bool = False
    """lisa.strategy=grad_norm: per-layer gradient norms after backward."""
    lora: bool = False
    """The LoRA baseline (lora.enabled)."""
    reshards_checkpoints: bool = False
    """A checkpoint loads on another world size than the one that wrote it."""
    launched: bool = True
    """Runs under a launcher (torchrun, deepspeed, mpirun, srun), possibly over several ranks."""
    engine_config: bool = False
    """Reads an engine JSON (backend.ds_config)."""
    checkpoint_format: CheckpointFormat = "torch"
    """How its checkpoints' model state is stored: torch (one torch.save file), dcp (torch.distributed.checkpoint)
    or deepspeed (DeepSpeed's own files); what `lisa-dist export` reads."""


CAPABILITIES: dict[str, Capabilities] = {
    "local": Capabilities(
        frozen_storage=True,
        eight_bit_state=True,
        compile=True,
        grad_norm_sampling=True,
        lora=True,
        reshards_checkpoints=True,
        launched=False,
        checkpoint_format="torch",
    ),
    "fsdp": Capabilities(
        frozen_storage=True,
        eight_bit_state=True,
        compile=True,
        grad_norm_sampling=True,
        reshards_checkpoints=True,
        checkpoint_format="dcp",
    ),
    "deepspeed": Capabilities(engine_config=True, checkpoint_format="deepspeed"),
}
"""backend.name -> what that backend supports, one entry per value of BackendName."""


def loss_chunk_tokens(cfg: Config) -> int:
    """Supervised tokens per chunk of the loss (0: the plain loss), as every backend takes it."""
    return cfg.train.loss_chunk_tokens if cfg.train.loss == "chunked" else 0


def capabilities(name: str) -> Capabilities:
    """What backend `name` supports, without building it; ConfigError naming backend.name for an unknown one."""
    if name not in CAPABILITIES:
        raise ConfigError(f"backend.name={name!r} is not allowed: expected one of {', '.join(CAPABILITIES)}")
    return CAPABILITIES[name]


def backends_with(capability: str) -> str:
    """The backends that have `capability`, in words ("local or fsdp"), for error messages."""
    names = [name for name, caps in CAPABILITIES.items() if getattr(caps, capability)]
    return " or ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + f" or {names[-1]}"


@dataclass
class CheckpointConfig:
    save_final: bool = False
    """Write the trained model as a Hugging Face folder to <output_dir>/final at the end."""
    dir: str | None = None
    """Where step-N checkpoints go; defaults to <output_dir>/checkpoints."""
    every: int = 0
    """Steps between checkpoints (0: none, except on a preemption signal)."""
    keep_last: int = 2
    """Good checkpoints kept; older ones are removed after a new one is complete."""
    resume: str = "auto"
    """auto (the newest good checkpoint in dir, if any), none, or the path of a step-N folder."""
    override: bool = False
    """Resume even if the config changed in a way that breaks exactness (the changes are logged)."""
    keep_best: int = 0
    """Besides the keep_last newest, keep the keep_best checkpoints of lowest eval loss (needs evaluation data;
    <checkpoint.dir>/best names the best one)."""
    on_signal: bool = True
    """On SIGTERM or SIGUSR1 every rank finishes its step, a checkpoint is saved and the run exits with 75."""

    export_dtype: Literal[ExportDtype, ""] = ""
    """dtype of the weights save_final writes: bfloat16, float16 or float32; empty: the dtype the source model is
    published in (its config's dtype; model.dtype for a preset)."""
    max_shard_size: str | int = "5GB"
    """Largest safetensors file of save_final (and the default of lisa-dist export): bytes or a size such as 5GB,
    500MB or 2GiB; the writer holds about one such shard in CPU memory, never the model."""


@dataclass
class LoggingConfig:
    log_every: int = 1
    """Steps between metric records (JSONL, cross-rank loss reduction); 1 logs every step."""
    console_every: int = 10
    """Steps between metric lines on the console (a multiple of log_every is shown)."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard scalars to <output_dir>/tensorboard (the tensorboard extra)."""
    wandb: bool = False
    """Also log the metrics to Weights & Biases (the wandb extra)."""
    wandb_project: str = "lisa_dist"
    """logging.wandb: the project."""
    wandb_mode: WandbMode = "offline"
    """logging.wandb: offline (a local run folder under <output_dir>/wandb, synced later with `wandb sync`) or
    online."""
    jsonl: str | None = None
    """Metrics JSONL path; defaults to <output_dir>/metrics.jsonl."""
    progress: bool = True
    """tqdm progress bar on rank 0."""
    level: LogLevel = "INFO"
    """Python logging level."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lisa: LisaConfig = field(default_factory=LisaConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHAT_TEMPLATES = ("chatml", "llama3")
"""The built-in chat templates data.chat_template names (lisa_dist.data.chat)."""
# Fields that moved: the old name's error says where to.
MOVED = {"backend.frozen_dtype": "lisa.frozen_storage"}


def _choices() -> dict[str, tuple[str, ...]]:
    """section.key -> allowed values of every Literal field (an empty string allowed shows as '')."""
    found = {}
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.default_factory)
        for key, hint in hints.items():
            if typing.get_origin(hint) is Literal:
                found[f"{section.name}.{key}"] = typing.get_args(hint)
    return found


# String fields with a fixed set of values (from their Literal types).
CHOICES = _choices()


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(value: str | int, field_name: str) -> int:
    """Bytes of `value`: an int, or digits with a unit (5GB, 500MB, 2GiB; GB = 10^9 bytes, as transformers reads
    max_shard_size). ConfigError naming `field_name` otherwise."""
    size = value if isinstance(value, int) and not isinstance(value, bool) else None
    if size is None:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(value).upper())
        if match and match.group(2) in _SIZE_UNITS:
            size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size is None or size <= 0:
        raise ConfigError(f"{field_name}={value!r}: expected a size above 0, in bytes or such as 5GB, 500MB or 2GiB")
    return size


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML/JSON file (or start from defaults), apply `--section.key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_file(Path(path))
    cfg = from_dict(raw, source=str(path) if path else "defaults")
    pairs = parse_overrides(overrides or [])
    for key, value in pairs:
        set_value(cfg, key, value)
    given = {f"{section}.{key}" for section, values in raw.items() if isinstance(values, dict) for key in values}
    _steps_or_epochs(cfg, given, {key for key, _ in pairs})
    cfg.optim.always_lr_scale = always_lr_scale_of(cfg)  # the method's default, written like a given value
    validate(cfg)
    return cfg


LISA_ALWAYS_LR_SCALE = 0.3
"""optim.always_lr_scale's default under LISA (the quality study, docs/quality.md)."""


def always_lr_scale_of(cfg: Config) -> float:
    """optim.always_lr_scale, or unset the method's default: LISA_ALWAYS_LR_SCALE under LISA, 1 otherwise."""
    if cfg.optim.always_lr_scale is not None:
        return cfg.optim.always_lr_scale
    return LISA_ALWAYS_LR_SCALE if cfg.lisa.enabled and not cfg.lora.enabled else 1.0


def _steps_or_epochs(cfg: Config, in_file: set[str], on_command_line: set[str]) -> None:
    """train.steps or train.epochs, not both; the command line wins over the file, so `--train.epochs=N` switches
    a file's train.steps to epochs (and `--train.steps=N` a file's train.epochs to steps)."""
    if "train.epochs" in on_command_line and "train.steps" in on_command_line and cfg.train.epochs:
        raise ConfigError(
            f"train.epochs={cfg.train.epochs} and train.steps={cfg.train.steps} both on the command "
            "line: give one (the steps follow from the epochs)"
        )
    if "train.steps" in on_command_line and "train.epochs" not in on_command_line and cfg.train.epochs:
        cfg.train.epochs = 0  # --train.steps replaces the file's epochs
        return
    if cfg.train.epochs and "train.steps" in in_file and "train.epochs" in in_file - on_command_line:
        raise ConfigError(
            f"train.epochs={cfg.train.epochs} and train.steps both in the config file: give one (the "
            "steps follow from the epochs). On the command line either replaces the other: "
            "--train.epochs=N trains N epochs whatever the file's train.steps"
        )


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"config file {path} is not valid {kind}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    cfg = Config()
    sections = {f.name for f in dataclasses.fields(Config)}
    for section, values in raw.items():
        _check_known(section, sections, f"{source}: unknown section")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {values!r}")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)
    return cfg


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`--a.b=v` or `--a.b v` pairs; values are parsed as YAML scalars (so `true`, `3`, `[1, 2]` keep their type)."""
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"override '{arg}' must look like --section.key=value")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, text = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override '{arg}' has no value")
        pairs.append((key, _parse_scalar(text)))
        i += 1
    return pairs


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.key` on cfg, coercing the value to the field's type; unknown names get the closest valid one."""
    if dotted.count(".") != 1:
        raise ConfigError(f"'{dotted}' must be section.key")
    section_name, key = dotted.split(".")
    _check_known(section_name, {f.name for f in dataclasses.fields(Config)}, "unknown section")
    if dotted in MOVED:
        raise ConfigError(f"'{dotted}' is now '{MOVED[dotted]}' (same values, plus int8 and nf4): rename it")
    section = getattr(cfg, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    _check_known(key, fields, f"unknown key in section '{section_name}':", prefix=f"{section_name}.")
    hint = typing.get_type_hints(type(section))[key]
    setattr(section, key, _coerce(value, hint, dotted))


def _check_known(name: str, known: typing.Iterable[str], what: str, prefix: str = "") -> None:
    known = list(known)
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    raise ConfigError(f"{what} '{prefix}{name}'{hint} (valid: {', '.join(sorted(known))})")


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for hint_ in inner[:-1]:  # the first type the value is (str | int: "5GB" or 5000000000)
            with contextlib.suppress(ConfigError):
                return _coerce(value, hint_, name)
        return _coerce(value, inner[-1], name)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r}: expected a list")
        return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r}: expected a mapping")
        return dict(value)
    if hint is Any:
        return value
    if origin is Literal:  # a string from a fixed set; YAML reads yes/no/on/off/true as booleans
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r}: expected one of {_listing(args)} (a string)")
        _choice(name, value, args)
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r}: expected an integer")
    if hint is float:
        try:
            number = float(value)  # YAML 1.1 reads "1e-4" as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r}: expected a number") from None
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected a number")
        if not math.isfinite(number):
            raise ConfigError(f"{name}={value!r}: expected a finite number")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}={value!r}: expected a string")
    raise ConfigError(f"{name}: unsupported field type {hint}")


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is not allowed: {allowed}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, name, value, f"expected one of {_listing(allowed)}")


def _listing(allowed: tuple[str, ...]) -> str:
    return ", ".join(value or "'' (empty)" for value in allowed)


def validate(cfg: Config) -> None:
    """Everything that can be checked without the model."""
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _require(
        bool(cfg.data.path) != bool(cfg.data.mixture),
        "data.path",
        cfg.data.path,
        "a file, folder or hub dataset id is required, or data.mixture instead"
        if not cfg.data.path
        else "give data.path or data.mixture, not both",
    )
    _validate_mixture(cfg.data)
    _choice("data.format", cfg.data.format, DATA_FORMATS)
    template = cfg.data.chat_template
    _require(
        not template or template in CHAT_TEMPLATES or Path(template).expanduser().is_file(),
        "data.chat_template",
        template,
        f"expected a Jinja file or one of {', '.join(CHAT_TEMPLATES)}",
    )
    _require(cfg.data.max_length >= 2, "data.max_length", cfg.data.max_length, "expected >= 2")
    _choice("model.attn_implementation", cfg.model.attn_implementation, ATTENTION)
    _validate_eval(cfg)
    _validate_lisa(cfg.lisa)
    _require(
        not (cfg.lisa.enabled and cfg.lora.enabled),
        "lora.enabled",
        cfg.lora.enabled,
        "LoRA and LISA are separate methods: set lisa.enabled=false to train LoRA",
    )
    _require(cfg.lora.r >= 1, "lora.r", cfg.lora.r, "expected >= 1")
    _require(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", cfg.lora.dropout, "expected in [0, 1)")
    _validate_optim(cfg.optim)
    t = cfg.train
    _require(t.steps >= 1, "train.steps", t.steps, "expected >= 1")
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "expected >= 1")
    _require(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "expected >= 1")
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.device", t.device, DEVICES)
    _choice("train.loss", t.loss, LOSSES)
    _require(t.loss_chunk_tokens >= 1, "train.loss_chunk_tokens", t.loss_chunk_tokens, "expected >= 1")
    _validate_backend(cfg)
    _validate_storage(cfg)
    if cfg.train.compile:
        _require(
            capabilities(cfg.backend.name).compile,
            "train.compile",
            True,
            f"needs backend.name={backends_with('compile')}: DeepSpeed wraps the model in its own engine "
            f"(backend.name={cfg.backend.name})",
        )
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, "expected >= 0 (0: off)")
    _require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", cfg.checkpoint.keep_last, "expected >= 1")
    _require(
        bool(cfg.checkpoint.resume),
        "checkpoint.resume",
        cfg.checkpoint.resume,
        "expected auto, none or the path of a step-N checkpoint folder",
    )
    _require(
        not cfg.checkpoint.export_dtype or cfg.checkpoint.export_dtype in EXPORT_DTYPES,
        "checkpoint.export_dtype",
        cfg.checkpoint.export_dtype,
        f"allowed values are {', '.join(EXPORT_DTYPES)}, or empty for the source model's dtype",
    )
    parse_size(cfg.checkpoint.max_shard_size, "checkpoint.max_shard_size")
    _require(
        not (cfg.model.config_overrides and cfg.model.preset_overrides),
        "model.preset_overrides",
        cfg.model.preset_overrides,
        "is the old name of model.config_overrides: give only config_overrides",
    )
    _require(
        isinstance(cfg.model.config_overrides.get("attn_implementation", "sdpa"), str)
        and cfg.model.config_overrides.get("attn_implementation", "sdpa") in ATTENTION,
        "model.config_overrides.attn_implementation",
        cfg.model.config_overrides.get("attn_implementation"),
        f"allowed values are {', '.join(ATTENTION)}",
    )
    _require(cfg.logging.log_every >= 1, "logging.log_every", cfg.logging.log_every, "expected >= 1")
    _require(cfg.logging.console_every >= 1, "logging.console_every", cfg.logging.console_every, "expected >= 1")
    _choice("logging.level", cfg.logging.level, LOG_LEVELS)


MIXTURE_KEYS = (
    "path",
    "format",
    "subset",
    "revision",
    "split",
    "text_field",
    "messages_field",
    "conversations_field",
    "weight",
    "eval_fraction",
)


def _validate_mixture(d: DataConfig) -> None:
    for i, source in enumerate(d.mixture):
        where = f"data.mixture[{i}]"
        unknown = [k for k in source if k not in MIXTURE_KEYS]
        if unknown:
            near = difflib.get_close_matches(unknown[0], MIXTURE_KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{where}.{unknown[0]} is not a field{hint}: expected {', '.join(MIXTURE_KEYS)}")
        path = source.get("path")
        _require(isinstance(path, str) and bool(path), f"{where}.path", path, "a file, folder or hub dataset id")
        for key in ("format", "subset", "revision", "split", "text_field", "messages_field", "conversations_field"):
            _require(isinstance(source.get(key, ""), str), f"{where}.{key}", source.get(key), "expected a string")
        _choice(f"{where}.format", source.get("format", d.format), DATA_FORMATS)
        weight = source.get("weight", 1.0)
        _require(
            isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) and weight > 0,
            f"{where}.weight",
            weight,
            "expected a number > 0",
        )
        share = source.get("eval_fraction", 0.0)
        _require(
            isinstance(share, (int, float)) and not isinstance(share, bool) and 0 <= share < 1,
            f"{where}.eval_fraction",
            share,
            "expected in [0, 1)",
        )
    _require(
        not (d.mixture and d.eval_fraction),
        "data.eval_fraction",
        d.eval_fraction,
        "with data.mixture, give each source its eval_fraction (or data.eval_path)",
    )


def _validate_eval(cfg: Config) -> None:
    d, t = cfg.data, cfg.train
    _require(
        not (d.packing and d.format == "text"),
        "data.packing",
        d.packing,
        "the text format is already packed into blocks of data.max_length tokens (alpaca or chat pack examples)",
    )
    _require(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction", d.eval_fraction, "expected in [0, 1)")
    _require(
        not (d.eval_path and d.eval_fraction),
        "data.eval_fraction",
        d.eval_fraction,
        f"give data.eval_path ({d.eval_path!r}) or data.eval_fraction, not both",
    )
    _require(t.epochs >= 0, "train.epochs", t.epochs, "expected >= 0 (0: train.steps decides)")
    _require(t.eval_every >= 0, "train.eval_every", t.eval_every, "expected >= 0 (0: only at the start and end)")
    _require(t.eval_batches >= 0, "train.eval_batches", t.eval_batches, "expected >= 0 (0: the whole set)")
    has_eval = bool(d.eval_path or d.eval_fraction)
    _require(
        has_eval or not t.eval_every,
        "train.eval_every",
        t.eval_every,
        "needs evaluation data: data.eval_path or data.eval_fraction",
    )
    _require(cfg.checkpoint.keep_best >= 0, "checkpoint.keep_best", cfg.checkpoint.keep_best, "expected >= 0")
    _require(
        has_eval or not cfg.checkpoint.keep_best,
        "checkpoint.keep_best",
        cfg.checkpoint.keep_best,
        "ranks checkpoints by eval loss: needs data.eval_path or data.eval_fraction",
    )
    _choice("logging.wandb_mode", cfg.logging.wandb_mode, WANDB_MODES)


def _validate_backend(cfg: Config) -> None:
    b = cfg.backend
    _choice("backend.name", b.name, BACKENDS)
    caps = capabilities(b.name)
    _require(b.replicate >= 1, "backend.replicate", b.replicate, "expected >= 1")
    _require(b.timeout_s > 0, "backend.timeout_s", b.timeout_s, "expected > 0 seconds")
    _require(b.io_timeout_s > 0, "backend.io_timeout_s", b.io_timeout_s, "expected > 0 seconds")
    if cfg.lisa.enabled and cfg.lisa.strategy == "grad_norm":
        _require(
            caps.grad_norm_sampling,
            "lisa.strategy",
            cfg.lisa.strategy,
            f"grad_norm needs per-layer gradient norms: backend.name={backends_with('grad_norm_sampling')}, "
            f"not {b.name}",
        )
    if cfg.lora.enabled:
        _require(caps.lora, "backend.name", b.name, f"the LoRA baseline runs on backend.name={backends_with('lora')}")
    if caps.engine_config:
        _require(
            b.ds_config is not None,
            "backend.ds_config",
            b.ds_config,
            "a DeepSpeed JSON is required with backend.name=deepspeed (see ds_configs/)",
        )
        from lisa_dist.ds_config import fill_ds_config, read_ds_config

        fill_ds_config(
            read_ds_config(b.ds_config or ""),
            micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=cfg.train.grad_accum,
            max_grad_norm=cfg.optim.max_grad_norm,
            precision=cfg.train.precision,
            world_size=None,
            source=f"backend.ds_config={b.ds_config}",
        )


def _validate_storage(cfg: Config) -> None:
    """Frozen storage, frozen embeddings and 8-bit moments against the backend and method."""
    lisa, name = cfg.lisa, cfg.backend.name
    caps = capabilities(name)
    _choice("lisa.frozen_storage", lisa.frozen_storage, FROZEN_STORAGE)
    _choice("lisa.host_dtype", lisa.host_dtype, DTYPES)
    _choice("optim.adam_8bit", cfg.optim.adam_8bit, ADAM_8BIT)
    if lisa.frozen_storage != "float32":
        _require(
            caps.frozen_storage,
            "lisa.frozen_storage",
            lisa.frozen_storage,
            f"needs backend.name={backends_with('frozen_storage')}: DeepSpeed ZeRO keeps every param in the "
            f"engine's own dtype (backend.name={name})",
        )
        _require(
            not cfg.lora.enabled,
            "lisa.frozen_storage",
            lisa.frozen_storage,
            "the LoRA baseline trains adapters over its own base model",
        )
        _require(
            cfg.model.dtype == "float32",
            "model.dtype",
            cfg.model.dtype,
            f"float32 with lisa.frozen_storage={lisa.frozen_storage!r} (active layers train in fp32)",
        )
    if not lisa.train_embeddings:
        _require(
            not cfg.lora.enabled,
            "lisa.train_embeddings",
            lisa.train_embeddings,
            "the LoRA baseline trains adapters over its own base model",
        )
    if cfg.optim.always_lr_scale not in (None, 1.0):
        _require(
            not cfg.lora.enabled,
            "optim.always_lr_scale",
            cfg.optim.always_lr_scale,
            "1 with LoRA: the scale is of LISA's and full fine-tuning's embeddings, final norm and head, and the "
            "LoRA baseline trains adapters only",
        )
    if lisa.frozen_storage == "bfloat16":
        _require(
            cfg.train.precision == "bf16",
            "lisa.frozen_storage",
            lisa.frozen_storage,
            "bfloat16 storage needs train.precision=bf16 (bf16 compute)",
        )
    if cfg.optim.adam_8bit != "none":
        _require(
            caps.eight_bit_state,
            "optim.adam_8bit",
            cfg.optim.adam_8bit,
            f"needs backend.name={backends_with('eight_bit_state')}: DeepSpeed builds its own optimizer "
            f"(backend.name={name})",
        )


def _validate_lisa(lisa: LisaConfig) -> None:
    _choice("lisa.strategy", lisa.strategy, STRATEGIES)
    _require(lisa.gamma >= 1, "lisa.gamma", lisa.gamma, "expected >= 1 (and <= the number of decoder layers)")
    _require(lisa.interval >= 1, "lisa.interval", lisa.interval, "expected >= 1")
    if lisa.strategy == "weighted":
        weights = lisa.weights or []
        _require(lisa.weights is not None, "lisa.weights", lisa.weights, "required by lisa.strategy=weighted")
        _require(
            all(w >= 0 for w in weights) and sum(weights) > 0,
            "lisa.weights",
            lisa.weights,
            "expected non-negative weights with a positive sum",
        )
    if lisa.strategy == "fixed":
        layers = lisa.fixed_layers or []
        _require(bool(layers), "lisa.fixed_layers", lisa.fixed_layers, "required by lisa.strategy=fixed")
        _require(len(set(layers)) == len(layers), "lisa.fixed_layers", layers, "expected distinct layer indices")
        _require(
            len(layers) == lisa.gamma, "lisa.fixed_layers", layers, f"expected exactly lisa.gamma={lisa.gamma} layers"
        )
    _require(
        0.0 < lisa.importance_floor <= 1.0,
        "lisa.importance_floor",
        lisa.importance_floor,
        "expected in (0, 1]: every layer keeps at least floor / L of the probability",
    )
    _require(0.0 <= lisa.importance_decay < 1.0, "lisa.importance_decay", lisa.importance_decay, "expected in [0, 1)")


def _validate_optim(o: OptimConfig) -> None:
    _require(o.lr > 0, "optim.lr", o.lr, "expected > 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "expected >= 0")
    _require(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas, "expected two values in [0, 1)"
    )
    _require(o.eps > 0, "optim.eps", o.eps, "expected > 0")
    _choice("optim.schedule", o.schedule, SCHEDULES)
    _choice("optim.implementation", o.implementation, ADAM_IMPLEMENTATIONS)
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "expected >= 0")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", o.min_lr_ratio, "expected in [0, 1]")
    _require(
        o.always_lr_scale is None or (math.isfinite(o.always_lr_scale) and o.always_lr_scale >= 0),
        "optim.always_lr_scale",
        o.always_lr_scale,
        "expected a finite number >= 0 (0 freezes the embeddings, final norm and head)",
    )
    _require(o.max_grad_norm >= 0, "optim.max_grad_norm", o.max_grad_norm, "expected >= 0 (0 disables clipping)")


def validate_for_model(cfg: Config, num_layers: int, positions: int | None = None) -> None:
    """Checks that need the model: its number of decoder layers L, and the positions its learned position embedding
    has rows for (None: rotary or none, which run past their trained length)."""
    if cfg.lisa.enabled:
        validate_lisa_layers(cfg.lisa, num_layers)
    if positions is not None:
        _require(
            cfg.data.max_length <= positions,
            "data.max_length",
            cfg.data.max_length,
            f"expected <= {positions}: the model's learned position embedding has {positions} positions "
            "(n_positions / max_position_embeddings), and a longer row has no position to look up",
        )


def validate_lisa_layers(lisa: LisaConfig, num_layers: int) -> None:
    """The LISA settings against a model of `num_layers` decoder layers (also what LayerSampler checks, for
    LisaCallback users who pass them without a config)."""
    _validate_lisa(lisa)
    _require(1 <= lisa.gamma <= num_layers, "lisa.gamma", lisa.gamma, f"expected in 1..{num_layers} (the model's L)")
    if lisa.strategy == "weighted":
        weights = lisa.weights or []
        _require(
            len(weights) == num_layers,
            "lisa.weights",
            lisa.weights,
            f"expected {num_layers} weights, one per decoder layer",
        )
        positive = sum(w > 0 for w in weights)
        _require(
            positive >= lisa.gamma,
            "lisa.weights",
            lisa.weights,
            f"expected at least lisa.gamma={lisa.gamma} positive weights",
        )
    if lisa.strategy == "fixed":
        _require(
            all(0 <= i < num_layers for i in lisa.fixed_layers or []),
            "lisa.fixed_layers",
            lisa.fixed_layers,
            f"expected indices in 0..{num_layers - 1}",
        )


# ---------------------------------------------------------------------------------------------------------------
# Documentation


def field_docs() -> dict[str, list[tuple[str, str, str]]]:
    """Section -> (key, default, documentation) of every field, read from the docstrings under each field above."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(sys.modules[Config.__module__]))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    docs: dict[str, list[tuple[str, str, str]]] = {}
    for section in dataclasses.fields(Config):
        node = classes[type(getattr(Config(), section.name)).__name__]
        defaults = dataclasses.asdict(getattr(Config(), section.name))
        entries = []
        for stmt, after in zip(node.body, [*node.body[1:], None], strict=True):
            if not isinstance(stmt, ast.AnnAssign):
                continue
            if not isinstance(stmt.target, ast.Name):
                continue
            key = stmt.target.id
            text = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
            entries.append((key, json.dumps(defaults[key]), " ".join(str(text).split())))
        docs[section.name] = entries
    return docs


def describe_fields() -> str:
    """Every field with its default and documentation, section by section (`lisa-dist config --doc`)."""
    lines = []
    for section, entries in field_docs().items():
        lines.append(f"{section}:")
        lines += [f"  {section}.{key} = {default}\n      {doc}" for key, default, doc in entries]
    return "\n".join(lines)
