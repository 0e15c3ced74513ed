"""Full fine-tuning, LoRA (peft), QLoRA, naive LISA, BAdam and lisa_dist LISA (with each frozen storage and the lean
options) on the same model, data and steps.

    python -m benchmarks.methods [--steps 24] [--device cpu|cuda] [--size bench|<size>] [--out benchmarks/results]
        [--name methods]

Each method runs in a fresh process (so that its peak memory is its own) through the one trainer loop. Per step it
records the bytes the method holds (params, grads before the update, fp32 masters, Adam moments), the step time
and tokens. Writes <date>_<hardware>_<name>.json (and a .md naming it): medians of tokens/s, the state series
(naive LISA's grows with every switch), peak memory (CPU: peak RSS minus the RSS before the model was built;
CUDA: torch.cuda.max_memory_allocated) and, next to it, lisa_dist.tools.memory's prediction for the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import harness

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "lisa_dist" / "assets" / "demo_alpaca.jsonl"
METHODS = (
    "full",
    "lora",
    "qlora",
    "naive_lisa",
    "badam",
    "lisa",
    "lisa_frozen_emb",
    "lisa_compiled",
    "lisa_int8",
    "lisa_nf4",
    "lisa_lean",
)
# lisa_dist LISA's memory options, by benchmark name (lisa_lean: everything that saves memory at once).
LISA_OPTIONS = {
    "lisa": [],
    "lisa_int8": ["--lisa.frozen_storage=int8"],
    "lisa_nf4": ["--lisa.frozen_storage=nf4"],
    "lisa_frozen_emb": ["--lisa.train_embeddings=false"],
    "lisa_compiled": ["--train.compile=true"],
    "lisa_lean": [
        "--lisa.frozen_storage=nf4",
        "--lisa.train_embeddings=false",
        "--optim.adam_8bit=all",
        "--train.loss=chunked",
        "--train.loss_chunk_tokens=128",
    ],
}
# The memory model's name for each benchmark method (BAdam has none).
PLANNED = {
    "full": "full",
    "lora": "lora",
    "qlora": "qlora",
    "naive_lisa": "naive_lisa",
    **{name: "lisa" for name in LISA_OPTIONS},
}
# Llama-shaped models by name: the CPU default, and larger ones for one GPU (benchmarks/gpu.sh).
SIZES = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 4},  # the GPU kit's CPU run (benchmarks/gpu_kit)
    "bench": {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "head_dim": 64,
    },
    # SmolLM2-135M-Instruct's shape (tied embeddings, 134.5M params): the speed targets of make bench.
    "smollm2-135m": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
    "1b": {
        "vocab_size": 32000,
        "hidden_size": 2048,
        "intermediate_size": 5504,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 128,
    },
    "3b": {
        "vocab_size": 32000,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
    },
    "7b": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
    },
}
GAMMA, INTERVAL = 2, 2
# The libraries each method needs beyond lisa_dist's own (datasets, transformers).
LIBRARIES = {
    "all": ["datasets"],
    "lora": ["peft"],
    "qlora": ["peft", "bitsandbytes"],
    "badam": ["badam"],
    "lisa_int8": ["torchao"],
    "lisa_nf4": ["torchao"],
    "lisa_lean": ["torchao", "torchao.optim"],
}


def overrides(method: str, args: argparse.Namespace) -> list[str]:
    size = json.dumps(SIZES[args.size])
    # The demo data's responses packed into blocks of seq_len tokens: every step the same number of tokens.
    base = [
        f"--data.path={DATA}",
        "--data.format=text",
        "--data.text_field=output",
        f"--data.max_length={args.seq_len}",
        "--model.name=tiny-llama",
        f"--model.config_overrides={size}",
        f"--train.micro_batch_size={args.micro_batch}",
        f"--train.steps={args.steps}",
        f"--train.device={args.device}",
        f"--train.precision={args.precision}",
        f"--train.output_dir={REPO / 'runs' / 'bench_methods' / method}",
        "--checkpoint.save_final=false",
        "--logging.progress=false",
        "--logging.level=WARNING",
        "--logging.log_every=1",
        f"--lisa.gamma={GAMMA}",
        f"--lisa.interval={INTERVAL}",
        "--optim.warmup_steps=0",
        f"--train.activation_checkpointing={str(args.activation_checkpointing).lower()}",
    ]
    if method in ("full", "badam"):
        base.append("--lisa.enabled=false")
    if method in ("lora", "qlora"):
        base += ["--lisa.enabled=false", "--lora.enabled=true", "--lora.r=8"]
    return base + LISA_OPTIONS.get(method, [])


def quantize_lora_base(layers: torch.nn.ModuleList) -> int:
    """QLoRA: every linear of the decoder layers becomes a bitsandbytes NF4 Linear4bit (inside peft's LoRA layers,
    their frozen base; the adapters stay fp32), as `load_in_4bit` does; returns how many were replaced."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    def nf4(base: torch.nn.Linear) -> torch.nn.Module:
        quantized = bnb.nn.Linear4bit(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            compute_dtype=base.weight.dtype,
            quant_type="nf4",
        )
        quantized.weight = bnb.nn.Params4bit(base.weight.detach().cpu(), requires_grad=False, quant_type="nf4")
        if base.bias is not None:
            quantized.bias = torch.nn.Parameter(base.bias.detach(), requires_grad=False)
        return quantized.to(base.weight.device)

    replaced = 0
    for path, parent in list(layers.named_modules()):
        if "lora_" in path:  # the adapters themselves
            continue
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and (name == "base_layer" or not isinstance(parent, LoraLayer)):
                setattr(parent, name, nf4(child))
                replaced += 1
    return replaced


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_one(method: str, args: argparse.Namespace) -> dict:
    """Train `method` in this process and return what it measured."""
    import importlib

    # The libraries this method loads, imported before the baseline RSS is taken; only these (a GPU machine may
    # lack badam or bitsandbytes, which the other methods never touch).
    for module in LIBRARIES["all"] + LIBRARIES.get(method, []):
        importlib.import_module(module)

    from benchmarks.lib import build_baseline
    from lisa_dist.config import load_config
    from lisa_dist.run import build, train_step
    from lisa_dist.tools import Setup, estimate, shapes_of_model

    torch.set_num_threads(args.threads)
    cfg = load_config(None, overrides(method, args))
    cuda = cfg.train.device == "cuda"
    before = torch.cuda.memory_allocated() if cuda else rss_bytes()
    backend = (
        build_baseline(method, cfg, "model.layers", SIZES[args.size]["num_hidden_layers"])
        if method in ("naive_lisa", "badam")
        else None
    )
    run = build(cfg, backend)
    # The planner's shapes are those of the model as built (QLoRA's bitsandbytes params are packed).
    lora = run.trainable.always if method in ("lora", "qlora") else ()
    shapes = shapes_of_model(run.layout.model, lora=lora)
    if method == "qlora" and not quantize_lora_base(run.layout.layers):
        raise RuntimeError("QLoRA: peft wrapped no nn.Linear to quantize")
    loaded = {}
    if cuda:  # the training peak, not the loading's (a whole layer's fp32 copy on its way to NF4, say)
        loaded = {
            "load_peak_bytes": torch.cuda.max_memory_allocated() - before,
            "loaded_bytes": torch.cuda.memory_allocated() - before,
        }
        torch.cuda.reset_peak_memory_stats()
    steps, seen = [], 0
    for step in range(cfg.train.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        record = train_step(run, step)
        if cuda:
            torch.cuda.synchronize()
        steps.append(
            {
                "step": step + 1,
                "s": time.perf_counter() - start,
                "tokens": record["tokens"] - seen,
                "switched": record["switched"],
                "state": record["state_bytes"],
                "active": getattr(run.backend, "active_block", None) or record["active_layers"],
                "compiled_graphs": record.get("compiled_graphs"),
            }
        )
        seen = record["tokens"]
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:  # what the caching allocator held at its peak, fragmentation included: what must fit the card
        loaded["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    measured = steps[2:]  # warm-up
    result = {
        **loaded,
        "method": method,
        "steps": steps,
        "peak_bytes": peak - before,
        "peak_kind": "cuda" if cuda else "rss",
        "median_step_s": statistics.median(s["s"] for s in measured),
        "tokens_per_s": statistics.median(s["tokens"] / s["s"] for s in measured),
        "mean_tokens_per_s": sum(s["tokens"] for s in measured) / sum(s["s"] for s in measured),
        "params": sum(p.numel() for p in run.layout.model.parameters()),
        "trained_now": sum(p.numel() for p in run.layout.model.parameters() if p.requires_grad),
    }
    if method in PLANNED:  # the methods of lisa_dist.tools.memory.METHODS
        setup = Setup.from_config(cfg)  # its data.max_length is --seq-len
        planned = PLANNED[method]
        result["predicted_last"] = estimate(shapes, planned, setup, active=steps[-1]["active"]).as_dict()
        # naive LISA's worst case: every layer visited
        result["predicted"] = estimate(shapes, planned, setup).as_dict()
    return result


def main() -> None:
    parser = harness.parser(__doc__, "methods")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--size", default="bench", choices=list(SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method, print its JSON
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)))
        return
    results, failed = {}, []
    meta = {
        "torch": torch.__version__,
        "device": args.device,
        "size": args.size,
        "model": SIZES[args.size],
        "steps": args.steps,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "gamma": GAMMA,
        "interval": INTERVAL,
        "precision": args.precision,
        "threads": args.threads,
        "activation_checkpointing": args.activation_checkpointing,
    }
    stem = harness.reserve(args.out, args.name)
    for method in args.methods:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.methods",
            "--one",
            method,
            f"--steps={args.steps}",
            f"--size={args.size}",
            f"--device={args.device}",
            f"--precision={args.precision}",
            f"--seq-len={args.seq_len}",
            f"--micro-batch={args.micro_batch}",
            f"--threads={args.threads}",
        ]
        cmd += ["--activation-checkpointing"] if args.activation_checkpointing else []
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode and "out of memory" in done.stderr.lower():
            results[method] = {"method": method, "oom": True}  # does not fit this device: a result too
            print(f"{method:10s} out of memory", flush=True)
        elif done.returncode or not lines:  # recorded, and the next method still runs
            failed.append(method)
            results[method] = {"method": method, "error": f"exit {done.returncode}: {done.stderr[-3000:]}"}
            print(
                f"{method:10s} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}",
                flush=True,
            )
        else:
            results[method] = r = json.loads(lines[-1][len("RESULT ") :])
            print(
                f"{method:10s} {r['tokens_per_s']:9.1f} tok/s  device state "
                f"{sum(v for k, v in r['steps'][-1]['state'].items() if k != 'host'):>12,} B"
                f"  peak {r['peak_bytes']:>12,} B ({r['peak_kind']})",
                flush=True,
            )
        # Written after every method: a run stopped part way keeps what it measured.
        harness.write_json(stem, {"meta": meta, "results": results})
    harness.write_stem(stem, None, {"meta": meta, "results": results})
    if failed:
        sys.exit(f"methods: {', '.join(failed)} failed (their errors are in {stem}.json)")


if __name__ == "__main__":
    main()
