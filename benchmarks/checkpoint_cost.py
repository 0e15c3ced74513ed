"""Checkpoint size and save/resume time per backend, the LISA switch time beside them, and what hashing costs.

    torchrun --standalone --nproc-per-node 2 -m benchmarks.checkpoint_cost [--backends fsdp zero2 zero3] \
        [--shape demo|smollm2]
    python -m benchmarks.checkpoint_cost --backends local
    python -m benchmarks.checkpoint_cost --hash-gb 1      # SHA-256 of a 1 GiB checkpoint file, cold and warm

Medians of 3 saves and 3 resumes (a fresh build that verifies, hashing every byte, and loads the newest checkpoint)
and of the LISA switches of 4 steps (K=1). These are the longest waits of one rank on another in a run: they size
backend.timeout_s (the switch) and backend.io_timeout_s (saves). Writes
<date>_<hardware>_checkpoint_cost_<backends>_<shape>.md (--hash-gb: <date>_<hardware>_checkpoint_cost_hash.md).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch.distributed as dist

from benchmarks import harness
from lisa_dist.config import load_config
from lisa_dist.run import build, checkpoint, save, train_step

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "lisa_dist" / "assets" / "demo_alpaca.jsonl"
BACKENDS = {
    "local": ["--backend.name=local"],
    "fsdp": ["--backend.name=fsdp"],
    **{
        f"zero{s}": ["--backend.name=deepspeed", f"--backend.ds_config={REPO / 'ds_configs' / f'zero{s}.json'}"]
        for s in (2, 3)
    },
}
# On the tiny-llama preset: the demo's model, and SmolLM2-135M's shape (tied embeddings, 134.5M params).
SHAPES = {
    "demo": "{hidden_size: 128, intermediate_size: 256, num_hidden_layers: 8}",
    "smollm2": "{hidden_size: 576, intermediate_size: 1536, num_hidden_layers: 30, num_attention_heads: 9, "
    "num_key_value_heads: 3, head_dim: 64, vocab_size: 49152, tie_word_embeddings: true}",
}


def measure(name: str, out: Path, shape: str) -> dict:
    base = [
        f"--data.path={DATA}",
        "--data.format=alpaca",
        "--data.max_length=512",
        "--data.skip_bad_rows=true",
        f"--model.config_overrides={SHAPES[shape]}",
        "--train.micro_batch_size=1",
        "--train.steps=4",
        "--logging.progress=false",
        "--logging.level=WARNING",
        "--lisa.interval=1",
        f"--train.output_dir={out / name}",
        "--checkpoint.keep_last=1",
        "--lisa.gamma=2",
        "--train.overwrite=true",
        *BACKENDS[name],
    ]
    run = build(load_config(None, base))
    switches = [train_step(run, s)["switch_s"] for s in range(4)][1:]  # the first activation is no switch
    saves, folder = [], None
    for _ in range(3):
        start = time.perf_counter()
        folder = save(run, 4)
        saves.append(time.perf_counter() - start)
    loads = []
    resume = [a for a in base if a != "--train.overwrite=true"]
    for _ in range(3):
        start = time.perf_counter()
        resumed = build(load_config(None, resume))
        loads.append(time.perf_counter() - start)
        assert resumed.start_step == 4
    size = None
    if run.backend.is_main:
        size = sum(e["bytes"] for e in json.loads((folder / "manifest.json").read_text())["files"].values())
    return {
        "save_s": statistics.median(saves),
        "resume_build_s": statistics.median(loads),
        "bytes": size,
        "switch_s": statistics.median(switches),
        "world": run.backend.world_size,
        "main": run.backend.is_main,
        "params": run.trainable.num_params(range(len(run.trainable.layers))),
    }


def hash_cost(gib: float, folder: Path) -> str:
    """SHA-256 of one file of `gib` GiB as lisa_dist hashes it: cold (page cache dropped, when allowed) and warm."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "blob.bin"
    size = int(gib * (1 << 30))
    with open(path, "wb") as f:
        for _ in range(size // (64 << 20)):
            f.write(os.urandom(64 << 20))
        f.flush()
        os.fsync(f.fileno())
    cold = subprocess.run(["sh", "-c", "sync && echo 3 > /proc/sys/vm/drop_caches"], capture_output=True)
    timings = {}
    for label in ("cold" if cold.returncode == 0 else "first", "warm"):
        start = time.perf_counter()
        checkpoint.sha256(path)
        timings[label] = time.perf_counter() - start
    path.unlink()
    lines = [
        f"SHA-256 of a {gib:g} GiB file ({size:,} bytes), one core:",
        "",
        "| read | s | s per GB | GB/s |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {label} | {t:.2f} | {t / (size / 1e9):.2f} | {size / 1e9 / t:.2f} |" for label, t in timings.items()]
    return "\n".join(lines)


def main() -> None:
    parser = harness.parser(__doc__, "checkpoint_cost")
    parser.add_argument("--backends", nargs="+", default=["fsdp", "zero2", "zero3"], choices=list(BACKENDS))
    parser.add_argument("--shape", default="demo", choices=list(SHAPES))
    parser.add_argument("--work", default="runs/bench_ckpt")
    parser.add_argument("--hash-gb", type=float, default=None, help="only measure hashing a file of this many GiB")
    args = parser.parse_args()
    if args.hash_gb:
        text = hash_cost(args.hash_gb, Path(args.work) / "hash")
        harness.write_results(args.out, f"{args.name}_hash", text.splitlines(), {"hash_gib": args.hash_gb})
        return
    results = {name: measure(name, Path(args.work), args.shape) for name in args.backends}
    if not next(iter(results.values()))["main"]:
        return
    first = next(iter(results.values()))
    lines = [
        f"Shape {args.shape} ({first['params']:,} params), {first['world']} rank(s), LISA gamma 2.",
        "",
        "| backend | checkpoint bytes | save + hash (s) | verify + build + resume (s) | LISA switch (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {n} | {r['bytes']:,} | {r['save_s']:.3f} | {r['resume_build_s']:.2f} | {r['switch_s']:.3f} |"
        for n, r in results.items()
    ]
    harness.write_results(
        args.out,
        f"{args.name}_{'_'.join(args.backends)}_{args.shape}",
        lines,
        {"shape": args.shape, "results": results},
    )
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
