"""Run under torchrun by tests/e2e/test_launchers.py: rank 1's layer sampler gets another seed after start-up (as a
rank with a different config would), then training must stop with the agreement error on every rank.

    torchrun --nproc-per-node 2 tests/distributed/drivers/seed_mismatch_driver.py OUT_DIR [--section.key=value ...]
"""

from __future__ import annotations

import sys

from lisa_dist.config import load_config
from lisa_dist.run import build, train_step


def main() -> None:
    cfg = load_config(None, sys.argv[2:])
    run = build(cfg)
    if run.backend.rank == 1:
        run.sampler.seed += 1000  # after the seed broadcast, so nothing repairs it
    for step in range(cfg.train.steps):
        train_step(run, step)


if __name__ == "__main__":
    main()
