"""FSDP2 backend on 2 real ranks (torchrun, gloo) against the single-process local backend on the same global batch."""

import json
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lisa_dist import cli
from lisa_dist.config import load_config
from lisa_dist.run import build, checkpoint

from ..helpers import (
    TIED,
    load_tied_export,
    local_eval,
    local_reference,
    rank_results,
    tied_param_count,
    tiny_overrides,
    torchrun,
    write_text_data,
)

WORLD = 2
MICRO = 4
# bf16 compute: logits and gradients are rounded to 8 bits of mantissa, differently on each side.
BF16_LOSS_TOL = 2e-2


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_text_data(tmp_path_factory.mktemp("data") / "text.jsonl")


def reference(tmp_path, data_file, *extra):
    return local_reference(tmp_path, data_file, *extra, micro=MICRO, world=WORLD)


def losses(records):
    return [r["loss"] for r in records]


def fsdp(tmp_path, data_file, *extra):
    out = tmp_path / "fsdp"
    out.mkdir()
    torchrun(
        "dist_driver.py",
        [
            str(out),
            *tiny_overrides(
                tmp_path / "dist", data_file, "--backend.name=fsdp", f"--train.micro_batch_size={MICRO}", *extra
            ),
        ],
    )
    return out, rank_results(out)


def check_per_rank_state(ranks):
    for result in ranks:
        for step in result["steps"]:
            assert step["optimizer_state_bytes"] == step["expected_bytes"], (result["rank"], step["step"])
            assert step["frozen_ok"], (result["rank"], step["step"])
            assert step["entered_ok"], (result["rank"], step["step"])
    # Sharded: each rank holds about half, together exactly the unsharded state.
    totals = [r["steps"][-1]["optimizer_state_bytes"] for r in ranks]
    assert 0 < min(totals) and max(totals) < sum(totals)


def test_fp32_matches_local_across_switches_and_exports(tmp_path, data_file):
    ref, ref_weights = reference(tmp_path, data_file, "--train.steps=8")
    out, ranks = fsdp(tmp_path, data_file, "--train.steps=8")
    for result in ranks:
        # fp32 is bitwise: the ranks compute the reference's micro-batches and sum their gradients in its order.
        assert losses(result["steps"]) == losses(ref)
        assert [s["active_layers"] for s in result["steps"]] == [r["active_layers"] for r in ref]
    assert sum(s["switched"] for s in ranks[0]["steps"]) == 4  # the first activation, then 3 switches
    check_per_rank_state(ranks)
    weights = torch.load(out / "weights.pt")
    assert weights.keys() == ref_weights.keys()
    for name, value in ref_weights.items():
        assert torch.equal(weights[name], value), name
    exported = AutoModelForCausalLM.from_pretrained(out / "hf")
    probe = torch.arange(24, dtype=torch.long).reshape(2, 12) % 200 + 5
    with torch.no_grad():
        logits = exported(input_ids=probe).logits
    assert torch.allclose(logits, torch.load(out / "logits.pt"), atol=1e-5, rtol=0)
    # Written a shard at a time as the ranks gathered each tensor: bitwise the reference's weights.
    files = sorted((out / "hf").glob("*.safetensors"))
    written = {k: v for f in files for k, v in load_file(f).items()}
    assert len(files) > 3 and written.keys() == ref_weights.keys()
    assert all(torch.equal(written[k], ref_weights[k]) for k in written)


def check_bitwise_local(out, ranks, ref, ref_weights):
    """Every rank's losses and trained counts are the local reference's, the gathered weights bitwise too."""
    for result in ranks:
        assert losses(result["steps"]) == losses(ref)
        assert [s["trainable_params"] for s in result["steps"]] == [r["trainable_params"] for r in ref]
    check_per_rank_state(ranks)
    weights = torch.load(out / "weights.pt")
    for name, value in ref_weights.items():
        assert torch.equal(weights[name], value), name
    return weights


