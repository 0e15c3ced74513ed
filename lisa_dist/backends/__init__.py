"""Backends behind one Protocol; `build_backend` picks one by `backend.name`."""
from __future__ import annotations

from lisa_dist.backends.base import Backend
from lisa_dist.backends.local import LocalBackend
from lisa_dist.config import Config


def build_backend(cfg: Config) -> Backend:
    b, t = cfg.backend, cfg.train
    if b.name == "local":
        return LocalBackend(t.device, t.precision, cfg.optim)
    from lisa_dist.dist import init_distributed

    env = init_distributed(t.device, b.timeout_s)
    if b.name == "fsdp":
        from lisa_dist.backends.fsdp import FSDPBackend

        return FSDPBackend(env, t.precision, cfg.optim, replicate=b.replicate, frozen_dtype=b.frozen_dtype,
                           reshard_after_forward=b.reshard_after_forward)
    if b.name == "deepspeed":
        from lisa_dist.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(env, b.ds_config, t.precision, cfg.optim, t.micro_batch_size, t.grad_accum)
    raise ValueError(f"backend.name={b.name!r} is not available")


__all__ = ["Backend", "LocalBackend", "build_backend"]
