"""The cost of a LISA switch against model size, per backend (FSDP2, ZeRO-1/2/3), on 2 ranks, with DeepSpeed's
rebuild broken into its parts, and a projection to 7B and 70B.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.switch_scaling [--sizes 5m 34m 135m 370m]
        [--backends fsdp zero1 zero2 zero3] [--steps 6] [--merge]

Per backend and size: Llama-shaped random models (the tiny-llama preset), LISA gamma 2, a switch every 2 steps
(the first activation, then one switch per 2 steps), micro-batch 1 x 128 tokens, fp32, gloo. Measured: the switch
(the trainer's switch_s: FSDP flips requires_grad, swaps the optimizer's layer groups and re-runs its lazy init for
the changed units; DeepSpeed rebuilds the engine: carry the always-trained masters out, destroy, collect, set
requires_grad, initialize, which flattens and partitions, carry back in) and the median step without a switch. The
fraction is the switch over a K = 20 period of such steps. Medians of the switches after the first activation.
The projection fits switch seconds = a + b x params (least squares over the sizes measured) per backend. Writes
benchmarks/results/<date>_<hardware>_switch_scaling.md and .json (rank 0).
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.methods import SIZES as METHOD_SIZES
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
SIZES = {
    "5m": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 8},
    "34m": {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 8192,
    },
    "135m": METHOD_SIZES["smollm2-135m"],  # SmolLM2-135M's shape, as benchmarks.methods sizes it
    "370m": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 64,
        "vocab_size": 32000,
    },
}
TARGETS = {"7B": 6.74e9, "70B": 69.0e9}
INTERVAL, PERIOD = 2, 20


FLATTEN = {"flatten": 0.0}


def time_flattening() -> None:
    """Add to FLATTEN the seconds ZeRO spends flattening params into its group buffers (inside initialize):
    ZeRO-1/2's flatten_dense_tensors_aligned, ZeRO-3's fp16 partition defragmentation."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for cls, name in (
        (DeepSpeedZeroOptimizer, "flatten_dense_tensors_aligned"),
        (DeepSpeedZeroOptimizer_Stage3, "_create_fp16_partitions_with_defragmentation"),
    ):
        original = getattr(cls, name)

        def timed(*args, _original=original, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                FLATTEN["flatten"] += time.perf_counter() - start

        setattr(cls, name, timed)


def _synchronize(run) -> None:
    if run.backend.device.type == "cuda":
        torch.cuda.synchronize(run.backend.device)


def measure(backend: str, size: str, steps: int) -> dict:
    cfg = load_config(
        None,
        [
            f"--data.path={DATA}",
            "--data.format=text",
            "--data.text_field=output",
            "--data.max_length=128",
            "--model.name=tiny-llama",
            f"--model.config_overrides={json.dumps(SIZES[size])}",
            "--train.micro_batch_size=1",
            f"--train.steps={steps}",
            "--logging.progress=false",
            "--logging.level=WARNING",
            "--logging.log_every=1",
            "--checkpoint.save_final=false",
            f"--train.output_dir={REPO / 'runs' / 'bench_switch_scaling'}",
            "--train.overwrite=true",
            "--lisa.gamma=2",
            f"--lisa.interval={INTERVAL}",
            *BACKENDS[backend],
        ],
    )
    run = build(cfg)
    switches, plain, phases = [], [], []
    flattened_before = FLATTEN["flatten"]
    for step in range(steps):
        _synchronize(run)  # a GPU's queued work belongs to the step that queued it
        start = time.perf_counter()
        record = train_step(run, step)
        _synchronize(run)
        elapsed = time.perf_counter() - start
        if record["switched"] and step > 0:
            switches.append(record["switch_s"])
            phases.append(dict(getattr(run.backend, "switch_phases", {})))
            if backend.startswith("zero"):  # of initialize, the part that flattened
                phases[-1]["initialize: of which flatten"] = FLATTEN["flatten"] - flattened_before
        elif not record["switched"]:
            plain.append(elapsed)
        flattened_before = FLATTEN["flatten"]
    params = sum(getattr(p, "ds_numel", p.numel()) for p in run.layout.model.parameters())
    # The next measurement reuses the process group; DeepSpeed's backend froze the objects alive at its start out
    # of the collector (a run of lisa_dist builds one backend): let the collector see them again.
    gc.unfreeze()
    gc.collect()
    names = sorted({k for p in phases for k in p})
    return {
        "params": params,
        "switch_s": statistics.median(switches),
        "step_s": statistics.median(plain),
        "phases": {k: statistics.median(p.get(k, 0.0) for p in phases) for k in names},
        "rank": run.backend.rank,
        "world": run.backend.world_size,
    }


def fit(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Least squares seconds = a + b x params; returns (a, b, r2)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in points)
    ss_tot = sum((y - my) ** 2 for _, y in points)
    return a, b, 1 - ss_res / ss_tot if ss_tot else 1.0


def main() -> None:
    parser = harness.parser(__doc__, "switch_scaling")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add these backends to the newest switch_scaling result's (one launch per "
        "backend keeps each launch's memory its own: ZeRO-3 at 370M after the others ran out)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if any(b.startswith("zero") for b in args.backends):
        time_flattening()
    results: dict[str, dict[str, dict]] = {}
    for size in args.sizes:
        for backend in args.backends:
            results.setdefault(backend, {})[size] = r = measure(backend, size, args.steps)
            if r["rank"] == 0:
                print(
                    f"{backend:6s} {size:5s} {r['params'] / 1e6:7.1f}M switch {r['switch_s']:.3f} s step "
                    f"{r['step_s']:.3f} s {r['phases']}",
                    flush=True,
                )
    first = results[args.backends[0]][args.sizes[0]]
    if first["rank"] != 0:
        return
    saved = harness.read_latest(args.name, args.out) if args.merge else None
    commands = saved["meta"].get("commands", []) if saved else []
    if saved:
        results = {**saved["results"], **results}
    commands.append(
        "`torchrun --standalone --nproc-per-node 2 -m benchmarks.switch_scaling --sizes "
        f"{' '.join(args.sizes)} --backends {' '.join(args.backends)} --steps {args.steps}"
        f"{' --merge' if args.merge else ''}`"
    )
    command = ", then ".join(commands)
    lines = [
        "# The LISA switch against model size (2 ranks)",
        "",
        f"{command}: torch {torch.__version__}, {platform.machine()} CPU, 1 thread per rank, gloo, fp32; LISA "
        f"gamma 2, a switch every {INTERVAL} steps, micro-batch 1 x 128 tokens; medians of "
        f"{max(0, (args.steps - 1) // INTERVAL)} switches and {args.steps // 2} plain steps. Fraction: the "
        f"switch over a K = {PERIOD} period of plain steps.",
        "",
        "| backend | params | switch (s) | plain step (s) | switch / K=20 period |",
        "| --- | --- | --- | --- | --- |",
    ]
    for backend, sizes in results.items():
        for r in sizes.values():
            lines.append(
                f"| {backend} | {r['params'] / 1e6:,.1f}M | {r['switch_s']:.3f} | {r['step_s']:.3f} | "
                f"{r['switch_s'] / (PERIOD * r['step_s']):.4f} |"
            )
    ds = [b for b in results if b.startswith("zero")]
    if ds:
        names = sorted({k for b in ds for r in results[b].values() for k in r["phases"]})
        lines += [
            "",
            "DeepSpeed's rebuild, seconds per part (medians):",
            "",
            "| backend | params | " + " | ".join(names) + " |",
            "| --- | --- |" + " --- |" * len(names),
        ]
        for b in ds:
            for r in results[b].values():
                lines.append(
                    f"| {b} | {r['params'] / 1e6:,.1f}M | "
                    + " | ".join(f"{r['phases'].get(k, 0.0):.3f}" for k in names)
                    + " |"
                )
    lines += [
        "",
        "Projection (least squares, switch s = a + b x params, over the sizes above):",
        "",
        "| backend | a (s) | b (s per 1B params) | R^2 | 7B (s) | 70B (s) | largest measured x 7B / x 70B |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    projection = {}
    for backend, sizes in results.items():
        points = [(r["params"], r["switch_s"]) for r in sizes.values()]
        a, b, r2 = fit(points)
        largest = max(x for x, _ in points)
        projection[backend] = {"a": a, "b": b, "r2": r2, **{k: a + b * v for k, v in TARGETS.items()}}
        lines.append(
            f"| {backend} | {a:.3f} | {b * 1e9:.3f} | {r2:.3f} | {a + b * TARGETS['7B']:.2f} | "
            f"{a + b * TARGETS['70B']:.1f} | {TARGETS['7B'] / largest:.0f} / {TARGETS['70B'] / largest:.0f} |"
        )
    meta = {**vars(args), "torch": torch.__version__, "sizes": SIZES, "commands": commands}
    harness.write_results(args.out, args.name, lines, {"meta": meta, "results": results, "projection": projection})


if __name__ == "__main__":
    main()
