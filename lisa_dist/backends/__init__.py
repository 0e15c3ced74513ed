"""Backends behind one Protocol; `build_backend` picks one by `backend.name` from `REGISTRY`. What each supports is
data (`capabilities(name)`, each class's `capabilities`), asked without building one."""

from __future__ import annotations

import logging
from typing import cast

import torch

from lisa_dist.backends.base import Backend
from lisa_dist.backends.deepspeed import (
    DS_TAG,
    DeepSpeedBackend,
    always_partitions,
    build_engine,
    carry_out,
    destroy_engine,
    unlink_shm_at_exit,
)
from lisa_dist.backends.fsdp import FSDPBackend, rerun_lazy_init
from lisa_dist.backends.local import LocalBackend
from lisa_dist.config import Config, capabilities, loss_chunk_tokens
from lisa_dist.dist import detect_launcher, init_distributed
from lisa_dist.errors import ConfigError

log = logging.getLogger(__name__)


REGISTRY: dict[str, type[LocalBackend] | type[FSDPBackend] | type[DeepSpeedBackend]] = {
    "local": LocalBackend,
    "fsdp": FSDPBackend,
    "deepspeed": DeepSpeedBackend,
}
"""backend.name -> its class; each class declares its `capabilities` (`lisa_dist.config.CAPABILITIES[name]`)."""


def build_backend(cfg: Config) -> Backend:
    b = cfg.backend
    if cfg.train.tf32:  # torch's default ("highest") keeps fp32 matmuls exact
        torch.set_float32_matmul_precision("high")
    if b.name not in REGISTRY:
        raise ConfigError(f"backend.name={b.name!r} is not available: expected one of {', '.join(REGISTRY)}")
    cls = REGISTRY[b.name]
    if not cls.capabilities.launched:  # the local backend, the one that takes no process group
        return cast("type[LocalBackend]", cls).from_config(cfg)
    if detect_launcher() == "single":
        log.warning(
            "backend.name=%s without a launcher: running as one rank. For more, start it with "
            "launch/torchrun.sh (NPROC_PER_NODE=N), torchrun --nproc-per-node N -m lisa_dist.cli train ..., "
            "launch/deepspeed.sh, launch/mpirun.sh or srun (README: Launching)",
            b.name,
        )
    return cls.from_config(cfg, init_distributed(cfg.train.device, b.timeout_s, b.io_timeout_s))


__all__ = [
    "DS_TAG",
    "REGISTRY",
    "Backend",
    "DeepSpeedBackend",
    "FSDPBackend",
    "LocalBackend",
    "always_partitions",
    "build_backend",
    "build_engine",
    "capabilities",
    "carry_out",
    "destroy_engine",
    "loss_chunk_tokens",
    "rerun_lazy_init",
    "unlink_shm_at_exit",
]
