"""Run under torchrun by tests/distributed/test_deepspeed.py: many LISA switches on one DeepSpeed run, counting
what survives.

    torchrun --nproc-per-node 2 tests/distributed/drivers/ds_leak_driver.py OUT_DIR SWITCHES [--section.key=value ...]

Writes OUT_DIR/rank{R}.json with, after switches 1, 2, 10, 25 and the last, the forward/backward hooks on the model's
modules and the live DeepSpeed engines and ZeRO optimizers (counted through the garbage collector), and the engines
alive right after the switch, before this driver collects anything.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from lisa_dist.config import load_config
from lisa_dist.run import build, train_step


def hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def live() -> tuple[int, int]:
    objects = gc.get_objects()
    engines = sum(isinstance(o, DeepSpeedEngine) for o in objects)
    return engines, sum(isinstance(o, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)) for o in objects)


def main() -> None:
    out, switches = Path(sys.argv[1]), int(sys.argv[2])
    cfg = load_config(None, sys.argv[3:])
    run = build(cfg)
    counts = []
    for i in range(switches):
        run.backend.activate(run.sampler.active_layers(i))
        # Before any collection of ours: the switch itself must have freed the old engine before building the new.
        engines_after_switch = live()[0]
        if i % 10 == 0:  # a real step now and then, so every engine has had gradients and Adam state
            run.period = i
            train_step(run, i * cfg.lisa.interval)
        if i in (0, 1, 9, 24, switches - 1):
            gc.collect()
            engines, optimizers = live()
            counts.append(
                {
                    "switch": i + 1,
                    "hooks": hooks(run.backend.model),
                    "engines": engines,
                    "optimizers": optimizers,
                    "engines_after_switch": engines_after_switch,
                }
            )
    (out / f"rank{run.backend.rank}.json").write_text(json.dumps({"counts": counts}))
    run.backend.close()


if __name__ == "__main__":
    main()
