"""AdamW whose state exists only for the params that train now, and the learning-rate schedule.

The optimizer has four param groups, each tagged with its `role`: always-trained params (embeddings, final norm,
head) with and without weight decay, then the active layers' params with and without weight decay. A LISA switch
replaces the params of the two `layers` groups and drops the Adam state of every param that leaves them; the
always-trained params keep their moments
and their own step count, and newly active layers start from fresh state (torch AdamW creates it lazily).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lisa_dist.config import OptimConfig

NamedParams = list[tuple[str, nn.Parameter]]
ALWAYS, LAYERS = "always", "layers"


@dataclass
class TrainableSet:
    """What a method trains: params trained at every step, and per decoder layer the params LISA switches."""

    always: NamedParams
    layers: list[NamedParams] = field(default_factory=list)
    frozen: NamedParams = field(default_factory=list)
    """Params that never train (a vision-language model's vision tower): kept frozen at every switch."""

    def layer_params(self, indices: Sequence[int]) -> NamedParams:
        return [named for i in indices for named in self.layers[i]]

    def all_named(self) -> NamedParams:
        """The always-trained params, then every layer's."""
        return self.always + self.layer_params(range(len(self.layers)))

    def num_params(self, indices: Sequence[int]) -> int:
        """Elements of the always-trained params and of layers `indices` (a ZeRO-3 partitioned param: its ds_numel,
        the whole param's)."""
        return sum(getattr(p, "ds_numel", p.numel()) for _, p in self.always + self.layer_params(indices))


def _split_decay(params: NamedParams) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    # Matrices decay; biases, norm scales and other 1-d params do not. A ZeRO-3 partitioned param keeps its real
    # shape in ds_shape (its data is an empty 1-d tensor).
    decay = [p for _, p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for _, p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
    return decay, no_decay


def param_groups(
    always: NamedParams,
    active: NamedParams,
    weight_decay: float,
    drop_empty: bool = False,
    always_lr_scale: float = 1.0,
) -> list[dict]:
    """Always-trained groups first (a fixed order), then the layer groups; `drop_empty` for DeepSpeed, whose
    partitioning needs at least one param per group. Each group's `lr_scale` multiplies the schedule's lr for it
    (`set_lr`): `always_lr_scale` for the always-trained groups, 1 for the layers'."""
    groups = []
    for role, params, scale in ((ALWAYS, always, always_lr_scale), (LAYERS, active, 1.0)):
        decay, no_decay = _split_decay(params)
        groups.append({"params": decay, "weight_decay": weight_decay, "role": role, "lr_scale": scale})
        groups.append({"params": no_decay, "weight_decay": 0.0, "role": role, "lr_scale": scale})
    return [g for g in groups if g["params"]] if drop_empty else groups


def build_adamw(
    always: NamedParams,
    active: NamedParams,
    cfg: OptimConfig,
    drop_empty: bool = False,
) -> torch.optim.Optimizer:
    """torch's AdamW, or with `cfg.adam_8bit` torchao's AdamW8bit (`lisa_dist.method.adam8bit`)."""
    # A bare OptimConfig (not from load_config, which gives the method's default) trains them at the layers' lr.
    scale = 1.0 if cfg.always_lr_scale is None else cfg.always_lr_scale
    groups = param_groups(always, active, cfg.weight_decay, drop_empty, scale)
    for group in groups:  # a scheduler that scales each group's initial lr (Trainer's) keeps the ratio
        group["lr"] = cfg.lr * group["lr_scale"]
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.adam_8bit == "none":
        device = next((p.device for _, p in always + active), torch.device("cpu"))
        return torch.optim.AdamW(groups, **kwargs, **adamw_kernel(cfg.implementation, device))
    from lisa_dist.method.adam8bit import adamw_8bit

    return adamw_8bit(groups, layers_too=cfg.adam_8bit == "all", layer_role=LAYERS, **kwargs)


def adamw_kernel(implementation: str, device: torch.device) -> dict[str, Any]:
    """torch AdamW's `fused`/`foreach` arguments for `optim.implementation` on `device` (the params' device: the
    layer groups are refilled at each switch with params on the same one). The fused kernel updates every param of
    a group in one pass; on CPU it is several times faster than the per-param loop, which is torch's CPU default."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if implementation == "auto":
        if device.type in _get_fused_kernels_supported_devices():
            implementation = "fused"
        else:
            implementation = "foreach" if device.type != "cpu" else "for_loop"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[implementation]


def freeze_except_always(model: nn.Module, trainable: TrainableSet) -> None:
    """Before the first activation: only the always-trained params require grad."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in trainable.always:
        p.requires_grad_(True)


def set_requires_grad(trainable: TrainableSet, indices: Sequence[int]) -> list[nn.Parameter]:
    """Make the always-trained params and exactly the layers `indices` trainable, the params frozen always not;
    returns the params that left (now frozen, their gradients dropped)."""
    for _, p in trainable.frozen:  # a model handed over as built (the Trainer integration) has them trainable
        p.requires_grad_(False)
    active = trainable.layer_params(indices)
    keep = {id(p) for _, p in active}
    left = []
    for _, p in trainable.layer_params(range(len(trainable.layers))):
        if id(p) not in keep:
            p.requires_grad_(False)
            p.grad = None
            left.append(p)
    for _, p in trainable.always + active:
        p.requires_grad_(True)
    return left


def set_active_params(optimizer: torch.optim.Optimizer, trainable: TrainableSet, indices: Sequence[int]) -> None:
    """Make exactly the layers `indices` trainable: flip requires_grad and swap the optimizer's layer groups.

    Params that stay active keep their Adam state; params that leave lose it (and their gradient).
    """
    for p in set_requires_grad(trainable, indices):
        optimizer.state.pop(p, None)
    decay_group, no_decay_group = [g for g in optimizer.param_groups if g["role"] == LAYERS]
    decay_group["params"], no_decay_group["params"] = _split_decay(trainable.layer_params(indices))


def clip_grad_norm(
    params: list[nn.Parameter],
    max_norm: float,
    sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> float:
    """Global L2 norm of the gradients of `params`; when above `max_norm` (> 0), scale them down to it.

    Each rank squares and sums its own (local) gradient shards (`_sum_of_squares`: fp32 row norms, fp64 sums),
    `sum_over_shards` adds the ranks that hold other shards of the same params. The split into shards changes the
    fp64 sum by about 1e-16 relative, so the fp32 clip factor, and the trained weights, do not depend on how the
    params are sharded. `device`: where a rank that holds no gradient puts its zero (NCCL takes no CPU tensor).
    """
    grads = [p.grad for p in params if p.grad is not None]
    squares = _sum_of_squares(grads, device)
    if sum_over_shards is not None:
        squares = sum_over_shards(squares)
    total = math.sqrt(float(squares))
    if max_norm > 0 and total > max_norm:
        factor = max_norm / (total + 1e-6)
        torch._foreach_mul_([_local(grad) for grad in grads], factor)  # one batched kernel, not one per param
    return total


def layer_sq_norms(
    trainable: TrainableSet,
    layers: Sequence[int],
    device: torch.device | None = None,
) -> torch.Tensor:
    """Per layer of `layers`, the squared L2 norm of the gradient this rank holds (its shards), in fp64, on
    `device` (one tensor: the caller reads it once)."""
    sums = [
        _sum_of_squares([p.grad for _, p in trainable.layers[layer] if p.grad is not None], device) for layer in layers
    ]
    return (
        torch.stack([s.to(device) if device is not None else s for s in sums])
        if sums
        else torch.zeros(0, dtype=torch.float64, device=device)
    )


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """Sum of squares of this rank's shards of `grads`, in fp64, on their device (no host sync).

    A matrix's rows are normed in fp32 (one vectorized pass, 16x faster than an fp64 norm on CPU: 6 ms against 90
    for SmolLM2's tied embedding and two layers) and their squares summed in fp64. Shards split matrices by rows
    (FSDP2's dim 0), so every row's norm is the same whichever rank holds it; vectors are normed in fp64."""
    squares = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else device)
    for grad in grads:
        local = _local(grad)
        if local.dim() >= 2 and local.numel():
            rows = torch.linalg.vector_norm(local.reshape(local.shape[0], -1), dim=1, dtype=torch.float32)
            squares += rows.double().square().sum()
        else:
            squares += torch.linalg.vector_norm(local, dtype=torch.float64) ** 2
    return squares


def _local(t: torch.Tensor) -> torch.Tensor:
    # A sharded (DTensor) gradient or state contributes only the shard this rank holds.
    return t.to_local() if hasattr(t, "to_local") else t


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's `lr` for this step, times each group's `lr_scale` (optim.always_lr_scale)."""
    for group in optimizer.param_groups:
        scaled = lr * group.get("lr_scale", 1.0)
        if torch.is_tensor(group["lr"]):  # torchao's optimizers keep it a tensor (no recompile per value)
            group["lr"].fill_(scaled)
        else:
            group["lr"] = scaled


def moment_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state tensors shaped like their param (Adam's moments); per-param step scalars excluded."""
    total = 0
    for param, state in optimizer.state.items():
        for value in state.values():
            if torch.is_tensor(value) and value.shape == param.shape:
                total += storage_bytes([value])
    return total


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors`: what they really occupy. Views into one flat buffer count
    it once, padding included; a sharded (DTensor) tensor counts this rank's shard."""
    storages = {}
    for tensor in tensors:
        if tensor is None:
            continue
        for storage in _storages(_local(tensor)):
            if storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _storages(tensor: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    # A tensor subclass (torchao's quantized weights, 8-bit optimizer state) occupies its inner tensors' storage.
    if is_traceable_wrapper_subclass(tensor):
        for name in tensor.__tensor_flatten__()[0]:
            yield from _storages(_local(getattr(tensor, name)))
    else:
        yield tensor.untyped_storage()


def measured_state(
    params: Iterable[torch.Tensor],
    grads: int,
    masters: int,
    moments: int,
    host: int = 0,
) -> dict[str, int]:
    """The kinds of bytes `lisa_dist.tools.memory` predicts, as one rank holds them (grads: before the update);
    host: the exact copies of quantized frozen weights in host memory."""
    return {"params": storage_bytes(params), "grads": grads, "masters": masters, "moments": moments, "host": host}


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine/linear decay or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, progress)
    if cfg.schedule == "constant":
        factor = 1.0
    elif cfg.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)


def named_optimizer_state(optimizer: torch.optim.Optimizer, trainable: TrainableSet) -> dict[str, dict]:
    """The optimizer's per-param state keyed by parameter name (only params that have state)."""
    names = {id(p): n for n, p in trainable.all_named()}
    return {names[id(p)]: state for p, state in optimizer.state.items() if id(p) in names}


def load_named_optimizer_state(
    optimizer: torch.optim.Optimizer, trainable: TrainableSet, saved: dict[str, dict]
) -> None:
    """Put state saved by `named_optimizer_state` back on the params of the same names in the optimizer now."""
    params = dict(trainable.all_named())
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for name, state in saved.items():
        param = params.get(name)
        if param is None or id(param) not in group_of:
            raise ValueError(f"optimizer state for {name!r} has no trainable parameter to go to")
        # The fused (and capturable) kernels keep the step count on the param's device too, as torch's own
        # load_state_dict puts it.
        on_device = group_of[id(param)].get("fused") or group_of[id(param)].get("capturable")
        optimizer.state[param] = {
            k: v.to(param.device) if torch.is_tensor(v) and (v.dim() or on_device) else v for k, v in state.items()
        }
