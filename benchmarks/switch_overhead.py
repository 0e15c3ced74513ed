"""LISA against full-parameter fine-tuning on each distributed backend, side by side in one torchrun job.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.switch_overhead [--steps 30] [--backends fsdp zero2 ...]

Per backend, medians over the measured steps: step time without switches (LISA and full, and their ratio), the
time of a LISA switch (FSDP: flip requires_grad and swap optimizer groups; DeepSpeed: rebuild the engine and its ZeRO
partitions), the bytes rank 0 holds (params, grads, fp32 masters, Adam moments) and the bytes it hands to gradient
reductions per step (reduce-scatter, all-reduce, reduce; counted through torch.distributed by benchmarks.lib.comm)
against the fraction of params that trains. Writes <name>.json and <name>.md (--name, default switch_overhead).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.lib import count_collectives
from lisa_dist.config import load_config
from lisa_dist.run import build, train_step

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "lisa_dist" / "assets" / "demo_alpaca.jsonl"
BACKENDS = {
    "fsdp": ["--backend.name=fsdp"],
    **{
        f"zero{s}": ["--backend.name=deepspeed", f"--backend.ds_config={REPO / 'ds_configs' / f'zero{s}.json'}"]
        for s in (1, 2, 3)
    },
}
INTERVAL = 5
MODEL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 8}  # on the tiny-llama preset


def _synchronize(run) -> None:
    if run.backend.device.type == "cuda":
        torch.cuda.synchronize(run.backend.device)


def measure(overrides: list[str], steps: int) -> dict:
    cfg = load_config(None, [*overrides, f"--train.steps={steps}"])
    run = build(cfg)
    step_s, switch_s, state, traffic, gathered = [], [], [], [], []
    for step in range(steps):
        _synchronize(run)  # a GPU's queued work belongs to the step that queued it
        start = time.perf_counter()
        with count_collectives() as comm:
            record = train_step(run, step)
        _synchronize(run)
        elapsed = time.perf_counter() - start
        state.append(record["optimizer_state_bytes"])
        if record["switched"] and step > 0:
            switch_s.append(record["switch_s"])
        if step >= 2:  # warm-up
            step_s.append(elapsed - record["switch_s"])
        if not record["switched"]:  # DeepSpeed's rebuild broadcasts and gathers: not gradient traffic
            traffic.append(sum(comm.bytes.get(k, 0) for k in ("reduce_scatter", "all_reduce", "reduce")))
            gathered.append(comm.bytes.get("all_gather", 0))
    params = run.trainable.num_params(range(len(run.trainable.layers)))
    return {
        "step_s": statistics.median(step_s),
        "switch_s": statistics.median(switch_s) if switch_s else None,
        "max_state_bytes": max(state),
        "state": run.backend.state_bytes(),
        "rank": run.backend.rank,
        "world": run.backend.world_size,
        "params": params,
        "comm_bytes": statistics.median(traffic),
        "all_gather_bytes": statistics.median(gathered),
        "active_fraction": run.trainable.num_params(run.active) / params,
    }


def row(name: str, lisa: dict, full: dict) -> str:
    return (
        f"| {name} | {lisa['step_s']:.4f} | {full['step_s']:.4f} | {lisa['step_s'] / full['step_s']:.2f} | "
        f"{lisa['switch_s']:.4f} | {lisa['switch_s'] / (INTERVAL * lisa['step_s']):.3f} | "
        f"{lisa['max_state_bytes']:,} | {full['max_state_bytes']:,} | "
        f"{lisa['max_state_bytes'] / full['max_state_bytes']:.2f} |"
    )


def main() -> None:
    parser = harness.parser(__doc__, "switch_overhead")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    args = parser.parse_args()
    base = [
        f"--data.path={DATA}",
        "--data.format=alpaca",
        "--data.max_length=512",
        "--data.skip_bad_rows=true",
        f"--model.config_overrides={json.dumps(MODEL)}",
        "--train.micro_batch_size=4",
        "--logging.progress=false",
        "--logging.level=WARNING",
        "--logging.log_every=1",
        "--checkpoint.save_final=false",
        "--train.output_dir=runs/bench_switch",
        "--lisa.gamma=2",
        f"--lisa.interval={INTERVAL}",
    ]
    results = {}
    for name in args.backends:
        lisa = measure(base + BACKENDS[name], args.steps)
        full = measure(base + BACKENDS[name] + ["--lisa.enabled=false"], args.steps)
        results[name] = {"lisa": lisa, "full": full}
    first = next(iter(results.values()))["lisa"]
    if first["rank"] != 0:
        return
    meta = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads_per_rank": torch.get_num_threads(),
        "steps": args.steps,
        "world": first["world"],
        "params": first["params"],
        "interval": INTERVAL,
        "model": MODEL,
    }
    lines = [
        f"# LISA vs full fine-tuning per backend ({first['world']} ranks, {first['params'] / 1e6:.1f}M params)",
        "",
        f"torch {meta['torch']}, {meta['machine']} CPU, {meta['threads_per_rank']} thread per rank, gloo; "
        f"{args.steps} steps each, medians after 2 warm-up steps; LISA gamma 2 of 8 layers, K = {INTERVAL}.",
        "",
        "| backend | LISA step (s) | full step (s) | ratio | switch (s) | switch / K-step period | "
        "LISA Adam bytes rank 0 | full Adam bytes rank 0 | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(row(name, r["lisa"], r["full"]) for name, r in results.items()),
    ]
    harness.write_results(args.out, args.name, lines, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
