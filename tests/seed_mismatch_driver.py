"""Run under torchrun by tests/test_launchers.py: rank 1's layer sampler gets another seed after start-up (as a
rank with a different config would), then training must stop with the agreement error on every rank.

    torchrun --standalone --nproc-per-node 2 tests/seed_mismatch_driver.py OUT_DIR [--section.key=value ...]
"""
from __future__ import annotations

import sys

from lisa_dist.config import load_config
from lisa_dist.trainer import build, train_step


def main() -> None:
    cfg = load_config(None, sys.argv[2:])
    run = build(cfg)
    if run.backend.rank == 1:
        run.sampler.seed += 1000  # after the seed broadcast, so nothing repairs it
    for step in range(cfg.train.steps):
        train_step(run, step)


if __name__ == "__main__":
    main()
