"""Run under torchrun by tests/test_deepspeed.py: a DeepSpeed checkpoint round trip in the middle of a LISA period.

    torchrun ... tests/ds_ckpt_driver.py OUT_DIR save|load SAVE_AFTER [--section.key=value ...]

save: trains every step, writes a DeepSpeed checkpoint after step SAVE_AFTER, records all losses.
load: builds a fresh run, activates the layers of step SAVE_AFTER, loads the checkpoint, trains the remaining steps.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lisa_dist.config import load_config
from lisa_dist.trainer import build, maybe_switch, train_step


def main() -> None:
    out, mode, save_after = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    cfg = load_config(None, sys.argv[4:])
    run = build(cfg)
    ckpt = str(out / "ckpt")
    if mode == "save":
        losses = []
        for step in range(cfg.train.steps):
            losses.append(train_step(run, step)["loss"])
            if step == save_after:
                run.backend.save_checkpoint(ckpt, {"step": step + 1})
        first = 0
    else:
        maybe_switch(run, save_after)
        first = run.backend.load_checkpoint(ckpt)["step"]
        losses = [train_step(run, step)["loss"] for step in range(first, cfg.train.steps)]
    if run.backend.is_main:
        (out / f"{mode}.json").write_text(json.dumps({"first": first, "losses": losses}))
    run.backend.close()


if __name__ == "__main__":
    main()
