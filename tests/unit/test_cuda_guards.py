"""CPU guards for what the CUDA reading found (../shared/probes/cuda-reading-1.md): each fails here if its defect
comes back, without a GPU."""

import pytest
import torch

from lisa_dist import dist as lisa_dist_dist
from lisa_dist.config import load_config
from lisa_dist.errors import ConfigError
from lisa_dist.method import clip_grad_norm
from lisa_dist.models import lm_loss_sum, to_device
from lisa_dist.run import build, save, train_step

from ..helpers import DEMO_DATA, tiny_overrides


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_micro_batches_go_to_flash_attention_as_one_row_with_the_same_losses(tmp_path, attn):
    """transformers reads position_ids as boundaries for flash attention only in a one-row batch: a packed
    micro-batch of several rows becomes one row of its real tokens. The same targets, token counts and loss as the
    rows (checked here under sdpa and eager, which read the boundaries either way)."""
    from lisa_dist.data import collate_rows, flatten_packed
    from lisa_dist.models import supervised_tokens

    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            DEMO_DATA,
            "--data.format=alpaca",
            "--data.packing=true",
            "--data.max_length=512",
            "--data.skip_bad_rows=true",
            f"--model.attn_implementation={attn}",
        ),
    )
    run = build(cfg)
    rows = run.batches.dataset[:4]
    batch = collate_rows(rows, run.tokenizer.pad_token_id)
    flat = flatten_packed(batch)
    assert flat["input_ids"].shape == (1, int(batch["attention_mask"].sum())) < batch["input_ids"].shape
    assert supervised_tokens(flat) == supervised_tokens(batch)
    model = run.backend.model.eval()
    with torch.no_grad():
        assert torch.allclose(lm_loss_sum(model, flat), lm_loss_sum(model, batch), rtol=1e-5)
    assert collate_rows(rows, run.tokenizer.pad_token_id, flatten=True)["input_ids"].equal(flat["input_ids"])
    flash = load_config(
        None,
        [
            *tiny_overrides(tmp_path, DEMO_DATA, "--data.format=alpaca", "--data.packing=true"),
            "--model.attn_implementation=flash_attention_2",
        ],
    )
    assert flash.train.micro_batch_size == 4  # no longer refused


@pytest.mark.parametrize(
    ("visible", "local_rank", "expected"),
    [(8, 3, "cuda:3"), (1, 3, "cuda:0"), (2, 3, None)],
    ids=["one-per-rank", "one-visible-per-task", "too-few"],
)
def test_a_local_rank_gets_its_gpu_or_a_line_naming_the_variables(monkeypatch, visible, local_rank, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(visible))))
    if expected is None:
        with pytest.raises(
            ConfigError,
            match=r"local rank 3 has no GPU of its own: this process sees 2 GPUs "
            r"\(CUDA_VISIBLE_DEVICES='0,1', LOCAL_RANK=",
        ):
            lisa_dist_dist.resolve_device("auto", local_rank)
    else:
        assert str(lisa_dist_dist.resolve_device("auto", local_rank)) == expected


def test_the_test_suite_never_picks_cuda_by_accident(tmp_path):
    from ..helpers import launcher_env

    assert launcher_env()["CUDA_VISIBLE_DEVICES"] == ""
    assert load_config(None, tiny_overrides(tmp_path, tmp_path / "d.jsonl")).train.device == "cpu"


def test_a_rank_without_gradients_puts_its_zero_norm_on_the_given_device():
    seen = []

    def sum_over_shards(value):  # what FSDP all-reduces: under NCCL it must be on the rank's GPU
        seen.append(value.device)
        return torch.zeros((), dtype=torch.float64)

    param = torch.nn.Parameter(torch.ones(3))  # no gradient on this rank
    assert clip_grad_norm([param], 1.0, sum_over_shards, torch.device("meta")) == 0.0
    assert seen == [torch.device("meta")]


