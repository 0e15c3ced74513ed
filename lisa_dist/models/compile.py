"""torch.compile per decoder block (`train.compile`), applied to the plain model before any backend wraps it, as
torchtitan does: each block is compiled in place (`Module.compile`), so its params keep their names.

Dynamo inlines the blocks' modules and takes their params as graph inputs, so every block of a model shares the
same compiled graphs: one for a block that trains and one for a frozen block (a requires_grad flip changes the
backward graph, which dynamo guards on). After the first step of a LISA run has both, a switch compiles nothing.
`compiled_graphs` counts them; the trainer logs it at every step so that a recompiling switch shows.
"""
from __future__ import annotations

from torch import nn


def compile_blocks(layers: nn.ModuleList) -> None:
    for block in layers:
        block.compile()


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (each recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
