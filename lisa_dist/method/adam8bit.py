"""8-bit Adam moments from torchao (`torchao.optim.AdamW8bit`: blockwise-quantized exp_avg and exp_avg_sq).

torchao quantizes the state of every param of at least 4,096 elements. `adamw_8bit` keeps that for the
always-trained params and, with `layers_too`, for the active layers; otherwise the layers' moments stay fp32 (their
state is dropped at each switch anyway). The choice is made per param when its state is created, so one optimizer
serves both, and the LISA switch swaps its layer groups as for torch's AdamW.
"""

from __future__ import annotations

from typing import cast

import torch


def adamw_8bit(groups: list[dict], layers_too: bool, layer_role: str, **kwargs) -> torch.optim.Optimizer:
    """AdamW8bit over `groups`; the groups whose "role" is `layer_role` get 8-bit moments only with `layers_too`."""
    from torchao.optim import AdamW8bit

    class LisaAdamW8bit(AdamW8bit):
        """AdamW8bit whose layer groups keep fp32 moments unless `layers_too`."""

        def _new_buffer(self, p: torch.Tensor, signed: bool) -> torch.Tensor:
            if not layers_too and id(p) in self._layer_param_ids():
                local = p.to_local() if hasattr(p, "to_local") else p
                out = torch.zeros_like(local)
                if hasattr(p, "to_local"):
                    from torch.distributed.tensor import DTensor

                    sharded = cast(DTensor, p)
                    out = DTensor.from_local(
                        out, sharded.device_mesh, sharded.placements, run_check=False, shape=p.shape, stride=p.stride()
                    )
                return out
            return super()._new_buffer(p, signed)

        def step(self, closure=None):
            # torchao compiles its update per state type and shape. AOT autograd's on-disk cache keys a DTensor by
            # its outer metadata only, so ranks of one machine whose shards of the same param differ (8-bit on one,
            # fp32 on another: uneven shards) would load each other's compiled code: keep that cache off here.
            with torch._functorch.config.patch(enable_autograd_cache=False):
                return super().step(closure)

        def _layer_param_ids(self) -> set[int]:
            return {id(q) for g in self.param_groups if g.get("role") == layer_role for q in g["params"]}

    return LisaAdamW8bit(groups, **kwargs)
