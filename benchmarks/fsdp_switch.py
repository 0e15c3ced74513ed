"""LISA on FSDP2 against full-parameter FSDP fine-tuning of the same model, in one torchrun job.

    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_switch.py [--steps 30] [--out benchmarks/results]

Reports medians over the measured steps: step time without switches (LISA and full, and their ratio), the time
of a LISA switch, and the Adam-moment bytes each rank holds. Writes fsdp_switch.json and fsdp_switch.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lisa_dist.config import load_config
from lisa_dist.trainer import build, train_step

DATA = Path(__file__).resolve().parents[1] / "lisa_dist" / "assets" / "demo_alpaca.jsonl"


def measure(overrides: list[str], steps: int) -> dict:
    cfg = load_config(None, overrides + [f"--train.steps={steps}"])
    run = build(cfg)
    step_s, switch_s, state = [], [], []
    for step in range(steps):
        start = time.perf_counter()
        record = train_step(run, step)
        elapsed = time.perf_counter() - start
        state.append(record["optimizer_state_bytes"])
        if record["switched"]:
            switch_s.append(record["switch_s"])
        if step >= 2:  # warm-up
            step_s.append(elapsed - record["switch_s"])
    return {"step_s": statistics.median(step_s), "switch_s": statistics.median(switch_s) if switch_s else None,
            "max_state_bytes": max(state), "rank": run.backend.rank, "world": run.backend.world_size,
            "params": sum(p.numel() for p in run.backend.model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    base = [f"--data.path={DATA}", "--data.format=alpaca", "--data.max_length=512", "--data.skip_bad_rows=true",
            "--model.preset_overrides={hidden_size: 256, intermediate_size: 768, num_hidden_layers: 8}",
            "--backend.name=fsdp", "--train.micro_batch_size=4", "--logging.progress=false",
            "--train.output_dir=runs/bench_fsdp", "--lisa.gamma=2", "--lisa.interval=5"]
    lisa = measure(base, args.steps)
    full = measure(base + ["--lisa.enabled=false"], args.steps)
    if lisa["rank"] != 0:
        return
    result = {"lisa": lisa, "full": full, "step_time_ratio": lisa["step_s"] / full["step_s"],
              "state_ratio": lisa["max_state_bytes"] / full["max_state_bytes"],
              "torch": torch.__version__, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads/rank"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fsdp_switch.json").write_text(json.dumps(result, indent=2))
    (out / "fsdp_switch.md").write_text(
        f"# LISA vs full fine-tuning on FSDP2 ({lisa['world']} ranks, {lisa['params'] / 1e6:.1f}M params)\n\n"
        f"torch {result['torch']}, {result['machine']}, {args.steps} steps each, medians after 2 warm-up steps.\n\n"
        "| | LISA (gamma 2 of 8, K 5) | full | ratio |\n| --- | --- | --- | --- |\n"
        f"| step time without switch (s) | {lisa['step_s']:.4f} | {full['step_s']:.4f} | "
        f"{result['step_time_ratio']:.2f} |\n"
        f"| Adam moment bytes on rank 0 (max) | {lisa['max_state_bytes']:,} | {full['max_state_bytes']:,} | "
        f"{result['state_ratio']:.2f} |\n"
        f"| switch time (s) | {lisa['switch_s']:.4f} | - | "
        f"{lisa['switch_s'] / (5 * lisa['step_s']):.3f} of a 5-step period |\n")
    print((out / "fsdp_switch.md").read_text())


if __name__ == "__main__":
    main()
