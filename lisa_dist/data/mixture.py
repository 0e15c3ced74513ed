"""data.mixture: several sources, each read, tokenized and cached alone, then drawn each epoch in proportion to their
weights, reproducibly from the seed (so every rank and a resumed run draw the same)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import datasets
import torch

from lisa_dist.config import DataConfig
from lisa_dist.data.packing import fill_rate, pack_examples, split_heldout
from lisa_dist.data.sources import load_examples_with_stats
from lisa_dist.errors import DataError

log = logging.getLogger(__name__)

OVERRIDES = ("format", "subset", "revision", "split", "text_field", "messages_field", "conversations_field")


def source_configs(data: DataConfig) -> list[DataConfig]:
    """Each mixture source as a one-source DataConfig: this section's options, the source's own over them."""
    return [
        replace(
            data,
            mixture=[],
            eval_fraction=0.0,
            eval_path="",
            path=entry["path"],
            **{k: entry[k] for k in OVERRIDES if k in entry},
        )
        for entry in data.mixture
    ]


class MixtureOrder:
    """The order of one epoch over the concatenated sources: source i gets round(N * w_i / W) draws (N all the
    examples, at least 1), taken from a fresh permutation of its examples each epoch (repeated when it is drawn more
    often than it has examples); all draws are shuffled together. A pure function of (seed, epoch)."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int) -> None:
        self.sizes, self.seed = sizes, seed
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        total, weight = sum(sizes), sum(weights)
        self.draws = [max(1, round(total * w / weight)) for w in weights]
        self.size = sum(self.draws)

    def __call__(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        parts = []
        for size, offset, draws in zip(self.sizes, self.offsets, self.draws, strict=True):
            perms = [torch.randperm(size, generator=generator) for _ in range(math.ceil(draws / size))]
            parts.append(torch.cat(perms)[:draws] + offset)
        order = torch.cat(parts)
        return order[torch.randperm(len(order), generator=generator)]


@dataclass
class Mixture:
    train: datasets.Dataset
    held_out: datasets.Dataset | None
    order: MixtureOrder
    sources: list[dict[str, Any]]
    """Per source: path, weight, examples (rows when packed), tokens, supervised tokens, draws per epoch."""


def load_mixture(
    data: DataConfig, tokenizer: Any, seed: int, *, is_main: bool = True, barrier: Callable[[], None] | None = None
) -> Mixture:
    """Every source of data.mixture loaded (a source's error names it), its eval_fraction held out, packed alone
    with data.packing (a row holds one source's examples), then concatenated."""
    trains, helds = [], []
    sources: list[dict[str, Any]] = []
    for i, (entry, sub) in enumerate(zip(data.mixture, source_configs(data), strict=True)):
        try:
            examples, stats = load_examples_with_stats(sub, tokenizer, is_main=is_main, barrier=barrier)
        except DataError as exc:
            raise DataError(f"data.mixture[{i}] ({sub.path}): {exc}") from None
        share = float(entry.get("eval_fraction", 0.0))
        held = None
        if share:
            examples, held = split_heldout(examples, share, seed)
        if data.packing:
            examples = pack_examples(examples, data.max_length)
            held = pack_examples(held, data.max_length) if held is not None else None
        trains.append(examples)
        if held is not None:
            helds.append(held)
        sources.append(
            {
                "path": sub.path,
                "format": sub.format,
                "weight": float(entry.get("weight", 1.0)),
                "examples": stats.examples,
                "tokens": stats.tokens,
                "supervised_tokens": stats.supervised_tokens,
                "rows": len(examples),
                "held_out": len(held) if held is not None else 0,
                **({"fill": round(fill_rate(examples, data.max_length), 4)} if data.packing else {}),
            }
        )
    order = MixtureOrder([len(t) for t in trains], [s["weight"] for s in sources], seed)
    for source, draws in zip(sources, order.draws, strict=True):
        source["draws_per_epoch"] = draws
        if is_main:
            log.info(
                "data.mixture: %s (%s), weight %g: %d examples, %d tokens (%d supervised), %d %s, %d drawn per epoch",
                source["path"],
                source["format"],
                source["weight"],
                source["examples"],
                source["tokens"],
                source["supervised_tokens"],
                source["rows"],
                "rows" if data.packing else "training examples",
                draws,
            )
    train = datasets.concatenate_datasets(trains)
    held_out = datasets.concatenate_datasets(helds) if helds else None
    return Mixture(train, held_out, order, sources)
