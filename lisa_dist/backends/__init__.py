"""Backends behind one Protocol; `build_backend` picks one by `backend.name`."""
from __future__ import annotations

from lisa_dist.backends.base import Backend
from lisa_dist.backends.local import LocalBackend
from lisa_dist.config import Config


def build_backend(cfg: Config) -> Backend:
    if cfg.backend.name == "local":
        return LocalBackend(cfg.train.device, cfg.train.precision, cfg.optim)
    if cfg.backend.name == "fsdp":
        from lisa_dist.backends.fsdp import FSDPBackend
        from lisa_dist.dist import init_distributed

        b = cfg.backend
        return FSDPBackend(init_distributed(cfg.train.device), cfg.train.precision, cfg.optim, replicate=b.replicate,
                           frozen_dtype=b.frozen_dtype, reshard_after_forward=b.reshard_after_forward)
    if cfg.backend.name == "deepspeed":
        from lisa_dist.backends.deepspeed import DeepSpeedBackend
        from lisa_dist.dist import init_distributed

        return DeepSpeedBackend(init_distributed(cfg.train.device), cfg.backend.ds_config, cfg.train.precision,
                                cfg.optim, cfg.train.micro_batch_size, cfg.train.grad_accum)
    raise ValueError(f"backend.name={cfg.backend.name!r} is not available")


__all__ = ["Backend", "LocalBackend", "build_backend"]
