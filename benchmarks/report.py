"""Assemble the benchmarks' report (<date>_<hardware>_report.md) and its PNG plots from the JSON they wrote.

    python -m benchmarks.report [--results benchmarks/results] [--out DIR (default: --results)]

Reads the newest result of each methods* name (benchmarks.methods), of switch_overhead and
switch_overhead_world1 (benchmarks.switch_overhead on 2 ranks and on 1) and, when present, of multinode
(benchmarks.multinode); adds lisa_dist.tools.memory's predictions for larger worlds and for
70B models, and the versions and machine facts.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks import harness

REPO = Path(__file__).resolve().parents[1]
KINDS = ("params", "grads", "masters", "moments")
LABELS = {
    "full": "full fine-tuning",
    "lora": "LoRA (peft, r 8)",
    "qlora": "QLoRA (peft r 8, bitsandbytes NF4 base)",
    "naive_lisa": "naive LISA",
    "badam": "BAdam",
    "lisa": "lisa_dist LISA",
    "lisa_frozen_emb": "lisa_dist LISA, lisa.train_embeddings=false",
    "lisa_compiled": "lisa_dist LISA, train.compile=true",
    "lisa_int8": "lisa_dist LISA, int8 frozen layers",
    "lisa_nf4": "lisa_dist LISA, NF4 frozen layers",
    "lisa_lean": "lisa_dist LISA, NF4 + frozen embeddings + 8-bit Adam + chunked loss",
}
MB = 1e6


def describe(model: dict) -> str:
    return (
        f"hidden {model['hidden_size']}, MLP {model['intermediate_size']}, {model['num_hidden_layers']} layers, "
        f"{model['num_attention_heads']} heads, vocabulary {model.get('vocab_size', 261)}"
    )


def state(step: dict) -> int:
    return sum(step["state"][k] for k in KINDS)


def methods_section(data: dict, out: Path, stem: str) -> list[str]:
    meta, results = data["meta"], data["results"]
    fits = {name: r for name, r in results.items() if not (r.get("oom") or r.get("error"))}
    full = fits.get("full")
    params = next((r["params"] for r in fits.values()), 0)
    lines = [
        f"## Methods side by side (one process, {meta['device']}, model size {meta['size']})",
        "",
        f"Llama-shaped model: {describe(meta['model'])} ({params / 1e6:.1f}M params), "
        f"{meta['steps']} steps of {meta['micro_batch']} x {meta['seq_len']} tokens, {meta['precision']}, "
        f"{meta['device']}, {meta['threads']} threads; LISA gamma {meta['gamma']}, K {meta['interval']}; BAdam "
        f"one block, switched every {meta['interval']} steps. Tokens/s: median over steps 3..{meta['steps']}. "
        "State: bytes held at the last step (grads just before the update). Model's total: lisa_dist.tools.memory's "
        "state plus its activation (and buffer) estimate. Peak: peak RSS minus the RSS before the model was built "
        "(CUDA: max_memory_allocated); on CPU it also holds the allocator's cached blocks, the data and the "
        "tokenizer.",
        "",
        "| method | params | grads | fp32 masters | Adam moments | state (MB) | state / full | model's state (MB) "
        "| model's total (MB) | host copies (MB) | peak (MB) | tokens/s | tokens/s / full |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        if r.get("oom") or r.get("error"):
            lines.append(f"| {LABELS[name]} | {'out of memory' if r.get('oom') else 'failed'} |" + " |" * 12)
            continue
        last = r["steps"][-1]
        model = r.get("predicted_last")
        predicted = model["state"] if model else None
        total = f"{(model['device_total']) / MB:.1f}" if model else "n/a"
        ratio = state(last) / state(full["steps"][-1]) if full else float("nan")
        speed = r["tokens_per_s"] / full["tokens_per_s"] if full else float("nan")
        lines.append(
            f"| {LABELS[name]} | "
            + " | ".join(f"{last['state'][k] / MB:.1f}" for k in KINDS)
            + f" | {state(last) / MB:.1f} | {ratio:.2f} | "
            + (f"{predicted / MB:.1f}" if predicted is not None else "n/a")
            + f" | {total} | {last['state'].get('host', 0) / MB:.1f} | {r['peak_bytes'] / MB:.1f} | "
            f"{r['tokens_per_s']:.0f} | {speed:.2f} |"
        )
    lines += ["", f"![state bytes per step]({stem}_state.png)", ""]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in fits.items():
        ax.plot(
            [s["step"] for s in r["steps"]],
            [state(s) / MB for s in r["steps"]],
            label=LABELS[name],
            marker="o",
            markersize=3,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("params + grads + masters + moments (MB)")
    ax.set_title("State held per step: naive LISA grows with each switch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{stem}_state.png", dpi=120)
    plt.close(fig)
    return lines


def switch_section(data: dict) -> list[str]:
    meta, results = data["meta"], data["results"]
    lines = [
        f"## Per backend, {meta['world']} ranks: switch overhead, state per rank, gradient traffic",
        "",
        f"{meta['params'] / 1e6:.1f}M params, {meta['steps']} steps each, medians after 2 warm-up steps; LISA "
        f"gamma 2 of 8 layers, K = {meta['interval']}. Switch: FSDP flips requires_grad and swaps the optimizer "
        "groups; DeepSpeed rebuilds the engine and its ZeRO partitions. Traffic: bytes this rank sends into "
        "collectives per step (message sizes, counted through torch.distributed).",
        "",
        "| backend | LISA step (s) | full step (s) | LISA / full | switch (s) | switch / K-step period | "
        "LISA state rank 0 (MB) | full state rank 0 (MB) | LISA / full | LISA traffic (MB/step) | "
        "full traffic (MB/step) | LISA / full | active fraction of params |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lisa, full = r["lisa"], r["full"]
        ls, fs = sum(lisa["state"][k] for k in KINDS), sum(full["state"][k] for k in KINDS)
        lt, ft = lisa.get("comm_bytes"), full.get("comm_bytes")
        traffic = f"{lt / MB:.2f} | {ft / MB:.2f} | {lt / ft:.2f}" if lt and ft else "n/a | n/a | n/a"
        lines.append(
            f"| {name} | {lisa['step_s']:.4f} | {full['step_s']:.4f} | {lisa['step_s'] / full['step_s']:.2f} | "
            f"{lisa['switch_s']:.4f} | {lisa['switch_s'] / (meta['interval'] * lisa['step_s']):.3f} | "
            f"{ls / MB:.2f} | {fs / MB:.2f} | {ls / fs:.2f} | {traffic} | {lisa['active_fraction']:.3f} |"
        )
    return [*lines, ""]


def scaling_section(switch: dict | None, world1: dict | None, out: Path, prefix: str) -> list[str]:
    from lisa_dist.models import preset_config
    from lisa_dist.tools import Setup, estimate, model_config, shapes_of

    worlds = (1, 2, 8, 64, 512)
    lines = ["## Scaling: state bytes per rank", ""]
    if switch and world1:
        shapes = shapes_of(preset_config("tiny-llama", switch["meta"]["model"]), "switch model")
        lines += [
            f"The per-backend model ({switch['meta']['params'] / 1e6:.1f}M params, fp32): measured on world "
            "size 1 and 2 (rank 0, params + grads + masters + moments) and lisa_dist.tools.memory's figure for "
            "each world size, MB:",
            "",
            "| backend | method | measured W=1 | measured W=2 | " + " | ".join(f"model W={w}" for w in worlds) + " |",
            "| --- | --- | --- | --- | " + " | ".join("---" for _ in worlds) + " |",
        ]
        for backend in world1["results"]:
            if backend not in switch["results"]:
                continue
            for method in ("lisa", "full"):
                measured = [
                    sum(run["results"][backend][method]["state"][k] for k in KINDS) / MB for run in (world1, switch)
                ]
                model = [
                    estimate(shapes, method, Setup(backend=backend, world_size=w, precision="fp32")).state / MB
                    for w in worlds
                ]
                lines.append(
                    f"| {backend} | {LABELS[method]} | {measured[0]:.2f} | {measured[1]:.2f} | "
                    + " | ".join(f"{v:.3f}" for v in model)
                    + " |"
                )
        lines.append("")
    lines += [
        "lisa_dist.tools.memory for Llama-2-70B and Llama-3-70B, bf16 compute, FSDP with fp32 params and bf16 "
        "frozen layers, LISA gamma 2, GiB of params + grads + masters + moments per rank:",
        "",
        "| model | method | " + " | ".join(f"W={w}" for w in worlds) + " |",
        "| --- | --- | " + " | ".join("---" for _ in worlds) + " |",
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("llama-2-70b", "llama-3-70b"):
        shapes = shapes_of(model_config(name), name, lora_r=8)
        for method in ("full", "lora", "lisa"):
            values = [
                estimate(
                    shapes, method, Setup(backend="fsdp", world_size=w, precision="bf16", frozen_storage="bfloat16")
                ).state
                / 2**30
                for w in worlds
            ]
            lines.append(f"| {name} | {LABELS[method]} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
            if name == "llama-3-70b":
                ax.plot(worlds, values, marker="o", label=LABELS[method])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axhline(80 * 0.9, color="gray", linestyle="--", label="90% of 80 GiB")
    ax.set_xlabel("ranks")
    ax.set_ylabel("GiB per rank (state)")
    ax.set_title("Llama-3-70B state per rank (lisa_dist.tools.memory)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{prefix}_scaling.png", dpi=120)
    plt.close(fig)
    return [*lines, "", f"![scaling]({prefix}_scaling.png)", ""]


def estimate_section() -> list[str]:
    from lisa_dist.tools import Setup, model_config, shapes_of, table

    shapes = shapes_of(model_config("llama-2-70b"), "llama-2-70b", lora_r=8)
    lines = [
        "## 70B on one 8 x 80 GB node (lisa_dist.tools.memory)",
        "",
        "`lisa-dist estimate --model llama-2-70b --gpus 8 --backend fsdp --gamma 2 --frozen-dtype bfloat16`:",
        "",
    ]
    lines.append(table(shapes, Setup(backend="fsdp", world_size=8, frozen_storage="bfloat16"), 80))
    lines += ["", "`--backend zero3`:", "", table(shapes, Setup(backend="zero3", world_size=8), 80), ""]
    return lines


def multinode_section(results: Path) -> list[str]:
    md = harness.latest("multinode", results, ".md")
    return ["## Two nodes (network namespaces)", "", f"See [{md.name}]({md.name}).", ""] if md else []


def main() -> None:
    parser = harness.parser(__doc__, "report")
    parser.add_argument("--results", type=Path, default=harness.RESULTS, help="where the benchmarks' JSON is")
    parser.set_defaults(out=None)
    args = parser.parse_args()
    results = args.results
    path = harness.reserve(args.out or results, args.name)
    names = sorted({harness.name_of(p) for p in results.glob("*_methods*.json")} - {None})
    sources = {name: harness.latest(name, results) for name in [*names, "switch_overhead", "switch_overhead_world1"]}
    data = {name: json.loads(p.read_text()) if p else None for name, p in sources.items()}
    lines = [
        "# lisa_dist benchmarks",
        "",
        "Produced by `make bench` (benchmarks.methods, benchmarks.switch_overhead on 2 ranks and on 1, "
        "benchmarks.report) from " + ", ".join(f"`{p.name}`" for p in sources.values() if p) + ".",
        "",
    ]
    for name in names:
        lines += methods_section(data[name], path.parent, f"{path.name}_{name}")
    switch, world1 = data["switch_overhead"], data["switch_overhead_world1"]
    if switch:
        lines += switch_section(switch)
    lines += scaling_section(switch, world1, path.parent, path.name)
    lines += estimate_section()
    lines += multinode_section(results)
    harness.write_stem(path, lines, {"sources": {n: p.name for n, p in sources.items() if p}})


if __name__ == "__main__":
    main()
