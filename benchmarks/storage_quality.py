"""The quality cost of each frozen storage: held-out loss of LISA on SmolLM2-135M-Instruct after the same steps and
data with its frozen layers in fp32, bf16, int8 and NF4, and with frozen embeddings.

    python -m benchmarks.storage_quality [--steps 20] [--out benchmarks/results]

The split and the held-out loss are those of the quality study before its rewrite (a fixed 90/10 split of the
Alpaca-GPT4 sample; each run a fresh process, seed 0); every arm is LISA gamma 2, K 5 at the lr the quality study
found best for it. bfloat16 storage needs bf16 compute, so it is compared with fp32 storage under bf16 compute as
well. SmolLM2 ties its head to the input embedding: lisa.train_embeddings=false then still trains the tied matrix
(as the head), so that arm measures the option's no-op on tied models. Writes
<date>_<hardware>_storage_quality.json and .md, including each run's switch time (the re-quantization) from its
metrics.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "alpaca_gpt4_en_999.json"
HELDOUT_SHARE, SPLIT_SEED = 0.1, 0

ARMS = {
    "fp32 storage (fp32 compute)": [],
    "int8 storage": ["--lisa.frozen_storage=int8"],
    "nf4 storage": ["--lisa.frozen_storage=nf4"],
    "nf4, frozen embeddings": ["--lisa.frozen_storage=nf4", "--lisa.train_embeddings=false"],
    "fp32 storage (bf16 compute)": ["--train.precision=bf16"],
    "bf16 storage (bf16 compute)": ["--train.precision=bf16", "--lisa.frozen_storage=bfloat16"],
}


def split(source: Path, out: Path) -> tuple[Path, Path]:
    """The fixed 90/10 split of `source` into out/train.json and out/heldout.json."""
    import torch

    text = source.read_text()
    rows = json.loads(text) if source.suffix == ".json" else [json.loads(line) for line in text.splitlines()]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    cut = round(len(rows) * HELDOUT_SHARE)
    out.mkdir(parents=True, exist_ok=True)
    heldout, train = out / "heldout.json", out / "train.json"
    heldout.write_text(json.dumps([rows[i] for i in order[:cut]]))
    train.write_text(json.dumps([rows[i] for i in order[cut:]]))
    return train, heldout


def heldout_loss(run, heldout: Path, batch: int = 16) -> float:
    """Mean token loss of the held-out responses (the same prompt template and truncation as training)."""
    from dataclasses import replace

    import torch

    from lisa_dist.data import collate, load_examples
    from lisa_dist.models import lm_loss_sum, supervised_tokens

    cfg = replace(run.cfg.data, path=str(heldout), skip_bad_rows=True)
    dataset = load_examples(cfg, run.tokenizer)
    model = run.backend.model
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch):
            rows = dataset[start : start + batch]
            b = collate(rows["input_ids"], rows["labels"], run.tokenizer.pad_token_id)
            total += float(lm_loss_sum(model, b))
            tokens += supervised_tokens(b)
    model.train()
    return total / tokens


def run_arm(spec: dict) -> dict:
    """Train one arm; the held-out loss of the model as it trained (quantized frozen layers) and of its exact
    weights (every block loaded from its host copy, as the export writes them)."""
    import resource

    import torch

    from lisa_dist.config import load_config
    from lisa_dist.run import build, train_step

    torch.manual_seed(0)
    start = time.perf_counter()
    run = build(load_config(None, spec["overrides"]))
    records = [train_step(run, step) for step in range(run.cfg.train.steps)]
    switches = [r["switch_s"] for r in records if r["switched"]][1:]  # the first activation is not a switch
    # Evaluated in the compute dtype it trained in (bf16 storage holds bf16 matrices: they need bf16 inputs).
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.cfg.train.precision == "bf16"):
        as_trained = heldout_loss(run, Path(spec["heldout"]))
        store = getattr(run.backend, "store", None)
        if store is not None:
            store.set_active(range(run.layout.num_layers))
        exact = heldout_loss(run, Path(spec["heldout"]))
    return {
        "heldout_as_trained": as_trained,
        "heldout_loss": exact,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "wall_s": time.perf_counter() - start,
        "state_bytes": records[-1]["state_bytes"],
        "switch_s_median": statistics.median(switches) if switches else 0.0,
    }


def main() -> None:
    parser = harness.parser(__doc__, "storage_quality")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1.5e-4)
    parser.add_argument("--resume", action="store_true", help="keep the arms already in the newest result of --name")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one arm, print its JSON
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_arm(json.loads(args.one))))
        return
    from lisa_dist.tools import prepare_model

    work = REPO / "runs" / "storage_quality"
    train, heldout = split(ALPACA, work / "data")
    model = prepare_model("smollm2-135m-instruct")
    earlier = harness.read_latest(args.name, args.out) if args.resume else None
    results = {k: v for k, v in earlier.items() if k != "run"} if earlier else {}
    stem = harness.reserve(args.out, args.name)
    start = time.perf_counter() - sum(r["wall_s"] for r in results.values())
    for name, extra in ARMS.items():
        if name in results:
            continue
        slug = "".join(c if c.isalnum() else "_" for c in name)
        overrides = [
            f"--model.name={model}",
            f"--data.path={train}",
            "--data.format=alpaca",
            "--data.max_length=192",
            "--data.skip_bad_rows=true",
            f"--data.cache_dir={work / 'cache'}",
            "--train.micro_batch_size=4",
            f"--train.steps={args.steps}",
            "--train.seed=0",
            f"--train.output_dir={work / slug}",
            f"--optim.warmup_steps={max(1, args.steps // 10)}",
            "--optim.schedule=cosine",
            f"--optim.lr={args.lr}",
            "--lisa.gamma=2",
            "--lisa.interval=5",
            "--logging.progress=false",
            "--logging.level=WARNING",
            "--checkpoint.save_final=false",
            "--train.overwrite=true",
            *extra,
        ]
        spec = {"overrides": overrides, "heldout": str(heldout)}
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.storage_quality", "--one", json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        result = json.loads(lines[-1][len("RESULT ") :])
        results[name] = result
        harness.write_json(stem, results)  # after each arm: --resume goes on from here
        print(
            f"{name:30s} held-out {result['heldout_loss']:.4f} (as trained {result['heldout_as_trained']:.4f})  "
            f"{result['wall_s']:6.1f} s  "
            f"switch {result['switch_s_median']:.3f} s",
            flush=True,
        )
    base = results["fp32 storage (fp32 compute)"]["heldout_loss"]
    lines = [
        "# Quality cost of the frozen storage (SmolLM2-135M-Instruct)",
        "",
        f"`python -m benchmarks.storage_quality --steps {args.steps}`: LISA gamma 2, K 5, lr {args.lr:g}, "
        f"{args.steps} steps of 4 x 192 tokens of the Alpaca-GPT4 split, seed 0, one process on CPU; "
        f"{(time.perf_counter() - start) / 60:.1f} min in all. Held-out: mean response-token loss of the "
        "held-out 10%, of the exact weights (what the export writes: every block from its host copy) and as "
        "trained (the frozen layers as the device held them). Device state: params + grads + moments at the "
        "last step; host: the exact copies; peak: the process's peak RSS.",
        "",
        "| frozen storage | held-out loss | vs fp32 storage | held-out as trained | device state (MB) | "
        "host copies (MB) | peak RSS (MB) | median switch (s) | wall (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        s = r["state_bytes"]
        device = (s["params"] + s["grads"] + s["masters"] + s["moments"]) / 1e6
        lines.append(
            f"| {name} | {r['heldout_loss']:.4f} | {r['heldout_loss'] - base:+.4f} | "
            f"{r['heldout_as_trained']:.4f} | {device:.1f} | {s.get('host', 0) / 1e6:.1f} | "
            f"{r['peak_rss'] / 1e6:.0f} | {r['switch_s_median']:.3f} | {r['wall_s']:.0f} |"
        )
    harness.write_stem(stem, lines, results)


if __name__ == "__main__":
    main()
