"""The chunked loss (head and cross-entropy over chunks of supervised tokens, recomputed in backward) equals the
plain loss in value and gradients, in fp32, within 1e-6; the full logits never exist."""

import pytest
import torch

from lisa_dist.config import load_config
from lisa_dist.models import IGNORE_INDEX, build_preset, lm_loss_sum
from lisa_dist.run import build, train_step

from ..helpers import tiny_overrides, write_text_data


def tiny_model(tied=False):
    model, _ = build_preset("tiny-llama", {"num_hidden_layers": 2, "hidden_size": 64, "tie_word_embeddings": tied})
    return model


def batch(seed=1, supervised=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (3, 40), generator=g)
    labels = ids.clone()
    labels[:, :7] = IGNORE_INDEX  # a prompt
    labels[2, 30:] = IGNORE_INDEX  # padding
    if not supervised:
        labels[:] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, b, chunk):
    model.zero_grad(set_to_none=True)
    loss = lm_loss_sum(model, b, chunk)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk, tied", [(1, False), (17, False), (10_000, False), (17, True)])
def test_chunked_loss_equals_the_plain_loss_with_its_gradients(chunk, tied):
    model = tiny_model(tied)
    plain, plain_grads = loss_and_grads(model, batch(), 0)
    chunked, chunked_grads = loss_and_grads(model, batch(), chunk)
    assert torch.allclose(chunked, plain, rtol=1e-6, atol=0)
    assert plain_grads.keys() == chunked_grads.keys() and len(plain_grads) == len(list(model.parameters()))
    for name, grad in plain_grads.items():  # the same up to fp32 rounding of a sum taken in another order
        assert (chunked_grads[name] - grad).norm() <= 1e-6 * grad.norm(), name
    assert type(model.lm_head).forward is model.lm_head.forward.__func__  # the head is itself again


def test_a_micro_batch_without_supervised_tokens_still_reaches_the_head():
    model = tiny_model()
    loss, grads = loss_and_grads(model, batch(supervised=False), 8)
    assert float(loss) == 0.0
    assert torch.count_nonzero(grads["lm_head.weight"]) == 0  # a zero gradient, present on every rank


def test_the_chunks_hold_only_their_logits():
    """Autograd saves no tensor of the full logits' size: the head's output exists one chunk at a time."""
    model = tiny_model()
    b = batch()
    vocab = model.config.vocab_size
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss_sum(model, b, 16)
    supervised = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert max(sizes) < supervised * vocab
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss_sum(model, b, 0)
    assert max(sizes) >= 3 * 39 * vocab  # the plain loss saves the full logits


def test_training_with_the_chunked_loss_follows_the_plain_loss(tmp_path):
    data = write_text_data(tmp_path / "data.jsonl")
    runs = {}
    for loss in ("plain", "chunked"):
        cfg = load_config(
            None, tiny_overrides(tmp_path / loss, data, f"--train.loss={loss}", "--train.loss_chunk_tokens=50")
        )
        run = build(cfg)
        runs[loss] = [train_step(run, s)["loss"] for s in range(4)]
    assert runs["chunked"] == pytest.approx(runs["plain"], rel=1e-6)


def test_an_instance_level_head_forward_is_put_back():
    """accelerate's hooks install their own forward on a module instance: the chunked loss restores it."""
    model = tiny_model()
    head = model.lm_head
    own = head.forward  # the class's, bound
    head.forward = lambda hidden: own(hidden)
    installed = head.forward
    lm_loss_sum(model, batch(), 16)
    assert head.__dict__["forward"] is installed
