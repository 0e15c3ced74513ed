"""Host reads of device results (a host sync each on CUDA) per training step and per evaluation: a fixed number,
whatever train.grad_accum is. On the CPU a read costs nothing, so the test counts them instead: every call by
lisa_dist's own code that brings a floating-point tensor's value to the host (`float()`, `.item()`, `.tolist()`,
`.cpu()`, ...) or indexes with a boolean mask (which reads the mask's count). Integer tensors are the host copies of
batches and counts; transformers' own reads are not lisa_dist's to remove."""
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lisa_dist.config import load_config
from lisa_dist.run import build, evaluate, train_step

from ..helpers import tiny_overrides

PACKAGE = str(Path(__file__).resolve().parents[2] / "lisa_dist")
READS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__", "__bool__", "nonzero"}
TORCH = str(Path(torch.__file__).parent)


class DeviceReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.where: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        masked = name == "__getitem__" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                               for a in _flat(args[1:]))
        if (name in READS or masked) and isinstance(first, torch.Tensor) and first.is_floating_point():
            caller = _caller()
            if caller is not None:
                self.where.append(caller)
        return func(*args, **(kwargs or {}))


def _flat(items):
    for item in items:
        if isinstance(item, (tuple, list)):
            yield from _flat(item)
        else:
            yield item


def _caller() -> str | None:
    """The first frame outside torch: lisa_dist's (file:line), or None for another library's read."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(PACKAGE):
        return None
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


def _reads(tmp_path, data_file, grad_accum, *extra):
    cfg = load_config(None, tiny_overrides(tmp_path, data_file, "--train.micro_batch_size=1",
                                           f"--train.grad_accum={grad_accum}", "--data.eval_fraction=0.25",
                                           "--train.eval_batches=6", *extra))
    run = build(cfg)
    train_step(run, 0)  # the first step's one-off work (the first switch) out of the way
    with DeviceReads() as mode:
        train_step(run, 1)  # a step inside a period: no switch
        steps = list(mode.where)
        mode.where.clear()
        evaluate(run, 2)
        evals = list(mode.where)
    return steps, evals


@pytest.mark.parametrize("extra", [(), ("--train.loss=chunked", "--train.loss_chunk_tokens=16"),
                                   ("--lisa.strategy=grad_norm",)], ids=["plain", "chunked", "grad_norm"])
def test_a_step_reads_the_device_a_fixed_number_of_times_whatever_grad_accum(tmp_path, data_file, extra):
    one, eval_one = _reads(tmp_path / "one", data_file, 1, *extra)
    eight, eval_eight = _reads(tmp_path / "eight", data_file, 8, *extra)
    assert len(eight) == len(one), (one, eight)
    assert len(one) <= 4, one  # the loss on a logging step, the gradient norm, and grad_norm's per-layer norms
    assert len(eval_one) == len(eval_eight) <= 2, (eval_one, eval_eight)  # the reduced sums, not one per batch
