"""Run under torchrun by tests/test_comm.py: steps of full fine-tuning and of LISA on FSDP, counting the
collectives of every step and of its LISA switch apart; each rank writes OUT_DIR/rank{R}.json.

    torchrun --nproc-per-node 2 tests/distributed/drivers/comm_driver.py OUT_DIR [--section.key=value ...]
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch.distributed as dist

from benchmarks.lib import count_collectives
from lisa_dist.config import load_config
from lisa_dist.run import build, maybe_switch, train_step


def main(out: Path, overrides: list[str]) -> None:
    result: dict = {"groups": set()}
    run = None
    for method, extra in (("full", ["--lisa.enabled=false"]), ("lisa", [])):
        del run
        gc.collect()  # the first model and its FSDP state go before the second is built
        run = build(load_config(None, overrides + extra))
        result[method] = []
        for step in range(run.cfg.train.steps):
            before = run.active
            with count_collectives() as switch:  # the LISA switch alone (train_step then finds it done)
                switched = maybe_switch(run, step)
            with count_collectives() as comm:
                train_step(run, step)
            result[method].append(
                {
                    "calls": comm.calls,
                    "bytes": comm.bytes,
                    "switched": switched,
                    "changed": sorted(set(before) ^ set(run.active)),
                    "switch_bytes": switch.bytes,
                }
            )
            result["groups"].update(comm.by_group())
    result["groups"] = sorted(result["groups"])
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    run.backend.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
