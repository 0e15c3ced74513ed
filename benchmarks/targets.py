"""The speed targets, as ratios of medians measured side by side in one run, from the JSON the benchmarks wrote.

    python -m benchmarks.targets [--methods methods_smollm2] [--switch switch_scaling]

Reads the newest results named <methods> (benchmarks.methods --size smollm2-135m with full, lora, lisa and
lisa_frozen_emb) and <switch> (benchmarks.switch_scaling); writes benchmarks/results/<date>_<hardware>_targets.md:
each target, its measured ratio and whether it holds. Where one does not, benchmarks.profile_step's result shows
why.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import harness


def main() -> None:
    parser = harness.parser(__doc__, "targets")
    parser.add_argument("--methods", default="methods_smollm2", help="a result name in --out, or a JSON file")
    parser.add_argument("--switch", default="switch_scaling", help="a result name in --out, or a JSON file")
    args = parser.parse_args()
    methods_file, switch_file = (source(name, args.out) for name in (args.methods, args.switch))
    methods = json.loads(methods_file.read_text())
    r, meta = methods["results"], methods["meta"]
    step = {m: r[m]["median_step_s"] for m in r}
    tps = {m: r[m]["tokens_per_s"] for m in r}
    lisa_full = step["lisa"] / step["full"]
    rows = [
        ("LISA's step / full fine-tuning's", lisa_full, "<= 0.60", lisa_full <= 0.60),
        (
            "LISA's tokens/s / LoRA's (embeddings trained, the paper's)",
            tps["lisa"] / tps["lora"],
            ">= 1.00",
            tps["lisa"] / tps["lora"] >= 1.0,
        ),
        (
            "LISA's tokens/s / LoRA's, lisa.train_embeddings=false",
            tps["lisa_frozen_emb"] / tps["lora"],
            ">= 1.20",
            tps["lisa_frozen_emb"] / tps["lora"] >= 1.2,
        ),
    ]
    switch = json.loads(switch_file.read_text())
    for backend, sizes in switch["results"].items():
        largest = max(sizes.values(), key=lambda x: x["params"])
        ratio = largest["switch_s"] / (20 * largest["step_s"])
        rows.append(
            (
                f"{backend}: switch / K=20 period at {largest['params'] / 1e6:.0f}M params",
                ratio,
                "<= 0.01",
                ratio <= 0.01,
            )
        )
    lines = [
        "# Speed targets",
        "",
        f"From `{methods_file.name}` (`python -m benchmarks.methods --size {meta['size']} "
        f"--seq-len {meta['seq_len']} "
        f"--micro-batch {meta['micro_batch']} --steps {meta['steps']} --methods {' '.join(r)} --name "
        f"{meta.get('name', args.methods)}`: local backend, {meta['precision']}, {meta['threads']} threads, "
        f"LISA gamma {meta['gamma']}, K {meta['interval']}, layers sampled) and `{switch_file.name}` "
        "(benchmarks/switch_scaling.py, 2 ranks).",
        "",
        "| | full | LoRA r 8 | LISA | LISA, train_embeddings=false |",
        "| --- | --- | --- | --- | --- |",
        "| median step (s) | "
        + " | ".join(f"{step[m]:.3f}" for m in ("full", "lora", "lisa", "lisa_frozen_emb"))
        + " |",
        "| tokens/s (median) | "
        + " | ".join(f"{tps[m]:.0f}" for m in ("full", "lora", "lisa", "lisa_frozen_emb"))
        + " |",
        "",
        "| target | measured | wanted | holds |",
        "| --- | --- | --- | --- |",
        *(f"| {name} | {value:.3f} | {want} | {'yes' if ok else 'no'} |" for name, value, want, ok in rows),
    ]
    harness.write_results(
        args.out,
        args.name,
        lines,
        {"rows": [{"target": n, "measured": v, "wanted": w, "holds": ok} for n, v, w, ok in rows]},
    )


def source(name: str, out: Path) -> Path:
    """`name`'s newest result in `out`, or `name` itself when it is a file."""
    found = Path(name) if Path(name).is_file() else harness.latest(name, out)
    if found is None:
        raise SystemExit(f"targets: no result named {name!r} in {out} (run its benchmark first)")
    return found


if __name__ == "__main__":
    main()
