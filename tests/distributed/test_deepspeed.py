"""DeepSpeed ZeRO-1/2/3 backend on 2 real ranks (gloo, CPU) against the single-process local backend."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lisa_dist import cli
from lisa_dist.config import load_config
from lisa_dist.ds_config import fill_ds_config, read_ds_config
from lisa_dist.errors import ConfigError
from lisa_dist.run import read_jsonl

from ..helpers import (
    REPO,
    TIED,
    free_port,
    load_tied_export,
    local_eval,
    local_reference,
    rank_results,
    run_launcher,
    tied_param_count,
    tiny_overrides,
    torchrun,
    write_text_data,
)

pytest.importorskip("deepspeed")

WORLD, MICRO = 2, 4
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
# ZeRO-1/2 in fp32 reduce the same micro-batch gradients as the reference, but compute the clipping norm their own
# way; ZeRO-3 also reduces in its own order (STACK.md: about 1e-8 per step, growing with the steps).
ZERO12_TOL = 1e-6
ZERO3_TOL = 1e-4
BF16_TOL = 2e-2


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_text_data(tmp_path_factory.mktemp("data") / "text.jsonl")


def reference(tmp_path, data_file, *extra):
    records, _ = local_reference(tmp_path, data_file, *extra, micro=MICRO, world=WORLD)
    return [r["loss"] for r in records], [r["active_layers"] for r in records]


def ds_args(tmp_path, data_file, stage, *extra):
    return [
        *tiny_overrides(
            tmp_path / "ds",
            data_file,
            "--backend.name=deepspeed",
            f"--backend.ds_config={REPO / 'ds_configs' / stage}",
            f"--train.micro_batch_size={MICRO}",
            *extra,
        )
    ]


def run_ds(tmp_path, data_file, stage, *extra):
    out = tmp_path / "out"
    out.mkdir()
    torchrun("dist_driver.py", [str(out), *ds_args(tmp_path, data_file, stage, *extra)])
    return out, rank_results(out)


def check_state(ranks):
    for result in ranks:
        for step in result["steps"]:
            assert step["optimizer_state_bytes"] == step["expected_bytes"], (result["rank"], step["step"])
            assert step["frozen_ok"], (result["rank"], step["step"])
            # The always-trained groups' Adam step count rises by one per step, across every rebuild.
            assert set(step["always_steps"]) == {step["step"]}, (result["rank"], step)
            if step["switched"] and step["step"] > 1:
                assert step["masters_kept"] and step["steps_kept"], (result["rank"], step["step"])


# ZeRO-1 (48 s on 2 cores) in make test-slow: its switch path is ZeRO-2's, which make test runs.
@pytest.mark.parametrize(
    "stage, tol",
    [
        pytest.param("zero1.json", ZERO12_TOL, marks=pytest.mark.slow),
        ("zero2.json", ZERO12_TOL),
        ("zero3.json", ZERO3_TOL),
    ],
)
def test_fp32_matches_local_across_switches(tmp_path, data_file, stage, tol):
    ref_losses, ref_layers = reference(tmp_path, data_file, "--train.steps=8")
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    out, ranks = run_ds(tmp_path, data_file, stage, "--train.steps=8")
    # DeepSpeed's CPU all-reduce buffers (69 MB per rank in /dev/shm) are removed when the ranks exit.
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_before
    for result in ranks:
        assert [s["loss"] for s in result["steps"]] == pytest.approx(ref_losses, abs=tol, rel=0)
        assert [s["active_layers"] for s in result["steps"]] == ref_layers
    assert sum(s["switched"] for s in ranks[0]["steps"]) == 4
    check_state(ranks)
    if stage == "zero3.json":  # the export gathers ZeRO-3 partitions one parameter at a time
        exported = AutoModelForCausalLM.from_pretrained(out / "hf")
        probe = torch.arange(24, dtype=torch.long).reshape(2, 12) % 200 + 5
        with torch.no_grad():
            logits = exported(input_ids=probe).logits
        assert torch.allclose(logits, torch.load(out / "logits.pt"), atol=1e-5, rtol=0)


def test_always_lr_scale_matches_local_under_zero2(tmp_path, data_file):
    """optim.always_lr_scale=0.25 survives the engine's rebuild at every switch: the always-trained groups keep
    their scaled lr (the losses follow the local reference's) and their Adam state."""
    extra = ("--train.steps=6", "--optim.always_lr_scale=0.25")
    ref_losses, ref_layers = reference(tmp_path, data_file, *extra)
    plain_losses, _ = reference(tmp_path / "plain", data_file, "--train.steps=6")
    _, ranks = run_ds(tmp_path, data_file, "zero2.json", *extra)
    for result in ranks:
        assert [s["loss"] for s in result["steps"]] == pytest.approx(ref_losses, abs=ZERO12_TOL, rel=0)
        assert [s["active_layers"] for s in result["steps"]] == ref_layers
    assert ref_losses[-1] != pytest.approx(plain_losses[-1], abs=10 * ZERO12_TOL, rel=0)  # the scale changed them
    check_state(ranks)


def test_eval_loss_matches_local_under_zero3(tmp_path, data_file):
    """Evaluation on ZeRO-3 (every rank runs the same forwards: gathers are collective) after 4 steps."""
    extra = ("--data.eval_fraction=0.1", "--train.steps=4")
    ref_losses, ref_eval = local_eval(tmp_path, data_file, *extra, micro=MICRO, world=WORLD)
    _, ranks = run_ds(tmp_path, data_file, "zero3.json", *extra)
    for result in ranks:
        assert [s["loss"] for s in result["steps"]] == pytest.approx(ref_losses, abs=ZERO3_TOL, rel=0)
        assert result["eval"]["eval_loss"] == pytest.approx(ref_eval["eval_loss"], abs=ZERO3_TOL, rel=0)
        assert result["eval"]["eval_tokens"] == ref_eval["eval_tokens"] > 0


def test_tied_embeddings_under_zero3_init(tmp_path, data_file):
    """zero.Init builds the skeleton partitioned: the tie must hold there too, and in the export."""
    ref, _ = local_reference(tmp_path, data_file, TIED, "--train.steps=4", micro=MICRO, world=WORLD)
    out, ranks = run_ds(tmp_path, data_file, "zero3.json", TIED, "--train.steps=4")
    check_state(ranks)
    for result in ranks:
        assert [s["loss"] for s in result["steps"]] == pytest.approx([r["loss"] for r in ref], abs=ZERO3_TOL, rel=0)
        assert [s["trainable_params"] for s in result["steps"]] == [r["trainable_params"] for r in ref]
    exported = load_tied_export(out / "hf")
    assert sum(p.numel() for p in exported.parameters()) == tied_param_count()


# ZeRO-2 (13 s on 2 cores) and with offload (15 s) in make test-slow.
@pytest.mark.parametrize(
    "stage",
    [
        pytest.param("zero2.json", marks=pytest.mark.slow),
        "zero3.json",
        pytest.param("zero3_offload.json", marks=pytest.mark.slow),
    ],
)
def test_bf16_keeps_always_trained_fp32_masters_across_switches(tmp_path, data_file, stage):
    # A naive destroy + initialize rebuilds the embedding and head masters from their bf16 copies and resets their
    # moments: check_state's masters_kept / steps_kept catch that.
    ref_losses, _ = reference(tmp_path, data_file, "--train.precision=bf16")
    _, ranks = run_ds(tmp_path, data_file, stage, "--train.precision=bf16")
    check_state(ranks)
    for result in ranks:
        assert [s["loss"] for s in result["steps"]] == pytest.approx(ref_losses, abs=BF16_TOL, rel=0)


@pytest.mark.slow  # 50-95 s on 2 cores: run by make test-slow (make test's switch tests bound the state per switch)
def test_no_leak_over_50_switches(tmp_path, data_file):
    out = tmp_path / "leak"
    out.mkdir()
    torchrun("ds_leak_driver.py", [str(out), "50", *ds_args(tmp_path, data_file, "zero3.json")])
    for result in rank_results(out):
        counts = result["counts"]
        assert [c["switch"] for c in counts] == [1, 2, 10, 25, 50]
        assert all(c == counts[0] | {"switch": c["switch"]} for c in counts), counts
        assert counts[-1]["engines"] == counts[-1]["optimizers"] == 1
        # ZeRO-3's param._z3_optimizer kept the previous engine alive beside the new one until destroy_engine
        # deleted it.
        assert all(c["engines_after_switch"] == 1 for c in counts), counts


# Both in make test-slow (33 and 38 s on 2 cores), to keep make test under 15 minutes from a fresh clone; DeepSpeed's
# resume stays in make test through the Trainer's ZeRO-2 checkpoints (test_hf.py).
@pytest.mark.parametrize(
    "stage", [pytest.param("zero2.json", marks=pytest.mark.slow), pytest.param("zero3.json", marks=pytest.mark.slow)]
)
def test_exact_resume_mid_period(tmp_path, data_file, stage):
    """6 steps straight against 3 steps, a checkpoint (mid-period: interval 2), a new launch, 3 more steps."""
    ref_losses, _ = reference(tmp_path, data_file)
    args = ds_args(tmp_path, data_file, stage)
    out = tmp_path / "ckpt"
    out.mkdir()
    torchrun("ckpt_driver.py", [str(out), "save", "3", *args])
    torchrun("ckpt_driver.py", [str(out), "resume", *args])
    saved = json.loads((out / "save.json").read_text())
    resumed = json.loads((out / "resume.json").read_text())
    assert resumed["first"] == 3
    tol = ZERO3_TOL if stage == "zero3.json" else ZERO12_TOL
    assert saved["losses"] + resumed["losses"] == pytest.approx(ref_losses, abs=tol, rel=0)
    # The resumed half is bitwise what the uninterrupted run of the same backend computes.
    straight = tmp_path / "straight"
    straight.mkdir()
    torchrun("ckpt_driver.py", [str(straight), "resume", *ds_args(straight, data_file, stage)])
    assert json.loads((straight / "resume.json").read_text())["losses"][3:] == resumed["losses"]
    # One process consolidates the ZeRO partitions into a Hugging Face folder.
    hf = tmp_path / "hf"
    assert cli.main(["export", str(tmp_path / "ds" / "run" / "checkpoints"), str(hf)]) == 0
    assert AutoModelForCausalLM.from_pretrained(hf).config.num_hidden_layers == 4


@pytest.mark.slow  # 18 s on 2 cores: a refusal path
def test_deepspeed_checkpoint_refuses_another_world_size(tmp_path, data_file):
    args = ds_args(tmp_path, data_file, "zero2.json")
    out = tmp_path / "ckpt"
    out.mkdir()
    torchrun("ckpt_driver.py", [str(out), "save", "2", *args])
    with pytest.raises(AssertionError, match="resumes only on 2"):
        torchrun("ckpt_driver.py", [str(out), "resume", *args, "--train.micro_batch_size=8"], nproc=1)


@pytest.mark.slow  # 44 s on 2 cores; make test runs the deepspeed launcher with FSDP (tests/e2e/test_launchers.py)
def test_deepspeed_launcher_gives_the_reference_losses(tmp_path, data_file):
    """launch/deepspeed.sh (the `deepspeed` launcher, 2 CPU ranks) with the overrides as its arguments."""
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    cli_out = tmp_path / "ds" / "run"
    run_launcher(
        [
            "bash",
            str(REPO / "launch" / "deepspeed.sh"),
            str(config),
            *ds_args(tmp_path, data_file, "zero2.json", "--train.steps=4"),
        ],
        env={"NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())},
    )
    launched = read_jsonl(cli_out / "metrics.jsonl")
    ref_losses, ref_layers = reference(tmp_path, data_file, "--train.steps=4")
    assert [r["loss"] for r in launched] == pytest.approx(ref_losses, abs=ZERO12_TOL, rel=0)
    assert [r["active_layers"] for r in launched] == ref_layers


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_ds_config_loads_and_validates(path):
    filled = fill_ds_config(
        read_ds_config(path), micro_batch_size=4, grad_accum=2, max_grad_norm=1.0, precision="bf16", world_size=8
    )
    assert filled["train_batch_size"] == 64 and filled["gradient_accumulation_steps"] == 2
    assert filled["bf16"]["enabled"] is True and filled["gradient_clipping"] == 1.0
    load_config(None, ["--data.path=x", "--backend.name=deepspeed", f"--backend.ds_config={path}"])


def test_ds_config_contradictions_name_both_values(tmp_path):
    raw = read_ds_config(DS_CONFIGS[0]) | {"train_micro_batch_size_per_gpu": 8}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu=8 contradicts train.micro_batch_size=4"):
        load_config(None, ["--data.path=x", "--backend.name=deepspeed", f"--backend.ds_config={path}"])
    with pytest.raises(ConfigError, match=r"train_batch_size=64 contradicts .*\(4 x 2 x 4\)=32"):
        fill_ds_config(
            {**raw, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": 64},
            micro_batch_size=4,
            grad_accum=2,
            max_grad_norm=1.0,
            precision="fp32",
            world_size=4,
        )
    for section in ("optimizer", "scheduler"):
        with pytest.raises(ConfigError, match=f"remove the '{section}' section"):
            fill_ds_config(
                {**raw, section: {}},
                micro_batch_size=4,
                grad_accum=1,
                max_grad_norm=1.0,
                precision="fp32",
                world_size=2,
            )
    with pytest.raises(ConfigError, match=r"zero_optimization.stage=5"):
        fill_ds_config(
            {**raw, "zero_optimization": {"stage": 5}},
            micro_batch_size=4,
            grad_accum=1,
            max_grad_norm=1.0,
            precision="fp32",
            world_size=2,
        )
    with pytest.raises(ConfigError, match=r"backend.ds_config"):
        load_config(None, ["--data.path=x", "--backend.name=deepspeed"])
