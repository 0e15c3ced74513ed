"""Run under torchrun by tests/test_memory.py: each distributed setup trains a few steps (one LISA switch), then
every rank writes what it holds (backend.state_bytes) next to what lisa_dist.tools.memory predicts for it.

    torchrun --nproc-per-node 2 tests/distributed/drivers/memory_driver.py OUT_DIR DATA_FILE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lisa_dist.config import load_config
from lisa_dist.models import preset_config
from lisa_dist.run import build, train_step
from lisa_dist.tools import Setup, estimate, shapes_of

REPO = Path(__file__).resolve().parents[3]
TIED = '--model.config_overrides={"num_hidden_layers":4,"intermediate_size":130,"tie_word_embeddings":true}'
DS = {
    stage: f"--backend.ds_config={REPO / 'ds_configs' / f'{stage}.json'}"
    for stage in ("zero1", "zero2", "zero3", "zero3_offload")
}
# name -> (memory-model backend, extra overrides)
SETUPS = {
    "fsdp-fp32": ("fsdp", ["--backend.name=fsdp"]),
    "fsdp-fp32-full": ("fsdp", ["--backend.name=fsdp", "--lisa.enabled=false"]),
    "fsdp-bf16": ("fsdp", ["--backend.name=fsdp", "--train.precision=bf16"]),
    "fsdp-bf16-frozen-bf16": (
        "fsdp",
        ["--backend.name=fsdp", "--train.precision=bf16", "--lisa.frozen_storage=bfloat16"],
    ),
    "fsdp-bf16-frozen-bf16-embeddings": (
        "fsdp",
        [
            "--backend.name=fsdp",
            "--train.precision=bf16",
            "--lisa.frozen_storage=bfloat16",
            "--lisa.train_embeddings=false",
        ],
    ),
    "fsdp-adam8": (
        "fsdp",
        [
            "--backend.name=fsdp",
            "--optim.adam_8bit=all",
            "--train.loss=chunked",
            '--model.config_overrides={"num_hidden_layers":4,"intermediate_size":130,"vocab_size":1031}',
        ],
    ),
    # int8 / NF4 frozen blocks: each rank's padded shards quantized on the device, exact on the host.
    "fsdp-nf4": ("fsdp", ["--backend.name=fsdp", "--lisa.frozen_storage=nf4"]),
    "fsdp-int8-host-bf16-frozen-embeddings": (
        "fsdp",
        [
            "--backend.name=fsdp",
            "--lisa.frozen_storage=int8",
            "--lisa.host_dtype=bfloat16",
            "--lisa.train_embeddings=false",
        ],
    ),
    "ddp": ("ddp", ["--backend.name=fsdp", "--backend.replicate=2"]),
    "zero1": ("zero1", ["--backend.name=deepspeed", DS["zero1"]]),
    "zero2": ("zero2", ["--backend.name=deepspeed", DS["zero2"]]),
    "zero2-bf16": ("zero2", ["--backend.name=deepspeed", DS["zero2"], "--train.precision=bf16"]),
    "zero3": ("zero3", ["--backend.name=deepspeed", DS["zero3"]]),
    "zero3-frozen-embeddings": ("zero3", ["--backend.name=deepspeed", DS["zero3"], "--lisa.train_embeddings=false"]),
    "zero3-bf16": ("zero3", ["--backend.name=deepspeed", DS["zero3"], "--train.precision=bf16"]),
    "zero3-offload-bf16": (
        "zero3_offload",
        ["--backend.name=deepspeed", DS["zero3_offload"], "--train.precision=bf16"],
    ),
    # The LM head tied to the embedding: one parameter, counted once, on every backend (ZeRO-3: under zero.Init).
    "fsdp-fp32-tied": ("fsdp", ["--backend.name=fsdp", TIED]),
    "zero2-tied": ("zero2", ["--backend.name=deepspeed", DS["zero2"], TIED]),
    "zero3-tied": ("zero3", ["--backend.name=deepspeed", DS["zero3"], TIED]),
}


def overrides(out: Path, data: str) -> list[str]:
    # Odd sizes (vocabulary 261, intermediate 130) so that FSDP's row padding and ZeRO's group padding show.
    return [
        f"--data.path={data}",
        "--data.format=text",
        "--data.max_length=64",
        f"--data.cache_dir={out / 'cache'}",
        "--model.name=tiny-llama",
        '--model.config_overrides={"num_hidden_layers":4,"intermediate_size":130}',
        "--train.micro_batch_size=2",
        "--train.steps=3",
        f"--train.output_dir={out / 'run'}",
        "--lisa.gamma=2",
        "--lisa.interval=2",
        "--logging.progress=false",
        "--logging.level=WARNING",
    ]


def main() -> None:
    out, data = Path(sys.argv[1]), sys.argv[2]
    results = {}
    only = sys.argv[3].split(",") if len(sys.argv) > 3 else list(SETUPS)
    for name, (backend, extra) in ((n, SETUPS[n]) for n in only):
        cfg = load_config(None, overrides(out, data) + extra)
        run = build(cfg)
        for step in range(cfg.train.steps):
            train_step(run, step)
        method = "lisa" if run.sampler else "full"
        setup = Setup.from_config(cfg, backend, run.backend.world_size, run.backend.rank)
        # The shapes from the config alone, as `lisa-dist estimate` sees them, not from the model that trained.
        shapes = shapes_of(preset_config(cfg.model.name, cfg.model.config_overrides), cfg.model.name)
        predicted = estimate(shapes, method, setup, active=run.active)
        results[name] = {
            "measured": run.backend.state_bytes(),
            "predicted": predicted.as_dict(),
            "active": list(run.active),
        }
    (out / f"rank{run.backend.rank}.json").write_text(json.dumps(results, indent=1))
    run.backend.close()


if __name__ == "__main__":
    main()
