"""Bytes counted by benchmarks.lib.comm on 2 FSDP ranks (drivers/comm_driver.py) against the bytes derived from
the model's shapes: full fine-tuning reduce-scatters every param's gradient, LISA only the active layer's and the
always-trained ones."""

import torch.distributed as dist

from benchmarks.lib import count_collectives

from ..helpers import rank_results, tiny_overrides, torchrun, write_text_data

FP32 = 4
WORLD = 2
# tiny_overrides' Llama: byte vocabulary 261, width 64, MLP 128, 2 key/value heads of 16, 4 layers; LISA gamma 1.
VOCAB, HIDDEN, MLP, KV, LAYERS = 261, 64, 128, 32, 4


def padded(rows: int, cols: int = 1) -> int:
    """Elements FSDP2 reduce-scatters for a (rows, cols) param: dim 0 padded to a multiple of the world size."""
    return -(-rows // WORLD) * WORLD * cols


LAYER = 2 * padded(HIDDEN, HIDDEN) + 2 * padded(KV, HIDDEN) + 3 * padded(MLP, HIDDEN) + 2 * padded(HIDDEN)
ALWAYS = 2 * padded(VOCAB, HIDDEN) + padded(HIDDEN)  # embeddings, LM head (261 rows -> 262), final norm


def test_fsdp_reduce_scatter_bytes(tmp_path):
    originals = dist.all_reduce, dist.distributed_c10d.all_gather_single
    with count_collectives():
        assert dist.all_reduce is not originals[0]
    assert (dist.all_reduce, dist.distributed_c10d.all_gather_single) == originals

    data = write_text_data(tmp_path / "text.jsonl")
    torchrun(
        "comm_driver.py",
        [str(tmp_path), *tiny_overrides(tmp_path, data, "--backend.name=fsdp", "--train.steps=6", "--lisa.interval=1")],
    )
    for res in rank_results(tmp_path):
        # A switch re-runs FSDP2's lazy init (an unshard) only for the blocks whose trainability changed: it gathers
        # those blocks' params, not the whole model (the first activation still initialises every unit).
        # Besides, every switch all-gathers the ranks' choice of layers (a pickled tuple, under 1 KB).
        lisa = res["lisa"]
        assert lisa[0]["switch_bytes"]["all_gather"] >= FP32 * (ALWAYS + LAYERS * LAYER)
        assert any(len(step["changed"]) == 2 for step in lisa[1:])
        for step in lisa[1:]:
            blocks = FP32 * LAYER * len(step["changed"])
            assert 0 < step["switch_bytes"]["all_gather"] - blocks < 1024, step
        for step in res["full"][:2]:
            assert step["bytes"]["reduce_scatter"] == FP32 * (ALWAYS + LAYERS * LAYER)
            assert step["calls"]["reduce_scatter"] == LAYERS + 2  # every block, [norm, head], root
        for step in res["lisa"][:2]:
            assert step["bytes"]["reduce_scatter"] == FP32 * (ALWAYS + 1 * LAYER)
            assert step["calls"]["reduce_scatter"] == 1 + 2
        assert res["groups"] == [[0, 1]]
