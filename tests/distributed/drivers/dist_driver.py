"""Run under torchrun by tests/test_fsdp.py: trains with the given overrides and writes what each rank saw.

    torchrun --nproc-per-node 2 tests/distributed/drivers/dist_driver.py OUT_DIR [--section.key=value ...]

Per rank: OUT_DIR/rank{R}.json with per-step losses, optimizer-state bytes against the expected local shard bytes,
whether frozen layers stayed unchanged without gradients, and whether the active layers started each step from the
weights they had before its switch. With evaluation data, also the eval record
after the last step. Rank 0 also writes the gathered final weights
(weights.pt), a Hugging Face export (hf/) and the sharded model's logits on a fixed input (logits.pt).
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import sys
from pathlib import Path

import torch

from lisa_dist.backends import always_partitions
from lisa_dist.config import load_config
from lisa_dist.method import param_groups
from lisa_dist.run import build, maybe_switch, train_step
from lisa_dist.run.evaluation import evaluate
from lisa_dist.run.trainer import folder_spec

FP32 = 4


def local(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a param: its DTensor shard (FSDP), its ZeRO-3 partition, or the whole tensor."""
    if hasattr(t, "to_local"):
        return t.to_local().detach()
    return (t.ds_tensor if hasattr(t, "ds_tensor") else t).detach()


def expected_moment_numel(run) -> int:
    """Elements of Adam state this rank should hold for the always-trained and active params."""
    named = run.trainable.always + run.trainable.layer_params(run.active)
    if run.cfg.backend.name != "deepspeed":
        return sum(local(p).numel() for _, p in named)
    world = run.backend.world_size
    groups = [
        g["params"]
        for g in param_groups(run.trainable.always, run.trainable.layer_params(run.active), 0.0, drop_empty=True)
    ]
    if run.backend.stage == 3:
        # Each param is partitioned on its own, padded to a multiple of the world size.
        return sum(math.ceil(p.ds_numel / world) for group in groups for p in group)
    # ZeRO-1/2 flatten each group, padded to a multiple of 2 x world size, and give each rank an equal slice.
    align = 2 * world
    return sum(math.ceil(sum(p.numel() for p in group) / align) * align // world for group in groups)


def step_checks(run, before: dict[str, torch.Tensor]) -> dict:
    active_names = {n for n, _ in run.trainable.layer_params(run.active)}
    frozen_ok = True
    for layer in run.trainable.layers:
        for name, p in layer:
            if name in active_names:
                continue
            # A block stored in bf16 while frozen was rounded once, at the switch that froze it: compare in its dtype.
            same = torch.equal(local(p), before[name].to(p.dtype))
            frozen_ok &= same and p.grad is None and not p.requires_grad
    expected = expected_moment_numel(run)
    dtypes = sorted(
        {
            str(p.dtype)
            for i in range(len(run.trainable.layers))
            if i not in run.active
            for _, p in run.trainable.layers[i]
        }
    )
    return {
        "frozen_ok": frozen_ok,
        "expected_bytes": 2 * FP32 * expected,
        "frozen_dtypes": dtypes,
        "active_dtypes": sorted({str(p.dtype) for _, p in run.trainable.layer_params(run.active)}),
    }


def always_state(run) -> tuple[list[torch.Tensor], list[int]]:
    """DeepSpeed: this rank's fp32 master partitions of the always-trained groups and their Adam step counts."""
    backend = run.backend
    partitions = always_partitions(backend.engine)
    state = backend.engine.optimizer.optimizer.state
    return [p.detach().clone() for p in partitions], [int(state[p]["step"]) if p in state else 0 for p in partitions]


def switch_with_carry_check(run, step: int) -> dict:
    """Switch (if this step starts a period); on DeepSpeed also check that the always-trained masters and steps
    survived the rebuild of the engine."""
    if run.cfg.backend.name != "deepspeed" or run.sampler is None or run.backend.engine is None:
        return {"switched": maybe_switch(run, step)}
    masters, steps = always_state(run)
    if not maybe_switch(run, step):
        return {"switched": False}
    after_masters, after_steps = always_state(run)
    return {
        "switched": True,
        "steps_kept": steps == after_steps,
        "masters_kept": all(torch.equal(a, b) for a, b in zip(masters, after_masters, strict=True)),
    }


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config(None, sys.argv[2:])
    run = build(cfg)
    rank = run.backend.rank
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = []
    for step in range(cfg.train.steps):
        before = {n: local(p).clone() for layer in run.trainable.layers for n, p in layer}
        carry = switch_with_carry_check(run, step)
        # The active layers start from exactly the weights they had before the switch (an entering block loaded
        # from its exact copy, not from its frozen storage).
        carry["entered_ok"] = all(
            torch.equal(local(p).float(), before[n].float()) for n, p in run.trainable.layer_params(run.active)
        )
        record = train_step(run, step)
        record.update(step_checks(run, before), **carry)
        if run.cfg.backend.name == "deepspeed":
            record["always_steps"] = always_state(run)[1]
        steps.append(record)
    result = {
        "rank": rank,
        "steps": steps,
        "peak_rss_after_load": rss_after_load,
        "eval": evaluate(run, cfg.train.steps) if run.eval_set is not None else None,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    state = run.backend.full_state_dict()
    probe = torch.arange(24, dtype=torch.long).reshape(2, 12) % 200 + 5
    with torch.no_grad():
        logits = run.backend.model(input_ids=probe.to(run.backend.device)).logits.float().cpu()
    if rank == 0:
        torch.save({k: v.float() for k, v in state.items()}, out / "weights.pt")
        torch.save(logits, out / "logits.pt")
    # save_final's writer, in shards small enough that every file is filled as the ranks gather its tensors.
    run.backend.save_model(str(out / "hf"), dataclasses.replace(folder_spec(run.cfg), max_shard_bytes=100_000))
    run.backend.close()


if __name__ == "__main__":
    main()
