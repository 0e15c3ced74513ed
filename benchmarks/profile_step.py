"""Where a training step's time goes: full fine-tuning, LoRA and LISA (the paper's trained embeddings, and
lisa.train_embeddings=false) on SmolLM2-135M's shape, under torch.profiler.

    python -m benchmarks.profile_step [--steps 4] [--seq-len 256] [--micro-batch 4] [--threads 2] [--layers 9 20]

Per method, the model and data of benchmarks/methods.py (local backend, fp32), LISA's two layers fixed (--layers,
so that every profiled step is alike), one method after the other in one process. Module hooks stamp the phases
of every profiled step: forward (embedding, blocks, head), the loss and head's backward, each block's backward
(from its output gradient to the next one's), the embedding's backward, the optimizer step (clipping included)
and the switch; torch.profiler gives the top operators by self CPU time. Medians over the steps after the first.
Writes benchmarks/results/<date>_<hardware>_profile.md and .json.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks import harness
from benchmarks.methods import SIZES, overrides
from lisa_dist.config import load_config
from lisa_dist.run import build, train_step

METHODS = {
    "full": "full fine-tuning",
    "lora": "LoRA r 8",
    "lisa": "LISA gamma 2 (embeddings trained)",
    "lisa_frozen_emb": "LISA gamma 2, lisa.train_embeddings=false",
}


class Stamps:
    """perf_counter stamps from module hooks: forward start/end, and the moment each module's output gradient is
    ready (its backward starts)."""

    def __init__(self, layout) -> None:
        self.t: dict[str, float] = {}
        model = layout.model
        head = model.get_output_embeddings()
        self._hook(layout.embedding, "embedding")
        for i, block in enumerate(layout.layers):
            self._hook(block, f"block{i}")
        self._hook(head, "head")
        self.num_layers = len(layout.layers)

    def _hook(self, module, name: str) -> None:
        def stamp(key: str):
            def hook(*_) -> None:  # returns None: the hooks must not replace inputs, outputs or gradients
                self.t[key] = time.perf_counter()

            return hook

        module.register_forward_pre_hook(stamp(f"{name}.fwd0"))
        module.register_forward_hook(stamp(f"{name}.fwd1"))
        module.register_full_backward_pre_hook(stamp(f"{name}.bwd"))

    def phases(self, end: float) -> dict[str, float]:
        """Seconds per phase of the micro-batch that ended at `end`."""
        t, n_layers = self.t, self.num_layers
        out = {
            "forward": t["head.fwd1"] - t["embedding.fwd0"],
            "forward.embedding": t["embedding.fwd1"] - t["embedding.fwd0"],
            "forward.blocks": t[f"block{n_layers - 1}.fwd1"] - t["block0.fwd0"],
            "forward.head": t["head.fwd1"] - t["head.fwd0"],
        }
        # Backward runs from the top: the loss and head first, then block n_layers-1, ..., the lowest that needs it.
        starts = [(f"block{i}", t[f"block{i}.bwd"]) for i in reversed(range(n_layers)) if f"block{i}.bwd" in t]
        if "embedding.bwd" in t:
            starts.append(("embedding", t["embedding.bwd"]))
        out["backward.loss_and_head"] = (starts[0][1] if starts else end) - t["head.fwd1"]
        for (name, start), nxt in zip(starts, [s for _, s in starts[1:]] + [end], strict=True):
            out[f"backward.{name}"] = nxt - start
        for i in range(n_layers):
            out.setdefault(f"backward.block{i}", 0.0)
        return out


def profile_method(method: str, args) -> dict:
    torch.set_num_threads(args.threads)
    fixed = ["--lisa.strategy=fixed", f"--lisa.fixed_layers={json.dumps(args.layers)}"]
    cfg = load_config(None, overrides(method, args) + (fixed if method.startswith("lisa") else []))
    run = build(cfg)
    stamps = Stamps(run.layout)
    backend = run.backend
    phases: list[dict[str, float]] = []
    forward_backward, step, activate = backend.forward_backward, backend.step, backend.activate

    def timed_forward_backward(batch, scale):
        stamps.t.clear()
        with record_function("lisa.forward_backward"):
            out = forward_backward(batch, scale)
        phases[-1].setdefault("micro", []).append(stamps.phases(time.perf_counter()))
        return out

    def timed(name, fn):
        def call(*a, **k):
            start = time.perf_counter()
            with record_function(f"lisa.{name}"):
                out = fn(*a, **k)
            phases[-1][name] = phases[-1].get(name, 0.0) + time.perf_counter() - start
            return out

        return call

    backend.forward_backward = timed_forward_backward
    backend.step, backend.activate = timed("optimizer", step), timed("switch", activate)
    steps, prof = [], None
    for i in range(args.steps):
        phases.append({})
        start = time.perf_counter()
        if i == args.steps - 1:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                train_step(run, i)
        else:
            train_step(run, i)
        phases[-1]["step"] = time.perf_counter() - start
        steps.append(phases[-1])
    measured = steps[1:]
    summary = defaultdict(list)
    for s in measured:
        merged = defaultdict(float)
        for micro in s.get("micro", []):
            for k, v in micro.items():
                merged[k] += v
        for k, v in {
            **merged,
            "optimizer": s.get("optimizer", 0.0),
            "switch": s.get("switch", 0.0),
            "step": s["step"],
        }.items():
            summary[k].append(v)
    medians = {k: statistics.median(v) for k, v in summary.items()}
    switches = [s["switch"] for s in measured if s.get("switch")]
    medians["switch_when_switching"] = statistics.median(switches) if switches else 0.0
    table = prof.key_averages()
    top = sorted(table, key=lambda e: e.self_cpu_time_total, reverse=True)
    top = [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
        for e in top
        if not e.key.startswith("lisa.")
    ][: args.top]
    return {"phases": medians, "top": top, "active": list(run.active)}


def main() -> None:
    parser = harness.parser(__doc__, "profile")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[9, 20],
        help="LISA's active layers (fixed, so every profiled step is alike; 9 is about the expected "
        "lowest of 2 layers drawn from 30)",
    )
    args = parser.parse_args()
    # methods.overrides' other fields
    args.size, args.device, args.precision, args.activation_checkpointing = "smollm2-135m", "cpu", "fp32", False
    results = {m: profile_method(m, args) for m in args.methods}
    n_layers = SIZES["smollm2-135m"]["num_hidden_layers"]
    cols = list(results)
    lines = [
        "# Where the step's time goes, SmolLM2-135M's shape",
        "",
        f"`python -m benchmarks.profile_step --steps {args.steps} --seq-len {args.seq_len} --micro-batch "
        f"{args.micro_batch} --threads {args.threads} --layers {' '.join(map(str, args.layers))}`: "
        f"torch {torch.__version__}, CPU, {args.threads} threads, "
        f"local backend, fp32, {args.micro_batch} x {args.seq_len} tokens a step; medians "
        f"(ms) of {args.steps - 1} steps after the first. LISA's active layers fixed at {args.layers} "
        "(lisa.strategy=fixed).",
        "",
        "| phase | " + " | ".join(METHODS[m] for m in cols) + " |",
        "| --- |" + " --- |" * len(cols),
    ]

    def row(label, key_fn):
        lines.append(f"| {label} | " + " | ".join(f"{key_fn(results[m]['phases']) * 1e3:,.0f}" for m in cols) + " |")

    row("whole step", lambda p: p["step"])
    row("forward", lambda p: p["forward"])
    row("  of which the head (logits)", lambda p: p["forward.head"])
    row("backward: loss and head", lambda p: p["backward.loss_and_head"])
    row("backward: all blocks", lambda p: sum(p[f"backward.block{i}"] for i in range(n_layers)))
    row(
        "backward: blocks with no gradient (0 ms)",
        lambda p: sum(p[f"backward.block{i}"] == 0 for i in range(n_layers)) / 1e3,
    )
    row("backward: embedding", lambda p: p.get("backward.embedding", 0.0))
    row("optimizer step (clipping included)", lambda p: p["optimizer"])
    row("switch (steps that switch)", lambda p: p["switch_when_switching"])
    lines += [
        "",
        "(The blocks-with-no-gradient row is a count, not ms.)",
        "",
        "Backward per block (ms), block 0 first:",
        "",
    ]
    for m in cols:
        p = results[m]["phases"]
        lines.append(f"- {METHODS[m]}: " + ", ".join(f"{p[f'backward.block{i}'] * 1e3:.0f}" for i in range(n_layers)))
    lines += ["", f"Top {args.top} operators by self CPU time in the last step (torch.profiler):", ""]
    for m in cols:
        lines.append(
            f"- {METHODS[m]}: "
            + "; ".join(f"{t['op']} {t['self_ms']:,.0f} ms ({t['calls']})" for t in results[m]["top"])
        )
    harness.write_results(args.out, args.name, lines, {"meta": vars(args), "results": results})


if __name__ == "__main__":
    main()
