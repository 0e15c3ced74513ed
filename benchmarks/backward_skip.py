"""Step time against the lowest active layer, with the paper's trained embeddings and with lisa.train_embeddings=false.

    python -m benchmarks.backward_skip [--layers 12] [--steps 4] [--ac]

With frozen embeddings no layer below the lowest active one needs a gradient, so autograd stops there
(`tests/unit/test_backward_skip.py` checks that it does): the backward shrinks with the lowest active layer's
index. One active layer (lisa.strategy=fixed) at several depths, a Llama of --layers blocks (width 256, vocabulary
8,192), 4 x 256 tokens, local backend, fp32, 2 threads; medians of the steps after the first, one run side by side.
Writes benchmarks/results/<date>_<hardware>_backward_skip[_ac].md and .json.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks import harness
from lisa_dist.config import load_config
from lisa_dist.run import build, train_step

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "lisa_dist" / "assets" / "demo_alpaca.jsonl"


def step_time(layer: int, train_embeddings: bool, args, out: Path) -> float:
    cfg = load_config(
        None,
        [
            f"--data.path={DATA}",
            "--data.format=alpaca",
            "--data.max_length=256",
            "--data.skip_bad_rows=true",
            f"--data.cache_dir={out / 'cache'}",
            "--model.name=tiny-llama",
            f'--model.config_overrides={{"num_hidden_layers":{args.layers},"hidden_size":256,"intermediate_size":688,'
            '"vocab_size":8192}',
            "--train.micro_batch_size=4",
            f"--train.steps={args.steps}",
            "--lisa.gamma=1",
            "--lisa.strategy=fixed",
            f"--lisa.fixed_layers=[{layer}]",
            f"--lisa.train_embeddings={str(train_embeddings).lower()}",
            f"--train.activation_checkpointing={str(args.ac).lower()}",
            f"--train.output_dir={out / 'run'}",
            "--train.overwrite=true",
            "--logging.progress=false",
        ],
    )
    run = build(cfg)
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        train_step(run, step)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = harness.parser(__doc__, "backward_skip")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ac", action="store_true", help="activation checkpointing")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = REPO / "runs" / "bench_backward_skip"
    depths = sorted({0, args.layers // 4, args.layers // 2, 3 * args.layers // 4, args.layers - 1})
    rows = []
    for layer in depths:
        trained, frozen = step_time(layer, True, args, out), step_time(layer, False, args, out)
        rows.append({"lowest_active": layer, "train_embeddings": trained, "frozen_embeddings": frozen})
    lines = [
        f"# Step time against the lowest active layer ({args.layers} layers, gamma 1)",
        "",
        f"`python -m benchmarks.backward_skip --layers {args.layers} --steps {args.steps}"
        f"{' --ac' if args.ac else ''}`: width 256, vocabulary 8,192, 4 x 256 tokens, local, fp32, 2 threads, "
        "medians of the steps after the first, one run side by side.",
        "",
        "| lowest active layer | step (s), embeddings trained | step (s), lisa.train_embeddings=false | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['lowest_active']} | {r['train_embeddings']:.3f} | {r['frozen_embeddings']:.3f} | "
            f"{r['frozen_embeddings'] / r['train_embeddings']:.2f} |"
        )
    harness.write_results(args.out, f"{args.name}_ac" if args.ac else args.name, lines, rows)


if __name__ == "__main__":
    main()
