"""torch.compile per decoder block (`train.compile`), applied to the plain model before any backend wraps it, as
torchtitan does: each block is compiled in place (`Module.compile`), so its params keep their names.

Dynamo inlines the blocks' modules and takes their params as graph inputs, so every block of a model shares the
same compiled graphs: one for a block that trains and one for a frozen block (a requires_grad flip changes the
backward graph, which dynamo guards on). After the first step of a LISA run has both, a switch compiles nothing.
`compiled_graphs` counts them; the trainer logs it at every step so that a recompiling switch shows, and
`CompileWatch` warns, naming dynamo's reason, when a block breaks its graph or nothing was compiled.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(layers: nn.ModuleList) -> None:
    # Under activation checkpointing dynamo traces a block inside checkpoint's higher-order op, which refuses any
    # Python side effect on an object from outside the block ("HOP: Unsafe side effect") and breaks the graph.
    # transformers >= 5.25 routes attention through the `kernels` package, whose forward sets and resets a
    # module-level context variable (kernels' CompileableContextVar) around every attention call: a balanced
    # set/reset that leaves nothing behind, so not replaying it while recomputing the forward in backward (what this
    # flag allows) gives eager checkpointing's result. A torch without the flag breaks the graph and CompileWatch
    # names the cause.
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in layers:
        block.compile()


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (each recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> dict[str, int]:
    """Dynamo's graph breaks in this process so far: reason -> count."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


class CompileWatch:
    """What dynamo did with the compiled blocks since this watch started: `news()` returns one warning per graph
    break reason not reported before, and one if a step ended with no graph compiled at all (the blocks then ran
    eagerly, silently otherwise)."""

    def __init__(self) -> None:
        self.breaks_before = graph_breaks()
        self.graphs_before = compiled_graphs()
        self.reported: set[str] = set()
        self.checked_graphs = False

    def news(self) -> list[str]:
        found = []
        for reason, count in graph_breaks().items():
            if count > self.breaks_before.get(reason, 0) and reason not in self.reported:
                self.reported.add(reason)
                found.append(
                    f"train.compile: dynamo broke a decoder block's graph, so that part runs eagerly: "
                    f"{_first_lines(reason)}"
                )
        if not self.checked_graphs:
            self.checked_graphs = True
            if compiled_graphs() == self.graphs_before:
                found.append(
                    "train.compile: the first step compiled no graph, so every decoder block ran eagerly"
                    + (
                        ""
                        if found
                        else " (dynamo reported no graph break; TORCH_LOGS=graph_breaks,recompiles shows what it did)"
                    )
                )
        return found


def _first_lines(reason: str, lines: int = 4) -> str:
    kept = [line.strip() for line in reason.strip().splitlines() if line.strip()][:lines]
    return " | ".join(kept)
