"""The optimizer step on SmolLM2-135M's shape: torch AdamW's per-param loop, foreach and fused kernels, and torchao's
8-bit AdamW, over LISA's trained set (tied embedding + final norm + gamma layers) and over every param (full).

    python -m benchmarks.optimizer_step [--repeats 10] [--gamma 2] [--threads 2]

Random gradients, the same for every kernel; medians of --repeats steps after 2 warm-up steps, side by side in one
process. Writes benchmarks/results/<date>_<hardware>_optimizer_step.md and .json.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks import harness
from benchmarks.methods import SIZES
from lisa_dist.config import OptimConfig
from lisa_dist.method import build_adamw, lisa_trainable
from lisa_dist.models import build_preset, find_layout

KERNELS = {
    "for_loop": {"implementation": "for_loop"},
    "foreach": {"implementation": "foreach"},
    "fused": {"implementation": "fused"},
    "8-bit (torchao)": {"adam_8bit": "all"},
}


def time_steps(always, active, kernel: dict, repeats: int) -> float:
    cfg = OptimConfig(lr=1e-4, weight_decay=0.01, **kernel)
    optimizer = build_adamw(always, active, cfg)
    params = [p for _, p in always + active]
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=generator) * 1e-3 for p in params]
    times = []
    for _ in range(repeats + 2):
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    parser = harness.parser(__doc__, "optimizer_step", repeats=10)
    parser.add_argument("--gamma", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = build_preset("tiny-llama", SIZES["smollm2-135m"], seed=0)
    trainable = lisa_trainable(find_layout(model))
    sets = {
        "LISA": (trainable.always, trainable.layer_params(range(args.gamma))),
        "full": (trainable.always, trainable.layer_params(range(len(trainable.layers)))),
    }
    rows, data = [], {}
    for name, (always, active) in sets.items():
        elements = sum(p.numel() for _, p in always + active)
        for p in model.parameters():
            p.requires_grad_(False)
        for _, p in always + active:
            p.requires_grad_(True)
        data[name] = {kernel: time_steps(always, active, cfg, args.repeats) for kernel, cfg in KERNELS.items()}
        loop = data[name]["for_loop"]
        rows += [
            f"| {name} ({elements / 1e6:.1f}M params) | {kernel} | {s * 1e3:.1f} | {loop / s:.2f} |"
            for kernel, s in data[name].items()
        ]
    lines = [
        "# The optimizer step on SmolLM2-135M's shape",
        "",
        f"`python -m benchmarks.optimizer_step --repeats {args.repeats} --gamma {args.gamma} --threads "
        f"{args.threads}`: torch {torch.__version__}, CPU, {args.threads} threads; medians of {args.repeats} "
        "steps after 2 warm-up steps, one run side by side. LISA: the tied embedding, the final norm and "
        f"{args.gamma} layers; optim.implementation=auto picks fused here.",
        "",
        "| trained set | kernel | step (ms) | speed-up over the loop |",
        "| --- | --- | --- | --- |",
        *rows,
    ]
    harness.write_results(args.out, args.name, lines, {"meta": vars(args), "results": data})


if __name__ == "__main__":
    main()
