"""Held-out evaluation examples and packed rows, both made from the tokenized examples after the cache.

The held-out split is drawn from `seed` over examples, before any packing, so that the same examples are held out
packed or not. A packed row concatenates whole examples up to `max_length` tokens; its `position_ids` restart at 0
at each example (transformers then keeps the examples apart: packed-sequence masks for sdpa, eager and flex
attention, varlen flash attention), and the first label of every example after the first is ignored, since it
would be predicted from the previous example's last token. So every example keeps exactly its supervised tokens.
"""
from __future__ import annotations

import datasets
import torch

from lisa_dist.errors import DataError
from lisa_dist.models import IGNORE_INDEX

PACKED_FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "labels": datasets.Sequence(datasets.Value("int32")),
    "position_ids": datasets.Sequence(datasets.Value("int32")),
})


def split_heldout(dataset: datasets.Dataset, fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training examples, held-out examples): round(fraction * N) examples (at least 1) drawn with `seed`."""
    count = max(1, round(fraction * len(dataset)))
    if count >= len(dataset):
        raise DataError(f"data.eval_fraction={fraction} holds out all {len(dataset)} examples: nothing is left to "
                        "train on (lower it, or give data.eval_path)")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(order[:count])
    held_set = set(held)
    return dataset.select([i for i in range(len(dataset)) if i not in held_set]), dataset.select(held)


def pack_examples(dataset: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Examples in their order, each appended to the current row while it fits in `max_length` tokens."""
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []

    def close_row() -> None:
        if ids:
            rows["input_ids"].append(ids.copy())
            rows["labels"].append(labels.copy())
            rows["position_ids"].append(positions.copy())
            for part in (ids, labels, positions):
                part.clear()

    for example in dataset:
        new_ids, new_labels = example["input_ids"], example["labels"]
        if len(ids) + len(new_ids) > max_length:
            close_row()
        if ids:  # predicted from the previous example's last token: not a target
            new_labels = [IGNORE_INDEX, *new_labels[1:]]
        ids.extend(new_ids)
        labels.extend(new_labels)
        positions.extend(range(len(new_ids)))
    close_row()
    return datasets.Dataset.from_dict(rows, features=PACKED_FEATURES)