@pytest.mark.parametrize("train_embeddings", ["true", "false"], ids=["paper", "head-only"])
def test_tied_embeddings_stay_one_sharded_parameter_and_export_once(tmp_path, data_file, train_embeddings):
    """head-only: lisa.train_embeddings=false on a tied model, the lookup detached inside the root unit."""
    extra = (TIED, "--train.steps=4", f"--lisa.train_embeddings={train_embeddings}")
    ref, ref_weights = reference(tmp_path, data_file, *extra)
    out, ranks = fsdp(tmp_path, data_file, *extra)
    check_bitwise_local(out, ranks, ref, ref_weights)
    exported = load_tied_export(out / "hf")
    assert sum(p.numel() for p in exported.parameters()) == tied_param_count()
    probe = torch.arange(24, dtype=torch.long).reshape(2, 12) % 200 + 5
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=probe).logits, torch.load(out / "logits.pt"), atol=1e-5, rtol=0)


def test_bf16_with_blocks_frozen_at_first_forward(tmp_path, data_file):
    # gamma=1 of 4: three blocks are frozen at the first forward and unfrozen later (the STACK.md pitfall).
    ref, _ = reference(tmp_path, data_file, "--train.precision=bf16")
    _, ranks = fsdp(tmp_path, data_file, "--train.precision=bf16")
    check_per_rank_state(ranks)
    for result in ranks:
        assert losses(result["steps"]) == pytest.approx(losses(ref), abs=BF16_LOSS_TOL, rel=0)


def test_frozen_blocks_stored_in_bf16(tmp_path, data_file):
    ref, _ = reference(tmp_path, data_file, "--train.precision=bf16")
    _, ranks = fsdp(
        tmp_path,
        data_file,
        "--train.precision=bf16",
        "--lisa.frozen_storage=bfloat16",
        "--train.activation_checkpointing=true",
    )
    check_per_rank_state(ranks)
    for result in ranks:
        for step in result["steps"]:
            assert step["frozen_dtypes"] == ["torch.bfloat16"] and step["active_dtypes"] == ["torch.float32"]
        # Frozen layers lose their low mantissa bits once: close to, not equal to, the fp32-stored run.
        assert losses(result["steps"]) == pytest.approx(losses(ref), abs=5e-2, rel=0)


def test_frozen_embeddings_and_the_chunked_loss_match_local(tmp_path, data_file):
    """lisa.train_embeddings=false (the root unit holds a frozen embedding) with train.loss=chunked (the head unit
    called once, computing the loss over chunks): the same losses and weights as the local backend, bitwise."""
    lean = ("--lisa.train_embeddings=false", "--train.loss=chunked", "--train.loss_chunk_tokens=50", "--train.steps=4")
    ref, ref_weights = reference(tmp_path, data_file, *lean)
    out, ranks = fsdp(tmp_path, data_file, *lean)
    weights = check_bitwise_local(out, ranks, ref, ref_weights)
    # The frozen embedding is the one the model was built with.
    untrained = build(load_config(None, tiny_overrides(tmp_path / "untrained", data_file)))
    assert torch.equal(weights["model.embed_tokens.weight"], untrained.backend.model.model.embed_tokens.weight)


@pytest.mark.parametrize("scale", ["0", "0.25"], ids=["always-frozen", "always-scaled"])
def test_always_lr_scale_matches_local(tmp_path, data_file, scale):
    """optim.always_lr_scale on sharded params: 0 freezes the root unit's embedding, final norm and head (they keep
    the weights the model was built with), 0.25 scales their lr; the same losses and weights as local, bitwise."""
    extra = (f"--optim.always_lr_scale={scale}", "--train.steps=4")
    ref, ref_weights = reference(tmp_path, data_file, *extra)
    out, ranks = fsdp(tmp_path, data_file, *extra)
    weights = check_bitwise_local(out, ranks, ref, ref_weights)
    untrained = build(load_config(None, tiny_overrides(tmp_path / "untrained", data_file))).backend.model
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(weights[name], untrained.get_parameter(name)) == (scale == "0"), name


@pytest.mark.slow  # about 40 s on 2 cores: make test-slow (test_memory's fsdp-adam8 checks the per-rank bytes)
def test_8bit_adam_on_sharded_params(tmp_path, data_file):
    """torchao's AdamW8bit on FSDP2's DTensor shards: its blocks are cut from each rank's shard, so the losses
    follow the local 8-bit run closely rather than bitwise (the per-rank bytes: test_memory)."""
    eight = (
        "--optim.adam_8bit=all",
        "--train.steps=4",
        '--model.config_overrides={"num_hidden_layers":4,"hidden_size":64,"vocab_size":512}',
    )
    ref, _ = reference(tmp_path, data_file, *eight)
    _, ranks = fsdp(tmp_path, data_file, *eight)
    for result in ranks:
        assert losses(result["steps"]) == pytest.approx(losses(ref), rel=1e-3)
        assert all(s["optimizer_state_bytes"] < s["expected_bytes"] for s in result["steps"])


