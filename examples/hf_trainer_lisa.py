"""Fine-tune with transformers.Trainer + LISA (lisa_dist.integrations.hf), on one device or many.

    python examples/hf_trainer_lisa.py examples/hf_trainer_lisa.yaml                       # one process
    torchrun --nproc-per-node 2 examples/hf_trainer_lisa.py examples/hf_trainer_lisa.yaml  # DDP
    torchrun --nproc-per-node 8 examples/hf_trainer_lisa.py my.yaml --fsdp-config '{"fsdp_version": 2}'
    deepspeed --num_gpus 8 examples/hf_trainer_lisa.py my.yaml --deepspeed ds_configs/zero2.json

The YAML has three sections: `model` (a Hugging Face folder or hub id, or a lisa_dist preset such as tiny-llama),
`data` (lisa_dist's data config: alpaca/chat/text files, tokenized with the model's tokenizer; prompts carry no
loss), `lisa` (LisaCallback's settings) and `trainer` (TrainingArguments, passed as they are). Command-line flags
--deepspeed and --fsdp-config override the trainer section. Pass --resume to continue from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from lisa_dist.config import DataConfig, ModelConfig
from lisa_dist.data import collate, load_examples
from lisa_dist.integrations.hf import LisaCallback, LisaTrainer
from lisa_dist.models import load_model


class Collator:
    """Right-pads a list of tokenized rows (lisa_dist's collate: pad id, label -100, attention mask 0)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        return collate([r["input_ids"] for r in rows], [r["labels"] for r in rows], self.pad_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--deepspeed", help="a DeepSpeed JSON (ZeRO-1/2/3); no optimizer or scheduler section")
    parser.add_argument("--fsdp-config", help="FSDP2 settings as JSON, e.g. '{\"fsdp_version\": 2}'")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher's
    cli = parser.parse_args()
    cfg = yaml.safe_load(cli.config.read_text())
    trainer_cfg = dict(cfg.get("trainer", {}))
    if cli.deepspeed:
        trainer_cfg["deepspeed"] = cli.deepspeed
    if cli.fsdp_config:
        trainer_cfg["fsdp"] = "full_shard auto_wrap"
        trainer_cfg["fsdp_config"] = {"fsdp_version": 2, **json.loads(cli.fsdp_config)}
    # TrainingArguments first: under ZeRO-3 it makes from_pretrained build the model partitioned.
    args = TrainingArguments(remove_unused_columns=False, **trainer_cfg)
    model, tokenizer = load_model(ModelConfig(**cfg.get("model", {})), seed=args.seed)
    data = load_examples(DataConfig(**cfg["data"]), tokenizer)
    trainer = LisaTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=Collator(tokenizer.pad_token_id),
        callbacks=[LisaCallback(**cfg.get("lisa", {}))],
    )
    checkpoint = get_last_checkpoint(args.output_dir) if cli.resume and Path(args.output_dir).is_dir() else None
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.is_world_process_zero():
        print(
            f"done: {result.global_step} steps, train loss {result.training_loss:.4f}, "
            f"layer schedule (first step, layers): {trainer.lisa.schedule}"
        )
    trainer.save_model(str(Path(args.output_dir) / "final"))


if __name__ == "__main__":
    main()
