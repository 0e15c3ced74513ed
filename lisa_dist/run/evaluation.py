"""The evaluation loss: the mean next-token loss over every supervised token of the evaluation set, all ranks'.

The set is cut into micro-batches of train.micro_batch_size in its own order, a function of the set alone, and the
batches are dealt round-robin to the ranks. So one process and W ranks compute the same per-batch sums (bitwise in
fp32 where training is), and add them in fp64. Every rank runs the same number of forwards (a backend's forward is
a collective under FSDP and ZeRO-3): a rank without a batch in the last round runs one with no supervised token.
"""

from __future__ import annotations

import math
import time
from typing import Any

import datasets
import torch

from lisa_dist.data import collate_rows
from lisa_dist.models import IGNORE_INDEX, supervised_tokens


class EvalSet:
    """This rank's evaluation micro-batches (`max_batches` > 0: only the set's first that many)."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        pad_id: int,
        max_batches: int = 0,
        flatten: bool = False,
    ) -> None:
        self.dataset, self.micro, self.pad_id, self.flatten = dataset, micro_batch_size, pad_id, flatten
        count = math.ceil(len(dataset) / micro_batch_size)
        self.num_batches = min(count, max_batches) if max_batches else count
        self.mine = list(range(rank, self.num_batches, world_size))
        self.rounds = math.ceil(self.num_batches / world_size)

    def batches(self) -> list[dict[str, torch.Tensor]]:
        out = [self._batch(b) for b in self.mine]
        while len(out) < self.rounds:  # no batch left for this rank: a forward without loss, like the others'
            empty = self._batch(0)
            empty["labels"].fill_(IGNORE_INDEX)
            out.append(empty)
        return out

    def _batch(self, index: int) -> dict[str, torch.Tensor]:
        rows = self.dataset[index * self.micro : min((index + 1) * self.micro, len(self.dataset))]
        return collate_rows(rows, self.pad_id, self.flatten)


def evaluate(run: Any, steps_done: int) -> dict[str, Any]:
    """Collective: the eval record after `steps_done` steps, with the model in eval mode and no gradients."""
    backend, start = run.backend, time.perf_counter()
    model = backend.model
    was_training = model.training
    model.eval()
    # The loss sums stay on the device (one read, at the reduction): no host sync per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=backend.device)
    tokens = 0
    try:
        with torch.no_grad():
            for batch in run.eval_set.batches():
                tokens += supervised_tokens(batch)  # from the host copy, before the batch moves
                loss_sum += backend.eval_loss_sum(batch).double()
    finally:
        model.train(was_training)
    total = backend.all_reduce_sum(
        torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64, device=backend.device)])
    )
    summed, counted = total.tolist()  # the one read of the device
    loss = summed / counted if counted else float("nan")
    return {
        "step": steps_done,
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 80.0)),
        "eval_tokens": int(counted),
        "eval_batches": run.eval_set.num_batches,
        "tokens": run.tokens_seen,
        "eval_s": time.perf_counter() - start,
    }
