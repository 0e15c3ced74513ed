"""Run by tests/test_hf.py (under torchrun, or as one process): transformers.Trainer + LisaCallback on lisa_dist's
model, data and seed, writing what each rank saw.

    torchrun --nproc-per-node 2 tests/distributed/drivers/hf_driver.py OUT_DIR --backend ddp|fsdp|zero1|zero2|zero3
        [--full] [--save-steps N] [--stop-after N] [--resume CHECKPOINT] -- [--section.key=value ...]

The overrides are lisa_dist's (tests/helpers.tiny_overrides); the Trainer gets the same model (lisa_dist's preset,
seeded), the same micro-batches on each rank in the same order as lisa_dist's ShardedBatches, a constant learning
rate and the same AdamW settings, so its losses can be compared with lisa_dist's trainer. --full runs a plain Trainer
(no LISA) for the state bytes. Per rank: OUT_DIR/rank{R}.json with per-step loss, active layers, Adam moment bytes
and what lisa_dist.tools.memory predicts for them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from lisa_dist.config import load_config
from lisa_dist.data import ShardedBatches, load_examples
from lisa_dist.dist import shutdown
from lisa_dist.integrations.hf import LisaCallback, LisaTrainer
from lisa_dist.method import moment_bytes
from lisa_dist.models import load_model
from lisa_dist.tools import Setup, estimate, shapes_of_model

REPO = Path(__file__).resolve().parents[3]


class Recorder(TrainerCallback):
    """Per optimizer step: the logged loss, the active layers and the Adam moment bytes this rank holds."""

    def __init__(self, trainer_ref: list, lisa: LisaCallback | None, shapes, setup: Setup) -> None:
        self.trainer_ref, self.lisa, self.shapes, self.setup = trainer_ref, lisa, shapes, setup
        self.steps: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        trainer = self.trainer_ref[0]
        if trainer.is_deepspeed_enabled:
            inner = trainer.model_wrapped.optimizer.optimizer
        else:
            inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        layers = self.lisa.active if self.lisa else None
        expected = estimate(self.shapes, "lisa" if self.lisa else "full", self.setup, active=layers).moments
        gc.collect()
        engines = sum(type(o).__name__ == "DeepSpeedEngine" for o in gc.get_objects())
        self.steps.append(
            {
                "step": state.global_step,
                "active_layers": list(layers) if layers else None,
                "moment_bytes": moment_bytes(inner),
                "expected_moment_bytes": expected,
                "live_engines": engines,
            }
        )

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs and self.steps and self.steps[-1]["step"] == state.global_step:
            self.steps[-1]["loss"] = logs["loss"]


def ordered_micro_batches(cfg, dataset, pad_id: int, world: int) -> list[dict]:
    """lisa_dist's micro-batches in the order accelerate deals them out: item i goes to rank i % world."""
    ranks = [
        ShardedBatches(
            dataset,
            seed=cfg.train.seed,
            rank=r,
            world_size=world,
            micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=cfg.train.grad_accum,
            pad_id=pad_id,
        )
        for r in range(world)
    ]
    items = []
    for step in range(cfg.train.steps):
        per_rank = [batches.step_batches(step) for batches in ranks]
        for micro in range(cfg.train.grad_accum):
            items.extend(per_rank[r][micro] for r in range(world))
    return items


def backend_args(backend: str) -> tuple[dict, str]:
    """TrainingArguments for `backend`, and its name in lisa_dist.tools.memory."""
    if backend.startswith("zero"):
        return {"deepspeed": str(REPO / "ds_configs" / f"{backend}.json")}, backend
    if backend == "fsdp":
        return {
            "fsdp": "full_shard auto_wrap",
            "fsdp_config": {
                "fsdp_version": 2,
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                "reshard_after_forward": True,
                "state_dict_type": "SHARDED_STATE_DICT",
            },
        }, "fsdp"
    return {"ddp_backend": "gloo"} if backend == "ddp" else {}, "ddp" if backend == "ddp" else "local"


def fsdp_on_cpu(cls: type) -> type:
    """accelerate 1.15 turns FSDP on only for GPU-like distributed types, not MULTI_CPU: on this CPU test machine,
    put the FSDP plugin into the Accelerator's state right after Trainer creates it (a GPU run needs nothing)."""

    class CpuFSDP(cls):
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
                from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

                state = self.accelerator.state
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                state.distributed_type = DistributedType.FSDP
                self.is_fsdp_enabled = True

    return CpuFSDP


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--backend", default="ddp")
    parser.add_argument("--full", action="store_true", help="plain Trainer, every param trained")
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--stop-after", type=int, default=0, help="end training after this many steps")
    parser.add_argument("--resume", default=None)
    args, overrides = parser.parse_known_args()
    cfg = load_config(None, [o for o in overrides if o != "--"])
    extra, memory_backend = backend_args(args.backend)
    # lisa_dist's seeded preset. ZeRO-3 loads it as a user would: saved, then from_pretrained after TrainingArguments,
    # so transformers builds it partitioned under zero.Init.
    model, tokenizer = load_model(cfg.model, cfg.train.seed)
    rank = int(os.environ.get("RANK", "0"))
    if args.backend == "zero3":
        folder = args.out / f"init_rank{rank}"
        model.save_pretrained(folder)
        del model
    training_args = TrainingArguments(
        output_dir=str(args.out / "trainer"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=cfg.train.grad_accum,
        max_steps=cfg.train.steps,
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        adam_epsilon=cfg.optim.eps,
        max_grad_norm=cfg.optim.max_grad_norm,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        report_to=[],
        seed=cfg.train.seed,
        train_sampling_strategy="sequential",
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_only_model=False,
        **extra,
    )
    world = training_args.world_size
    if args.backend == "zero3":
        import deepspeed

        # On CPU accelerate is MULTI_CPU and leaves deepspeed.comm to the Trainer; zero.Init needs it already.
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert all(hasattr(p, "ds_id") for p in model.parameters()), "not built under zero.Init"
    dataset = load_examples(cfg.data, tokenizer)
    items = ordered_micro_batches(cfg, dataset, tokenizer.pad_token_id, world)
    setup = Setup(backend=memory_backend, world_size=world, rank=rank, precision="fp32")
    shapes = shapes_of_model(model)
    lisa = None if args.full else LisaCallback(gamma=cfg.lisa.gamma, interval=cfg.lisa.interval)
    trainer_ref: list = []
    recorder = Recorder(trainer_ref, lisa, shapes, setup)
    callbacks = [recorder] + ([lisa] if lisa else [])
    cls = Trainer if args.full else LisaTrainer
    if args.backend == "fsdp":
        cls = fsdp_on_cpu(cls)
    trainer = cls(
        model=model, args=training_args, train_dataset=items, data_collator=lambda rows: rows[0], callbacks=callbacks
    )
    trainer_ref.append(trainer)
    if args.stop_after:

        class Stop(TrainerCallback):
            def on_step_end(self, a, state, control, **kwargs):
                control.should_training_stop = state.global_step >= args.stop_after

        trainer.add_callback(Stop())
    trainer.train(resume_from_checkpoint=args.resume)
    result = {
        "rank": rank,
        "world": world,
        "steps": recorder.steps,
        "schedule": [[s, list(layers)] for s, layers in lisa.schedule] if lisa else [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