def test_chunked_loss_takes_its_kept_tokens_from_the_host_copy(tmp_path, data_file):
    run = build(
        load_config(None, tiny_overrides(tmp_path, data_file, "--train.loss=chunked", "--train.loss_chunk_tokens=16"))
    )
    batch = run.batches.step_batches(0)[0]
    batch["labels"][:, :5] = -100
    moved = to_device(batch, torch.device("cpu"), chunk_tokens=16)
    kept = (batch["labels"][:, 1:].reshape(-1) != -100).nonzero().squeeze(1)
    assert torch.equal(moved["kept"], kept)
    model = run.backend.model
    with torch.no_grad():
        assert torch.allclose(lm_loss_sum(model, moved, 16), lm_loss_sum(model, moved, 0), rtol=1e-5)


def test_resume_with_quantized_storage_loads_the_exact_model_to_host_memory(tmp_path, data_file, monkeypatch):
    run = build(
        load_config(None, tiny_overrides(tmp_path, data_file, "--lisa.frozen_storage=nf4", "--train.precision=bf16"))
    )
    train_step(run, 0)
    save(run, 1)
    loads = []
    real = torch.load

    def recording(path, *args, **kwargs):
        loads.append((str(path).rsplit("/", 1)[-1], kwargs.get("map_location")))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    resumed = build(
        load_config(None, tiny_overrides(tmp_path, data_file, "--lisa.frozen_storage=nf4", "--train.precision=bf16"))
    )
    assert resumed.start_step == 1
    assert ("model.pt", "cpu") in loads


def test_host_copies_are_page_locked_exactly_one_buffer_per_block(monkeypatch):
    """torch's pinned allocator rounds each allocation up to a power of two; a block's host copies are one buffer
    registered with its exact byte count, unregistered when it goes (the planner counts exactly those bytes)."""
    import gc

    from lisa_dist.method import HostBuffer, PinnedShards, pinned

    registered: dict[int, int] = {}
    monkeypatch.setattr(pinned, "_register", lambda ptr, nbytes: registered.__setitem__(ptr, nbytes))
    monkeypatch.setattr(pinned, "_unregister", registered.pop)
    shapes = [torch.Size([192, 64]), torch.Size([64, 64]), torch.Size([3, 100])]  # 12,288 + 4,096 + 300 elements
    buffer = HostBuffer(shapes, torch.bfloat16, pin=True)
    assert [v.shape for v in buffer.views] == shapes
    assert registered == {buffer.flat.data_ptr(): 16_684 * 2} == {buffer.flat.data_ptr(): buffer.nbytes()}
    buffer.flat.zero_()
    buffer.views[1].fill_(1.0)
    assert buffer.flat[12_288:16_384].eq(1).all() and buffer.flat.eq(1).sum() == 4_096
    del buffer
    gc.collect()
    assert registered == {}
    assert HostBuffer(shapes, torch.float32, pin=False) and registered == {}  # the CPU: nothing registered

    shards, tensors = PinnedShards(), [torch.zeros(1000), torch.zeros(10, 10, dtype=torch.bfloat16)]
    shards.pin(7, tensors)
    assert sorted(registered.values()) == [200, 4000]
    shards.unpin(7)
    shards.unpin(7)  # a block never pinned (the CPU) or already unpinned: nothing to do
    assert registered == {}


def test_host_copies_stay_pageable_when_cuda_refuses_to_lock_them(monkeypatch, caplog):
    from lisa_dist.method import HostBuffer, PinnedShards, pinned

    def refuse(ptr, nbytes):
        raise RuntimeError("Registering memory failed with cudaError: 712.")

    monkeypatch.setattr(pinned, "_register", refuse)
    monkeypatch.setattr(pinned, "_warned", False)
    buffer = HostBuffer([torch.Size([8, 8])], torch.float32, pin=True)
    assert not buffer.pinned and buffer.views[0].shape == (8, 8)
    shards = PinnedShards()
    shards.pin(1, [torch.zeros(100)])
    assert shards.ptrs == {1: []}
    shards.unpin(1)  # nothing registered, nothing to unregister
    assert [r.message for r in caplog.records].count(
        "page-locking the exact host copies failed (Registering memory failed with cudaError: 712.): they stay "
        "pageable, so their copies to the GPU at LISA switches are synchronous"
    ) == 1
