"""Run under torchrun by tests/test_fsdp.py: build an FSDP run from a safetensors folder and report each rank's
peak RSS after loading, and whether its shards hold exactly the file's rows.

    torchrun --nproc-per-node 2 tests/distributed/drivers/fsdp_load_driver.py OUT_DIR [--section.key=value ...]
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from lisa_dist.config import load_config
from lisa_dist.models import SafetensorsWeights
from lisa_dist.run import build


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config(None, sys.argv[2:])
    run = build(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    source = SafetensorsWeights(cfg.model.name)
    exact, local_bytes = True, 0
    for name, param in run.backend.model.named_parameters():
        assert isinstance(param, DTensor), name
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        local = param.to_local()
        local_bytes += local.numel() * local.element_size()
        exact &= torch.equal(local, source.read_rows(name, offset[0], offset[0] + shape[0]))
    result = {"rank": run.backend.rank, "peak_rss": peak, "exact": exact, "local_param_bytes": local_bytes}
    (out / f"rank{run.backend.rank}.json").write_text(json.dumps(result))
    run.backend.close()


if __name__ == "__main__":
    main()