def test_hsdp_two_replicates(tmp_path, data_file):
    ref, ref_weights = reference(tmp_path, data_file, "--train.steps=4")
    out, ranks = fsdp(tmp_path, data_file, "--backend.replicate=2", "--train.steps=4")
    for result in ranks:
        assert losses(result["steps"]) == losses(ref)
        # Replicated, not sharded: every rank holds the full state of what trains.
        for step in result["steps"]:
            assert step["optimizer_state_bytes"] == step["expected_bytes"]
    weights = torch.load(out / "weights.pt")
    for name, value in ref_weights.items():
        assert torch.equal(weights[name], value), name


def write_big_llama(folder):
    """A 551M-parameter Llama (2.2 GB in fp32) as a Hugging Face safetensors folder, filled tensor by tensor."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from lisa_dist.models import build_skeleton, byte_tokenizer

    config = LlamaConfig(
        hidden_size=1536,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    skeleton = build_skeleton(config, torch.float32)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.empty(p.shape).uniform_(-0.02, 0.02, generator=generator) for name, p in skeleton.named_parameters()
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.slow  # 37 s on 2 cores: make test-slow (make test's memory tests count each rank's shard bytes)
def test_no_rank_holds_the_whole_model_while_loading(tmp_path, data_file):
    folder = tmp_path / "big"
    folder.mkdir()
    model_bytes = write_big_llama(folder)
    out = tmp_path / "load"
    out.mkdir()
    overrides = [a for a in tiny_overrides(tmp_path, data_file) if not a.startswith("--model.")]
    torchrun("fsdp_load_driver.py", [str(out), *overrides, "--backend.name=fsdp", f"--model.name={folder}"])
    shutil.rmtree(folder)  # 2.2 GB: do not leave it to pytest's tmp retention
    ranks = rank_results(out)
    for result in ranks:
        assert result["exact"], result["rank"]
        # Each rank reads only its rows: it never holds the whole model, imports and all included.
        assert result["peak_rss"] < model_bytes, (result["peak_rss"], model_bytes)
    assert sum(r["local_param_bytes"] for r in ranks) == model_bytes


def ckpt_args(tmp_path, data_file, *extra):
    return tiny_overrides(tmp_path, data_file, "--backend.name=fsdp", *extra)


def test_exact_resume_and_export(tmp_path, data_file):
    out = tmp_path / "ckpt"
    out.mkdir()
    args = ckpt_args(tmp_path, data_file, f"--train.micro_batch_size={MICRO}")
    torchrun("ckpt_driver.py", [str(out), "save", "3", *args])
    torchrun("ckpt_driver.py", [str(out), "resume", *args])
    saved = json.loads((out / "save.json").read_text())
    resumed = json.loads((out / "resume.json").read_text())
    ref, _ = reference(tmp_path, data_file)
    assert resumed["first"] == 3
    assert saved["losses"] + resumed["losses"] == losses(ref)  # bitwise, mid-period (interval 2)
    # One process turns the sharded (DCP) checkpoint into a Hugging Face folder.
    hf = tmp_path / "hf"
    assert cli.main(["export", str(tmp_path / "run" / "checkpoints"), str(hf), "--max-shard-size=100KB"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(hf)
    assert exported.config.num_hidden_layers == 4
    # Read a few tensors at a time: bitwise what one whole load of the DCP checkpoint gives.
    whole = {"model": {k: torch.empty_like(v) for k, v in exported.state_dict().items()}}
    newest = checkpoint.checkpoints(tmp_path / "run" / "checkpoints")[0][1]
    dcp.load(whole, checkpoint_id=str(newest / "state"), no_dist=True)
    assert len(list(hf.glob("*.safetensors"))) > 3
    assert all(torch.equal(v, whole["model"][k]) for k, v in exported.state_dict().items())


def check_resume_repeats_straight_run(tmp_path, args):
    """Six steps straight, against three steps, a checkpoint and a resumed launch for the other three: bitwise."""
    straight, out = tmp_path / "straight", tmp_path / "ckpt"
    straight.mkdir()
    out.mkdir()
    torchrun(
        "ckpt_driver.py",
        [str(straight), "save", "6", *[a.replace(str(tmp_path / "run"), str(straight / "run")) for a in args]],
    )
    torchrun("ckpt_driver.py", [str(out), "save", "3", *args])
    torchrun("ckpt_driver.py", [str(out), "resume", *args])
    saved = json.loads((out / "save.json").read_text())
    resumed = json.loads((out / "resume.json").read_text())
    assert resumed["first"] == 3
    assert saved["losses"] + resumed["losses"] == json.loads((straight / "save.json").read_text())["losses"]


@pytest.mark.slow  # three launches, about 2 minutes on 2 cores: make test-slow
def test_exact_resume_with_8bit_adam_frozen_embeddings_and_the_chunked_loss(tmp_path, data_file):
    """8-bit moments (DTensor-wrapped torchao state) go through DCP: the resumed run repeats the straight one."""
    args = ckpt_args(
        tmp_path,
        data_file,
        f"--train.micro_batch_size={MICRO}",
        "--optim.adam_8bit=all",
        "--lisa.train_embeddings=false",
        "--train.loss=chunked",
        "--train.loss_chunk_tokens=50",
        '--model.config_overrides={"num_hidden_layers":4,"hidden_size":64,"vocab_size":512}',
    )
    check_resume_repeats_straight_run(tmp_path, args)


# Both in make test-slow (about 20 s each on 2 cores); make test resumes FSDP on the same world size.
@pytest.mark.parametrize(
    "before, after", [pytest.param(2, 1, marks=pytest.mark.slow), pytest.param(1, 2, marks=pytest.mark.slow)]
)
def test_resume_on_another_world_size(tmp_path, data_file, before, after):
    """DCP reshards model and optimizer state; the global batch stays 8 (micro batch 8 / world)."""
    out = tmp_path / "ckpt"
    out.mkdir()
    micro = lambda world: f"--train.micro_batch_size={8 // world}"  # noqa: E731
    torchrun("ckpt_driver.py", [str(out), "save", "3", *ckpt_args(tmp_path, data_file, micro(before))], nproc=before)
    torchrun("ckpt_driver.py", [str(out), "resume", *ckpt_args(tmp_path, data_file, micro(after))], nproc=after)
    resumed = json.loads((out / "resume.json").read_text())
    ref, _ = reference(tmp_path, data_file)
    assert resumed["first"] == 3
    # Another split of the same global batch: the same numbers up to fp32 summation order.
    assert resumed["losses"] == pytest.approx(losses(ref)[3:], abs=1e-5, rel=0)


def test_grad_norm_sampling_agrees_across_ranks_and_with_one_process(tmp_path, data_file):
    """lisa.strategy=grad_norm: each rank squares its gradient shards per layer, the sums are all-reduced, so both
    ranks (checked at every switch) and the single process draw the same layers from the same weights."""
    extra = ("--train.steps=8", "--lisa.strategy=grad_norm", "--lisa.interval=1")
    ref, _ = reference(tmp_path, data_file, *extra)
    _, ranks = fsdp(tmp_path, data_file, *extra)
    assert len({tuple(r["active_layers"]) for r in ref}) > 1
    for result in ranks:
        assert [s["active_layers"] for s in result["steps"]] == [r["active_layers"] for r in ref]
        assert losses(result["steps"]) == losses(ref)


# Layers 0 and 1 take turns (one at a time, 2 steps each); layers 2 and 3 are never sampled.
TAKE_TURNS = ("--lisa.strategy=weighted", "--lisa.weights=[1,1,0,0]", "--train.steps=6")


def check_never_sampled_bitwise(tmp_path, data_file, weights):
    """Layers 2 and 3 (never sampled) are exactly the weights the model was built with; every trained tensor moved."""
    untrained = build(load_config(None, tiny_overrides(tmp_path / "untrained", data_file))).backend.model.state_dict()
    for name, value in weights.items():
        never_trained = ".layers.2." in name or ".layers.3." in name
        assert torch.equal(value, untrained[name]) == never_trained, name


@pytest.mark.parametrize("storage", ["int8", "nf4"])
def test_quantized_frozen_blocks_on_sharded_params(tmp_path, data_file, storage):
    """int8 / NF4 frozen blocks under FSDP2: each rank's shard quantized, gathered by the block itself. Layers keep
    their exact weights through freezing and thawing (entered_ok, frozen_ok), the never-sampled ones are exported
    bitwise; int8 (per row, so the shards quantize as the whole matrix does) follows the local int8 run."""
    extra = (f"--lisa.frozen_storage={storage}", *TAKE_TURNS)
    out, ranks = fsdp(tmp_path, data_file, *extra)
    check_per_rank_state(ranks)
    check_never_sampled_bitwise(tmp_path, data_file, torch.load(out / "weights.pt"))
    full, _ = reference(tmp_path / "fp32", data_file, *TAKE_TURNS)
    ref, _ = reference(tmp_path, data_file, *extra)
    for result in ranks:
        assert [s["active_layers"] for s in result["steps"]] == [r["active_layers"] for r in ref]
        assert all(step["state_bytes"]["host"] > 0 for step in result["steps"])
        if storage == "int8":
            assert losses(result["steps"]) == pytest.approx(losses(ref), rel=1e-5)
        # Quantized frozen layers: the losses move away from the fp32-stored run's.
        assert losses(result["steps"]) != losses(full)
        assert losses(result["steps"]) == pytest.approx(losses(full), abs=5e-2)


@pytest.mark.slow  # three launches, about 30 s on 2 cores: make test-slow
def test_exact_resume_with_nf4_blocks_on_sharded_params(tmp_path, data_file):
    """DCP saves the exact shards (bf16 on the host here), the resumed run quantizes them again and repeats the
    straight run bitwise."""
    args = ckpt_args(
        tmp_path,
        data_file,
        f"--train.micro_batch_size={MICRO}",
        "--lisa.frozen_storage=nf4",
        "--lisa.host_dtype=bfloat16",
    )
    check_resume_repeats_straight_run(tmp_path, args)


def test_eval_loss_matches_local_bitwise(tmp_path, data_file):
    """The eval set's micro-batches are dealt round-robin to the ranks: the same per-batch sums as one process,
    so the eval loss over all supervised tokens is the local figure bitwise (fp32), after 4 steps and switches."""
    extra = ("--data.eval_fraction=0.1", "--train.steps=4")
    ref_losses, ref_eval = local_eval(tmp_path, data_file, *extra, micro=MICRO, world=WORLD)
    _, ranks = fsdp(tmp_path, data_file, *extra)
    for result in ranks:
        assert losses(result["steps"]) == ref_losses
        assert result["eval"]["eval_loss"] == ref_eval["eval_loss"]
        assert result["eval"]["eval_tokens"] == ref_eval["eval_tokens"] > 0


# Slow tier (44 s and 50 s on 2 cores): make test compiles on one process (tests/unit/test_compile.py).
@pytest.mark.parametrize(
    "storage", [pytest.param("float32", marks=pytest.mark.slow), pytest.param("nf4", marks=pytest.mark.slow)]
)
def test_compiled_blocks_follow_eager_local_and_switches_do_not_recompile(tmp_path, data_file, storage):
    """train.compile under FSDP2: the blocks are compiled before sharding (FSDP's hooks run outside the graphs);
    every rank follows the eager local run, and its graph count is the same at every step. nf4 (slow tier, about
    50 s): against the eager FSDP run (NF4 of a row shard is not quite the whole matrix's); a frozen block runs
    eagerly (its shards are gathered in Python), so only the trainable graph exists."""
    extra = ("--train.steps=8", f"--lisa.frozen_storage={storage}")
    if storage == "float32":
        ref, _ = reference(tmp_path, data_file, *extra)
    else:
        (tmp_path / "eager").mkdir()
        ref = fsdp(tmp_path / "eager", data_file, *extra)[1][0]["steps"]
    _, ranks = fsdp(tmp_path, data_file, "--train.compile=true", *extra)
    for result in ranks:
        torch.testing.assert_close(losses(result["steps"]), losses(ref), rtol=1e-5, atol=0)
        graphs = [s["compiled_graphs"] for s in result["steps"]]
        assert 1 <= graphs[0] <= (2 if storage == "float32" else 1) and graphs == [graphs[0]] * 8, graphs
    assert sum(s["switched"] for s in ranks[0]["steps"]) == 4
