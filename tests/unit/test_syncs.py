"""Host reads of device results (a host sync each on CUDA) per training step and per evaluation: a fixed number,
whatever train.grad_accum is. On the CPU a read costs nothing, so `benchmarks.lib.count_syncs` counts them: every
call by lisa_dist's own code that brings a floating-point tensor's value to the host or indexes with a boolean mask.
transformers' own reads are not lisa_dist's to remove."""

import pytest

from benchmarks.lib import count_syncs
from lisa_dist.config import load_config
from lisa_dist.run import build, evaluate, train_step

from ..helpers import tiny_overrides


def _reads(tmp_path, data_file, grad_accum, *extra):
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            data_file,
            "--train.micro_batch_size=1",
            f"--train.grad_accum={grad_accum}",
            "--data.eval_fraction=0.25",
            "--train.eval_batches=6",
            *extra,
        ),
    )
    run = build(cfg)
    train_step(run, 0)  # the first step's one-off work (the first switch) out of the way
    with count_syncs(run.backend.device) as reads:
        train_step(run, 1)  # a step inside a period: no switch
        steps = reads.take()
        evaluate(run, 2)
        evals = reads.take()
    return steps, evals


@pytest.mark.parametrize(
    "extra",
    [(), ("--train.loss=chunked", "--train.loss_chunk_tokens=16"), ("--lisa.strategy=grad_norm",)],
    ids=["plain", "chunked", "grad_norm"],
)
def test_a_step_reads_the_device_a_fixed_number_of_times_whatever_grad_accum(tmp_path, data_file, extra):
    one, eval_one = _reads(tmp_path / "one", data_file, 1, *extra)
    eight, eval_eight = _reads(tmp_path / "eight", data_file, 8, *extra)
    assert len(eight) == len(one), (one, eight)
    assert len(one) <= 4, one  # the loss on a logging step, the gradient norm, and grad_norm's per-layer norms
    assert len(eval_one) == len(eval_eight) <= 2, (eval_one, eval_eight)  # the reduced sums, not one per batch
