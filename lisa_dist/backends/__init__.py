"""Backends behind one Protocol; `build_backend` picks one by `backend.name`."""
from __future__ import annotations

import logging

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
from lisa_dist.config import Config
from lisa_dist.dist import detect_launcher, init_distributed

log = logging.getLogger(__name__)


def loss_chunk_tokens(cfg: Config) -> int:
    """Supervised tokens per chunk of the loss (0: the plain loss), as every backend takes it."""
    return cfg.train.loss_chunk_tokens if cfg.train.loss == "chunked" else 0


def build_backend(cfg: Config) -> Backend:
    b, t, lisa = cfg.backend, cfg.train, cfg.lisa
    chunk = loss_chunk_tokens(cfg)
    if t.tf32:  # torch's default ("highest") keeps fp32 matmuls exact
        torch.set_float32_matmul_precision("high")
    if b.name == "local":
        return LocalBackend(t.device, t.precision, cfg.optim, frozen_storage=lisa.frozen_storage,
                            host_dtype=lisa.host_dtype, loss_chunk_tokens=chunk)
    if detect_launcher() == "single":
        log.warning("backend.name=%s without a launcher: running as one rank. For more, start it with "
                    "launch/torchrun.sh (NPROC_PER_NODE=N), torchrun --nproc-per-node N -m lisa_dist.cli train ..., "
                    "launch/deepspeed.sh, launch/mpirun.sh or srun (README: Launching)", b.name)
    env = init_distributed(t.device, b.timeout_s, b.io_timeout_s)
    if b.name == "fsdp":
        return FSDPBackend(env, t.precision, cfg.optim, replicate=b.replicate, frozen_storage=lisa.frozen_storage,
                           reshard_after_forward=b.reshard_after_forward, loss_chunk_tokens=chunk,
                           host_dtype=lisa.host_dtype)
    if b.name == "deepspeed":
        return DeepSpeedBackend(env, b.ds_config, t.precision, cfg.optim, t.micro_batch_size, t.grad_accum,
                                loss_chunk_tokens=chunk)
    raise ValueError(f"backend.name={b.name!r} is not available")


__all__ = [
    "DS_TAG", "Backend", "DeepSpeedBackend", "FSDPBackend", "LocalBackend", "always_partitions", "build_backend",
    "build_engine", "carry_out", "destroy_engine", "loss_chunk_tokens", "rerun_lazy_init", "unlink_shm_at_exit",
]
