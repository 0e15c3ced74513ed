"""Padding and throughput with and without data.packing on the Alpaca-GPT4 data, side by side in one run.

    python -m benchmarks.packing [--steps 12] [--micro 4] [--max-length 512]

SmolLM2-135M-Instruct's tokenizer (`lisa-dist prepare-model smollm2-135m-instruct`) on a small Llama of its
vocabulary (4 layers, width 256: the loop's cost without the real model's), LISA gamma 1, the local backend. Per
arm: the padding fraction of the micro-batches trained (padding / all positions) and the median real (not padding)
tokens per second over the steps after the first. Writes benchmarks/results/<date>_<hardware>_packing.md and
.json.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from benchmarks import harness
from lisa_dist.config import load_config
from lisa_dist.run import build, train_step
from lisa_dist.tools import prepare_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "alpaca_gpt4_en_999.json"


def arm(packing: bool, args, tokenizer_dir: str, out: Path) -> dict:
    cfg = load_config(
        None,
        [
            f"--data.path={DATA}",
            "--data.format=alpaca",
            f"--data.max_length={args.max_length}",
            "--data.skip_bad_rows=true",
            f"--data.packing={str(packing).lower()}",
            f"--data.cache_dir={out / 'cache'}",
            "--model.name=tiny-llama",
            f"--model.tokenizer={tokenizer_dir}",
            '--model.config_overrides={"num_hidden_layers":4,"hidden_size":256,"intermediate_size":688,'
            '"vocab_size":49152}',
            f"--train.micro_batch_size={args.micro}",
            f"--train.steps={args.steps}",
            "--lisa.gamma=1",
            f"--train.output_dir={out / ('packed' if packing else 'padded')}",
            "--logging.progress=false",
            "--train.overwrite=true",
        ],
    )
    run = build(cfg)
    real = positions = 0
    rates = []
    for step in range(args.steps):
        for batch in run.batches.step_batches(step):
            real += int(batch["attention_mask"].sum())
            positions += batch["attention_mask"].numel()
        record = train_step(run, step)
        if step:
            rates.append(record["tokens_per_s"])
    return {
        "packing": packing,
        "rows": run.batches.num_examples,
        "padding_fraction": 1 - real / positions,
        "tokens_per_s": statistics.median(rates),
        "real_tokens": real,
    }


def main() -> None:
    parser = harness.parser(__doc__, "packing")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer_dir = str(prepare_model("smollm2-135m-instruct"))
    out = REPO / "runs" / "bench_packing"
    results = [arm(False, args, tokenizer_dir, out), arm(True, args, tokenizer_dir, out)]
    base = results[0]["tokens_per_s"]
    lines = [
        "# data.packing on Alpaca-GPT4 (999 rows)",
        "",
        f"`python -m benchmarks.packing --steps {args.steps} --micro {args.micro} --max-length "
        f"{args.max_length}`: SmolLM2's tokenizer, a 4-layer width-256 Llama of its vocabulary, LISA gamma 1, "
        "local backend, 2 threads, one run side by side; tokens/s counts real tokens (median of the steps "
        "after the first).",
        "",
        "| data.packing | training rows | padding fraction | tokens/s | tokens/s ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {str(r['packing']).lower()} | {r['rows']} | {r['padding_fraction']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f} |"
        )
    harness.write_results(args.out, args.name, lines, results)


if __name__ == "__main__":
    main()
