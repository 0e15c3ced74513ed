"""Checkpoint size and save/resume time of the demo model per backend, in one torchrun job (local: --backends local,
run without torchrun).

    torchrun --standalone --nproc-per-node 2 benchmarks/checkpoint_cost.py [--backends fsdp zero2 zero3]
    python benchmarks/checkpoint_cost.py --backends local

Medians of 3 saves and 3 resumes (a fresh build that loads the newest checkpoint). Writes checkpoint_cost.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch.distributed as dist

from lisa_dist.config import load_config
from lisa_dist.resume import save
from lisa_dist.trainer import build, train_step

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "lisa_dist" / "assets" / "demo_alpaca.jsonl"
BACKENDS = {
    "local": ["--backend.name=local"],
    "fsdp": ["--backend.name=fsdp"],
    **{f"zero{s}": ["--backend.name=deepspeed", f"--backend.ds_config={REPO / 'ds_configs' / f'zero{s}.json'}"]
       for s in (2, 3)},
}


def measure(name: str, out: Path) -> dict:
    base = [f"--data.path={DATA}", "--data.format=alpaca", "--data.max_length=512", "--data.skip_bad_rows=true",
            "--model.preset_overrides={hidden_size: 128, intermediate_size: 256, num_hidden_layers: 8}",
            "--train.micro_batch_size=4", "--logging.progress=false", "--logging.level=WARNING",
            f"--train.output_dir={out / name}", "--checkpoint.keep_last=1", "--lisa.gamma=2", *BACKENDS[name]]
    run = build(load_config(None, base))
    train_step(run, 0)
    saves, folder = [], None
    for _ in range(3):
        start = time.perf_counter()
        folder = save(run, 1)
        saves.append(time.perf_counter() - start)
    loads = []
    for _ in range(3):
        start = time.perf_counter()
        resumed = build(load_config(None, base))
        loads.append(time.perf_counter() - start)
        assert resumed.start_step == 1
    size = None
    if run.backend.is_main:
        size = sum(e["bytes"] for e in json.loads((folder / "manifest.json").read_text())["files"].values())
    return {"save_s": statistics.median(saves), "resume_build_s": statistics.median(loads), "bytes": size,
            "world": run.backend.world_size, "main": run.backend.is_main}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["fsdp", "zero2", "zero3"], choices=list(BACKENDS))
    parser.add_argument("--work", default="runs/bench_ckpt")
    args = parser.parse_args()
    results = {name: measure(name, Path(args.work)) for name in args.backends}
    if not next(iter(results.values()))["main"]:
        return
    lines = ["| backend | ranks | checkpoint bytes | save (s) | build + resume (s) |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {r['world']} | {r['bytes']:,} | {r['save_s']:.3f} | {r['resume_build_s']:.2f} |"
              for n, r in results.items()]
    print("\n".join(lines))
    results_dir = REPO / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"checkpoint_cost_{'_'.join(args.backends)}.md").write_text("\n".join(lines) + "\n")
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
