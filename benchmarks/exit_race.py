"""The abort at exit, made frequent: the gloo collectives a run ends with, then exit while the group is still held.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python benchmarks/exit_race.py [--lisa-dist] &
    RANK=1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python benchmarks/exit_race.py [--lisa-dist]

Each rank runs a few all-reduces of tensors Python created (as the loss reductions and object gathers do), keeps a
reference to the default group (as FSDP's mesh, DeepSpeed's groups and accelerate do) and destroys the process
group, then exits. Plain torch (the default) aborts now and then: a gloo worker releasing the last tensor after the
interpreter began to finalize. With `--lisa-dist` the group is started and left through lisa_dist.dist
(`init_distributed` and `shutdown`), which wait for idle gloo workers first (lisa_dist/teardown.py).
`benchmarks/exit_stress.py --paths gloo-race gloo-race-lisa-dist` counts the aborts of each.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def main() -> None:
    through_lisa_dist = "--lisa-dist" in sys.argv[1:]
    if through_lisa_dist:
        from lisa_dist.dist import init_distributed, shutdown

        init_distributed("cpu")
    else:
        dist.init_process_group("gloo")
    for _ in range(20):
        dist.all_reduce(torch.ones(4096))
    works = [dist.all_reduce(torch.ones(1024), async_op=True) for _ in range(8)]
    for work in works:
        work.wait()
    del works
    held = dist.group.WORLD  # noqa: F841 - kept alive to the end, as the libraries do
    if through_lisa_dist:
        shutdown()
    else:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
