"""With lisa.train_embeddings=false nothing below the lowest active layer needs a gradient: autograd never runs
backward through those blocks, with and without activation checkpointing (timing: benchmarks/backward_skip.py)."""

import pytest
import torch

from lisa_dist.config import load_config
from lisa_dist.run import build, train_step

from ..helpers import TIED, tiny_overrides, write_text_data


@pytest.mark.parametrize("ac", [False, True], ids=["plain", "activation-checkpointing"])
def test_no_backward_below_the_lowest_active_layer(tmp_path, ac):
    data = write_text_data(tmp_path / "data.jsonl")
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            data,
            "--lisa.train_embeddings=false",
            "--lisa.strategy=fixed",
            "--lisa.fixed_layers=[2]",
            "--train.steps=1",
            f"--train.activation_checkpointing={str(ac).lower()}",
        ),
    )
    run = build(cfg)
    forwards, backwards = [], []
    for i, block in enumerate(run.layout.layers):
        block.register_forward_hook(lambda m, a, out, i=i: forwards.append(i))
        block.register_full_backward_hook(lambda m, gi, go, i=i: backwards.append(i))
    train_step(run, 0)
    assert forwards == [0, 1, 2, 3]  # (checkpointing recomputes inside the block's forward, outside its hooks)
    # The active layer and the one above it; never 0 or 1. Under checkpointing transformers makes the embedding's
    # output require grad (for reentrant checkpointing only): models/ac.py turns that off.
    assert sorted(set(backwards)) == [2, 3]
    assert run.layout.embedding.weight.grad is None
    assert all(p.grad is None for i in (0, 1) for p in run.layout.layers[i].parameters())


@pytest.mark.parametrize("train_embeddings", [False, True], ids=["frozen-lookup", "paper"])
def test_a_tied_embedding_trains_as_the_head_only(tmp_path, train_embeddings):
    """Tied (SmolLM2, Qwen, Gemma): without train_embeddings the lookup takes no gradient, so backward stops at
    the lowest active layer too, while the shared matrix still learns from the head; the paper's setting trains
    both uses and sends backward through every block."""
    data = write_text_data(tmp_path / "data.jsonl")
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            data,
            f"--lisa.train_embeddings={str(train_embeddings).lower()}",
            "--lisa.strategy=fixed",
            "--lisa.fixed_layers=[2]",
            "--train.steps=1",
            TIED,
        ),
    )
    run = build(cfg)
    weight = run.layout.embedding.weight
    assert run.layout.head is None and weight is run.layout.model.get_output_embeddings().weight
    backwards = []
    for i, block in enumerate(run.layout.layers):
        block.register_full_backward_hook(lambda m, gi, go, i=i: backwards.append(i))
    lookups = []
    run.layout.embedding.register_forward_hook(lambda m, a, out: lookups.append(out.requires_grad))
    before = weight.detach().clone()
    train_step(run, 0)
    assert sorted(set(backwards)) == ([2, 3] if not train_embeddings else [0, 1, 2, 3])
    assert lookups == [train_embeddings]  # the lookup's output takes a gradient only in the paper's setting
    assert not torch.equal(weight, before)  # the head's use trained it
