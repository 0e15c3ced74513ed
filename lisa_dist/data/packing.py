"""Held-out evaluation examples and packed rows, both made from the tokenized examples after the cache.

The held-out split is drawn from `seed` over examples, before any packing, so that the same examples are held out
packed or not. A packed row concatenates whole examples up to `max_length` tokens,
chosen by best-fit decreasing within windows of consecutive examples; its `position_ids` restart at 0
at each example (transformers then keeps the examples apart: packed-sequence masks for sdpa, eager and flex
attention, varlen flash attention), and the first label of every example after the first is ignored, since it
would be predicted from the previous example's last token. So every example keeps exactly its supervised tokens.
"""

from __future__ import annotations

import bisect

import datasets
import torch

from lisa_dist.errors import DataError
from lisa_dist.models import IGNORE_INDEX

PACKED_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "position_ids": datasets.Sequence(datasets.Value("int32")),
    }
)


def split_heldout(dataset: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training examples, held-out examples): round(fraction * N) examples (at least 1) drawn with `seed`."""
    count = max(1, round(fraction * len(dataset)))
    if count >= len(dataset):
        raise DataError(
            f"data.eval_fraction={fraction} holds out all {len(dataset)} examples: nothing is left to "
            "train on (lower it, or give data.eval_path)"
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(order[:count])
    held_set = set(held)
    return dataset.select([i for i in range(len(dataset)) if i not in held_set]), dataset.select(held)


PACKING_WINDOW = 2048
"""Examples packed together at most: best-fit decreasing sorts within each window of consecutive examples, so rows
stay made of nearby examples (the epochs shuffle the rows) and packing stays O(n log n)."""


def pack_examples(dataset: datasets.Dataset, max_length: int, window: int = PACKING_WINDOW) -> datasets.Dataset:
    """Rows of up to `max_length` tokens by best-fit decreasing: in each window of consecutive examples, the
    longest first, each into the open row whose free space fits it most tightly (a new row when none does)."""
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for start in range(0, len(dataset), window):
        chunk = dataset[start : start + window]
        for members in best_fit_decreasing([len(ids) for ids in chunk["input_ids"]], max_length):
            ids: list[int] = []
            labels: list[int] = []
            positions: list[int] = []
            for n, i in enumerate(members):
                new_ids, new_labels = chunk["input_ids"][i], chunk["labels"][i]
                if n:  # predicted from the previous example's last token: not a target
                    new_labels = [IGNORE_INDEX, *new_labels[1:]]
                ids.extend(new_ids)
                labels.extend(new_labels)
                positions.extend(range(len(new_ids)))
            rows["input_ids"].append(ids)
            rows["labels"].append(labels)
            rows["position_ids"].append(positions)
    return datasets.Dataset.from_dict(rows, features=PACKED_FEATURES)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of indices into `lengths`, each in its original order) of total length <= `capacity`: the
    longest item first (ties in order), into the fullest bin it fits. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin), sorted: the tightest fit is the first with room enough
    for item in order:
        size = lengths[item]
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            bins.append([item])
            room, slot = capacity - size, len(bins) - 1
        else:
            room, slot = free.pop(at)
            bins[slot].append(item)
            room -= size
        bisect.insort(free, (room, slot))
    return [sorted(members) for members in bins]


def fill_rate(dataset: datasets.Dataset, max_length: int) -> float:
    """Tokens over the positions of `len(dataset)` rows of `max_length`."""
    tokens = sum(len(ids) for ids in dataset["input_ids"])
    return tokens / (len(dataset) * max_length) if len(dataset) else 0.0
