"""The speed targets, as ratios of medians measured side by side in one run, from the JSON the benchmarks wrote.

    python benchmarks/targets.py [--methods methods_smollm2.json] [--switch switch_scaling.json]

Reads benchmarks/results/<methods> (benchmarks/methods.py --size smollm2-135m with full, lora, lisa and
lisa_frozen_emb) and <switch> (benchmarks/switch_scaling.py); writes benchmarks/results/targets.md: each target,
its measured ratio and whether it holds. Where one does not, benchmarks/results/profile.md shows why.
"""
from __future__ import annotations

import argparse
import json

from results_io import RESULTS, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="methods_smollm2.json")
    parser.add_argument("--switch", default="switch_scaling.json")
    args = parser.parse_args()
    methods = json.loads((RESULTS / args.methods).read_text())
    r, meta = methods["results"], methods["meta"]
    step = {m: r[m]["median_step_s"] for m in r}
    tps = {m: r[m]["tokens_per_s"] for m in r}
    lisa_full = step["lisa"] / step["full"]
    rows = [
        ("LISA's step / full fine-tuning's", lisa_full, "<= 0.60", lisa_full <= 0.60),
        ("LISA's tokens/s / LoRA's (embeddings trained, the paper's)", tps["lisa"] / tps["lora"], ">= 1.00",
         tps["lisa"] / tps["lora"] >= 1.0),
        ("LISA's tokens/s / LoRA's, lisa.train_embeddings=false", tps["lisa_frozen_emb"] / tps["lora"], ">= 1.20",
         tps["lisa_frozen_emb"] / tps["lora"] >= 1.2),
    ]
    switch = json.loads((RESULTS / args.switch).read_text())
    for backend, sizes in switch["results"].items():
        largest = max(sizes.values(), key=lambda x: x["params"])
        ratio = largest["switch_s"] / (20 * largest["step_s"])
        rows.append((f"{backend}: switch / K=20 period at {largest['params'] / 1e6:.0f}M params", ratio, "<= 0.01",
                     ratio <= 0.01))
    lines = ["# Speed targets", "",
             f"From `{args.methods}` (`python benchmarks/methods.py --size {meta['size']} --seq-len {meta['seq_len']} "
             f"--micro-batch {meta['micro_batch']} --steps {meta['steps']} --methods {' '.join(r)} --name "
             f"{args.methods.removesuffix('.json')}`: local backend, {meta['precision']}, {meta['threads']} threads, "
             f"LISA gamma {meta['gamma']}, K {meta['interval']}, layers sampled) and `{args.switch}` "
             "(benchmarks/switch_scaling.py, 2 ranks).", "",
             "| | full | LoRA r 8 | LISA | LISA, train_embeddings=false |", "| --- | --- | --- | --- | --- |",
             "| median step (s) | " + " | ".join(f"{step[m]:.3f}" for m in ("full", "lora", "lisa", "lisa_frozen_emb"))
             + " |",
             "| tokens/s (median) | " + " | ".join(f"{tps[m]:.0f}" for m in ("full", "lora", "lisa", "lisa_frozen_emb"))
             + " |", "",
             "| target | measured | wanted | holds |", "| --- | --- | --- | --- |",
             *(f"| {name} | {value:.3f} | {want} | {'yes' if ok else 'no'} |" for name, value, want, ok in rows)]
    write_results("targets", lines, {"rows": [{"target": n, "measured": v, "wanted": w, "holds": ok}
                                              for n, v, w, ok in rows]})


if __name__ == "__main__":
    main()
