"""lisa_dist inside other training loops: `hf` for transformers.Trainer (`from lisa_dist.integrations.hf import
LisaCallback, LisaTrainer`)."""

from lisa_dist.integrations import hf

__all__ = ["hf"]
