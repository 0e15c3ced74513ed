"""lisa_dist inside other training loops: `hf` for transformers.Trainer."""
