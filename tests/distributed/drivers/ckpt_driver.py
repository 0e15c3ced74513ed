"""Run under torchrun by the checkpoint tests: part of a run, a checkpoint, then (another launch) the rest.

    torchrun ... ckpt_driver.py OUT_DIR save STEPS [--section.key=value ...]  # STEPS steps, then save
    torchrun ... ckpt_driver.py OUT_DIR resume [--section.key=value ...]  # resume to train.steps

Rank 0 writes OUT_DIR/<mode>.json with the first step it trained and the losses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lisa_dist.config import load_config
from lisa_dist.run import build, save, train_step


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    stop = int(sys.argv[3]) if mode == "save" else None
    cfg = load_config(None, sys.argv[4 if mode == "save" else 3 :])
    run = build(cfg)
    last = stop if stop is not None else cfg.train.steps
    losses = [train_step(run, step)["loss"] for step in range(run.start_step, last)]
    if stop is not None:
        save(run, stop)
    if run.backend.is_main:
        (out / f"{mode}.json").write_text(json.dumps({"first": run.start_step, "losses": losses}))
    run.backend.close()


if __name__ == "__main__":
    main()
