"""What a LISA switch costs with quantized frozen layers: per block, writing a leaving block's trained weights to
its host copy and re-quantizing it (freeze), and loading an entering block's exact weights (thaw).

    python -m benchmarks.requant_cost [--repeats 5] [--out benchmarks/results]

Blocks of two real shapes (SmolLM2-135M's and Llama-3-8B's decoder layer, built from their configs) go through
lisa_dist.method.FrozenStore on this machine's device, for int8 and nf4 (and bfloat16, a cast, for comparison).
A switch at gamma moves gamma blocks out and gamma in: its cost is gamma x (freeze + thaw). Writes
requant_cost.json and requant_cost.md: medians over the repeats.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks import harness

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "SmolLM2-135M": dict(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, vocab_size=256
    ),
    "Llama-3-8B": dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=256
    ),
}


def store_for(shape: dict, storage: str, device: torch.device):
    from transformers import LlamaConfig

    from lisa_dist.method import FrozenStore
    from lisa_dist.models import build_skeleton, find_layout
    from lisa_dist.models.weights import allocate

    model = build_skeleton(LlamaConfig(num_hidden_layers=2, tie_word_embeddings=False, **shape), torch.float32)
    allocate(model, torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    layout = find_layout(model)
    store = FrozenStore(layout, storage, "float32", device)
    store.place(model)
    return store, sum(p.numel() for p in layout.layers[0].parameters())


def measure(shape: dict, storage: str, repeats: int, device: torch.device) -> dict:
    store, numel = store_for(shape, storage, device)
    freeze, thaw = [], []
    for _ in range(repeats + 1):  # the first round warms up
        sync(device)
        start = time.perf_counter()
        store.set_active([0])  # block 0 thaws
        sync(device)
        middle = time.perf_counter()
        store.set_active([])  # and freezes again: write back + quantize
        sync(device)
        thaw.append(middle - start)
        freeze.append(time.perf_counter() - middle)
    freeze, thaw = statistics.median(freeze[1:]), statistics.median(thaw[1:])
    return {
        "storage": storage,
        "block_params": numel,
        "freeze_s": freeze,
        "thaw_s": thaw,
        "freeze_gb_per_s": numel * 4 / freeze / 1e9,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = harness.parser(__doc__, "requant_cost", repeats=5)
    parser.add_argument("--gamma", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = {
        name: [measure(shape, s, args.repeats, device) for s in ("bfloat16", "int8", "nf4")]
        for name, shape in SHAPES.items()
    }
    lines = [
        "# Re-quantization cost of a LISA switch",
        "",
        f"`python -m benchmarks.requant_cost --repeats {args.repeats}` on {device.type} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}); medians. freeze: a leaving block's "
        "weights to its host copy, then re-quantized (bfloat16: a cast); thaw: an entering block's exact "
        f"weights loaded in fp32. A switch at gamma {args.gamma} moves {args.gamma} blocks each way.",
        "",
        "| block | params | storage | freeze (s) | thaw (s) | per switch, gamma "
        f"{args.gamma} (s) | freeze GB/s (fp32) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, results in rows.items():
        for r in results:
            lines.append(
                f"| {name} | {r['block_params'] / 1e6:.1f}M | {r['storage']} | {r['freeze_s']:.4f} | "
                f"{r['thaw_s']:.4f} | {args.gamma * (r['freeze_s'] + r['thaw_s']):.3f} | "
                f"{r['freeze_gb_per_s']:.2f} |"
            )
    harness.write_results(args.out, args.name, lines, {"device": device.type, "gamma": args.gamma, "rows": rows})


if __name__ == "__main__":
    main()
