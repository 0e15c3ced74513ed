"""The abort at exit, made frequent: a run that ends right after gloo collectives of tensors Python created.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python -m benchmarks.exit_race [--lisa-dist] &
    RANK=1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python -m benchmarks.exit_race [--lisa-dist]

Each rank all-reduces a few tensors that only the collectives hold (as a loss reduction or an object gather leaves
them), waits for them and exits, as a Trainer script does, without destroying the process group. A gloo worker
then drops the last reference to a tensor, which needs the GIL; the long switch interval set here keeps the main
thread from handing the GIL over before the interpreter finalizes, which on a loaded machine happens by chance. The
worker then takes the GIL during finalization, CPython ends the thread inside a C++ destructor and the rank aborts
("terminate called without an active exception"). With `--lisa-dist` the group is started by
lisa_dist.dist.init_distributed, whose exit guard (lisa_dist/teardown.py) waits for idle gloo workers first.
`benchmarks/exit_stress.py --paths gloo-race gloo-race-lisa-dist` counts the aborts of each.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def main() -> None:
    if "--lisa-dist" in sys.argv[1:]:
        from lisa_dist.dist import init_distributed

        init_distributed("cpu")
    else:
        dist.init_process_group("gloo")
    for _ in range(4):
        dist.all_reduce(torch.ones(4096))
    sys.setswitchinterval(30.0)
    works = [dist.all_reduce(torch.ones(1024), async_op=True) for _ in range(64)]
    for work in works:
        work.wait()


if __name__ == "__main__":
    main()
