"""Run under torchrun by tests/test_comm.py: 2 steps of full fine-tuning and 2 of LISA on FSDP, counting the
collectives of every step; each rank writes OUT_DIR/rank{R}.json.

    torchrun --standalone --nproc-per-node 2 tests/comm_driver.py OUT_DIR [--section.key=value ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lisa_dist.comm import count_collectives
from lisa_dist.config import load_config
from lisa_dist.trainer import build, train_step


def main(out: Path, overrides: list[str]) -> None:
    result: dict = {"groups": set()}
    for method, extra in (("full", ["--lisa.enabled=false"]), ("lisa", [])):
        run = build(load_config(None, overrides + extra))
        result[method] = []
        for step in range(run.cfg.train.steps):
            with count_collectives() as comm:
                train_step(run, step)
            result[method].append({"calls": comm.calls, "bytes": comm.bytes})
            result["groups"].update(comm.by_group())
    result["groups"] = sorted(result["groups"])
    value = torch.ones(3)
    with count_collectives() as comm:
        dist.all_reduce(value, async_op=True).wait()
    result["async_all_reduce"] = {"calls": comm.calls["all_reduce"], "bytes": comm.bytes["all_reduce"],
                                  "value": value.tolist()}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    run.backend.close()  # leave the process group together: an exit with gloo's threads alive can abort


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
