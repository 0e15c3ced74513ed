"""The order of the examples and each rank's micro-batches: a pure function of (seed, epoch, step), so every
rank and a resumed run agree without communicating."""

from __future__ import annotations

from collections.abc import Callable

import datasets
import torch

from lisa_dist.errors import DataError
from lisa_dist.models import IGNORE_INDEX


def collate(
    input_ids: list[list[int]], labels: list[list[int]], pad_id: int, position_ids: list[list[int]] | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: pad_id in input_ids, -100 in labels, 0 in attention_mask. Packed rows
    (`position_ids`) also get `position_ids`, their padding numbered as one more sequence of its own; the model
    then takes no attention_mask (the mask for packed rows follows from position_ids), which counts tokens only."""
    width = max(len(ids) for ids in input_ids)
    batch = {
        "input_ids": torch.full((len(input_ids), width), pad_id, dtype=torch.long),
        "labels": torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(input_ids), width), dtype=torch.long),
    }
    for i, (ids, target) in enumerate(zip(input_ids, labels, strict=True)):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        batch["labels"][i, : len(target)] = torch.tensor(target, dtype=torch.long)
        batch["attention_mask"][i, : len(ids)] = 1
    if position_ids is not None:
        batch["position_ids"] = torch.zeros((len(input_ids), width), dtype=torch.long)
        for i, positions in enumerate(position_ids):
            batch["position_ids"][i, : len(positions)] = torch.tensor(positions, dtype=torch.long)
            batch["position_ids"][i, len(positions) :] = torch.arange(width - len(positions))
    return batch


def collate_rows(rows: dict[str, list[list[int]]], pad_id: int, flatten: bool = False) -> dict[str, torch.Tensor]:
    """`collate` of a slice of the dataset (packed or not); `flatten`: packed rows as one (`flatten_packed`)."""
    batch = collate(rows["input_ids"], rows["labels"], pad_id, rows.get("position_ids"))
    return flatten_packed(batch) if flatten and "position_ids" in batch else batch


def flatten_packed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A packed micro-batch as one row of its real tokens, padding dropped (on the host). transformers reads
    position_ids as sequence boundaries for flash attention only in a batch of one row (its varlen kernel gets
    cu_seq_lens from them); with several rows each would be plain causal attention across its examples. The first
    label of every row is no target in the rows (nothing predicts it) and stays none in the one row, so the targets,
    the token counts and every example's attention are those of the rows."""
    keep = batch["attention_mask"].bool()
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX
    flat = {"input_ids": batch["input_ids"][keep], "labels": labels[keep], "position_ids": batch["position_ids"][keep]}
    flat = {k: v.unsqueeze(0) for k, v in flat.items()}
    flat["attention_mask"] = torch.ones_like(flat["input_ids"])
    return flat


class ShardedBatches:
    """One rank's micro-batches for any global optimizer step, as a pure function of the step.

    Epoch e visits the examples in the order of a permutation drawn from `seed + e`. Global step s of an epoch
    covers positions [s*G, (s+1)*G) with G = W*M*A; its k-th micro-batch round covers the next M*W positions, of
    which rank r takes the contiguous M at offset r*M. So a 1-rank run with micro batch M*W sees the same examples
    per step and per micro-batch round as W ranks with M, and a 1-rank run with micro batch M and W*A accumulation
    steps computes exactly the micro-batches the W ranks compute (the bitwise reference of a distributed run).
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        *,
        seed: int,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        grad_accum: int,
        pad_id: int = 0,
        flatten: bool = False,
        order: Callable[[int], torch.Tensor] | None = None,
        epoch_size: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if micro_batch_size < 1 or grad_accum < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} and grad_accum={grad_accum} must be >= 1")
        self.dataset = dataset
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.pad_id = pad_id
        self.flatten = flatten
        """Packed rows: each micro-batch as one row (`flatten_packed`, for flash attention)."""
        self.order = order
        """Instead of a uniform permutation: epoch -> the dataset indices of that epoch (`epoch_size` of them; a
        data.mixture's weighted draws)."""
        self.num_examples = epoch_size if order is not None else len(dataset)
        self.global_batch = world_size * micro_batch_size * grad_accum
        self.steps_per_epoch = self.num_examples // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the dataset has {self.num_examples} examples but one global batch needs "
                f"world_size*micro_batch_size*grad_accum = {world_size}*{micro_batch_size}*{grad_accum}"
                f" = {self.global_batch}"
            )
        self._cached: tuple[int, torch.Tensor] | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of all examples in `epoch`, identical on every rank."""
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = (
                self.order(epoch) if self.order is not None else torch.randperm(self.num_examples, generator=generator)
            )
            self._cached = (epoch, order)
        return self._cached[1]

    def step_indices(self, step: int) -> list[list[int]]:
        """Dataset indices of this rank's `grad_accum` micro-batches for global optimizer step `step`."""
        if step < 0:
            raise ValueError(f"step {step} is negative")
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.permutation(epoch)
        m = self.micro_batch_size
        micro = []
        for k in range(self.grad_accum):
            first = within * self.global_batch + (k * self.world_size + self.rank) * m
            micro.append(order[first : first + m].tolist())
        return micro

    def step_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's `grad_accum` collated micro-batches (input_ids, labels, attention_mask) for `step`."""
        batches = []
        for indices in self.step_indices(step):
            batches.append(collate_rows(self.dataset[indices], self.pad_id, self.flatten))
        return batches
