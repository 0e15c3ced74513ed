"""Run under torchrun by tests/test_fsdp.py: trains with the given overrides and writes what each rank saw.

    torchrun --standalone --nproc-per-node 2 tests/fsdp_driver.py OUT_DIR [--section.key=value ...]

Per rank: OUT_DIR/rank{R}.json with per-step losses, optimizer-state bytes against the expected local shard bytes,
and whether frozen layers stayed unchanged without gradients. Rank 0 also writes the gathered final weights
(weights.pt), a Hugging Face export (hf/) and the sharded model's logits on a fixed input (logits.pt).
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from lisa_dist.config import load_config
from lisa_dist.trainer import build, train_step

FP32 = 4


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def step_checks(run, before: dict[str, torch.Tensor]) -> dict:
    active_names = {n for n, _ in run.trainable.layer_params(run.active)}
    frozen_ok = True
    for layer in run.trainable.layers:
        for name, p in layer:
            if name in active_names:
                continue
            # A block stored in bf16 while frozen was rounded once, at the switch that froze it: compare in its dtype.
            same = torch.equal(local(p.detach()), before[name].to(p.dtype))
            frozen_ok &= same and p.grad is None and not p.requires_grad
    expected = sum(local(p).numel() for _, p in run.trainable.always + run.trainable.layer_params(run.active))
    dtypes = sorted({str(p.dtype) for i in range(len(run.trainable.layers)) if i not in run.active
                     for _, p in run.trainable.layers[i]})
    return {"frozen_ok": frozen_ok, "expected_bytes": 2 * FP32 * expected, "frozen_dtypes": dtypes,
            "active_dtypes": sorted({str(p.dtype) for _, p in run.trainable.layer_params(run.active)})}


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config(None, sys.argv[2:])
    run = build(cfg)
    rank = run.backend.rank
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps = []
    for step in range(cfg.train.steps):
        before = {n: local(p.detach()).clone() for layer in run.trainable.layers for n, p in layer}
        record = train_step(run, step)
        record.update(step_checks(run, before))
        steps.append(record)
    result = {"rank": rank, "steps": steps, "peak_rss_after_load": rss_after_load,
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    state = run.backend.full_state_dict()
    probe = torch.arange(24, dtype=torch.long).reshape(2, 12) % 200 + 5
    with torch.no_grad():
        logits = run.backend.model(input_ids=probe.to(run.backend.device)).logits.float().cpu()
    if rank == 0:
        torch.save({k: v.float() for k, v in state.items()}, out / "weights.pt")
        torch.save(logits, out / "logits.pt")
    run.backend.save_model(str(out / "hf"))
    run.backend.close()


if __name__ == "__main__":
    main()
