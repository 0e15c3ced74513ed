"""The memory model against measurement: its params, grads, masters and moments equal, byte for byte, what each
backend holds on small models; its presets have the published sizes; `lisa-dist estimate` prints the plan."""

import json

import pytest

from lisa_dist.cli import main as cli_main
from lisa_dist.config import load_config
from lisa_dist.errors import ConfigError
from lisa_dist.run import build, train_step
from lisa_dist.tools import METHODS, Setup, estimate, model_config, shapes_of, shapes_of_model

from ..helpers import tiny_overrides, torchrun, write_text_data

EXACT = ("params", "grads", "masters", "moments")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_text_data(tmp_path_factory.mktemp("memory") / "text.jsonl")


@pytest.mark.parametrize(
    "name, billions",
    [
        ("llama-2-7b", 6_738_415_616),
        ("llama-3-8b", 8_030_261_248),
        ("mistral-7b", 7_241_732_096),
        ("qwen2.5-7b", 7_615_616_512),
    ],
)
def test_presets_have_the_published_sizes(name, billions):
    assert shapes_of(model_config(name), name).num_params == billions


def trained(tmp_path, data, *extra, steps=5):
    # Odd sizes (vocabulary 261, intermediate 130) so that any padding would show.
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            data,
            '--model.config_overrides={"num_hidden_layers":4,"intermediate_size":130}',
            f"--train.steps={steps}",
            *extra,
        ),
    )
    run = build(cfg)
    for step in range(steps):
        train_step(run, step)
    return run


BF16 = "--train.precision=bf16"


@pytest.mark.parametrize(
    "method, extra",
    [
        ("lisa", []),
        ("full", ["--lisa.enabled=false"]),
        ("lora", ["--lisa.enabled=false", "--lora.enabled=true"]),
        ("lisa", [BF16]),
        ("full", ["--model.dtype=bfloat16", "--lisa.enabled=false"]),
        ("lisa", ["--lisa.frozen_storage=nf4"]),
        ("lisa", ["--lisa.frozen_storage=int8", "--lisa.host_dtype=bfloat16"]),
        ("lisa", ["--lisa.frozen_storage=bfloat16", BF16]),
        ("lisa", ["--lisa.frozen_storage=nf4", "--lisa.train_embeddings=false", BF16]),
        ("lisa", ["--lisa.train_embeddings=false"]),
        ("full", ["--lisa.enabled=false", "--lisa.train_embeddings=false"]),
        ("lisa", ["--optim.always_lr_scale=0"]),
        ("lisa", ["--optim.always_lr_scale=0", "--lisa.frozen_storage=nf4", BF16]),
        ("lisa", ["--optim.always_lr_scale=0.3", "--lisa.frozen_storage=bfloat16", BF16]),
        pytest.param(
            "lisa",
            [
                "--optim.adam_8bit=always",
                '--model.config_overrides={"num_hidden_layers":4,'
                '"hidden_size":64,"intermediate_size":130,"vocab_size":512}',
            ],
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "lisa",
            ["--optim.adam_8bit=all", "--lisa.frozen_storage=nf4", "--lisa.train_embeddings=false"],
            marks=pytest.mark.slow,
        ),  # 22 s; the GPU kit's quantized stage checks its host bytes too
        pytest.param(
            "lora", ["--lisa.enabled=false", "--lora.enabled=true", "--optim.adam_8bit=always"], marks=pytest.mark.slow
        ),
    ],
    ids=[
        "lisa",
        "full",
        "lora",
        "lisa-bf16",
        "full-bf16-weights",
        "nf4",
        "int8-host-bf16",
        "frozen-bf16",
        "nf4-frozen-embeddings-bf16",
        "frozen-embeddings",
        "full-frozen-embeddings",
        "always-frozen",
        "always-frozen-nf4-bf16",
        "always-scaled-frozen-bf16",
        "adam8-always",
        "adam8-all-nf4",
        "lora-adam8",
    ],
)
def test_local_state_bytes_are_predicted_exactly(tmp_path, data, method, extra):
    """Device bytes (params as stored: fp32, bf16, torchao's int8 and NF4 formats; grads; moments, 8-bit ones
    included) and host bytes (the exact copies of quantized weights) equal the planner's, byte for byte."""
    run = trained(tmp_path, data, *extra, steps=3 if "adam_8bit" in " ".join(extra) else 5)
    lora = run.trainable.always if method == "lora" else ()
    predicted = estimate(
        shapes_of_model(run.layout.model, lora=lora), method, Setup.from_config(run.cfg), active=run.active
    ).as_dict()
    measured = run.backend.state_bytes()
    assert {k: measured[k] for k in (*EXACT, "host")} == {k: predicted[k] for k in (*EXACT, "host")}
    assert measured["moments"] > 0
    assert (measured["host"] > 0) == (run.cfg.lisa.frozen_storage in ("int8", "nf4"))


def test_naive_lisa_state_grows_to_full_fine_tuning(tmp_path, data):
    """The reference implementations' LISA keeps the moments of every layer it visited: after the switches that
    visited all 4 layers it holds what full fine-tuning holds; lisa_dist holds the active layers' only."""
    from benchmarks.lib import NaiveLisaBackend

    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            data,
            "--lisa.gamma=1",
            "--lisa.interval=1",
            "--lisa.strategy=fixed",
            "--lisa.fixed_layers=[0]",
            "--train.steps=4",
        ),
    )
    run = build(cfg, NaiveLisaBackend(cfg.train.device, cfg.train.precision, cfg.optim))
    setup = Setup(backend="local", world_size=1, precision="fp32", param_dtype="float32")
    shapes = shapes_of_model(run.layout.model)
    grown = []
    for step in range(4):
        run.sampler.fixed = (step,)  # visit layers 0, 1, 2, 3 in turn
        train_step(run, step)
        grown.append(run.backend.state_bytes()["moments"])
    assert grown == sorted(grown) and grown[0] < grown[-1]
    assert grown[-1] == estimate(shapes, "full", setup).moments
    measured = run.backend.state_bytes()
    assert {k: measured[k] for k in EXACT} == {
        k: v for k, v in estimate(shapes, "naive_lisa", setup, active=run.active).as_dict().items() if k in EXACT
    }


def test_distributed_state_bytes_are_predicted_exactly(tmp_path, data):
    """FSDP (fp32, bf16 compute, bf16 frozen storage with and without frozen embeddings, NF4 and int8 frozen
    storage with their host shards, 8-bit Adam with the chunked loss, full), DDP (FSDP with one shard per replica),
    ZeRO-1/2/3 (ZeRO-3 also with a frozen embedding), ZeRO-3 with optimizer offload, and a tied head on FSDP, ZeRO-2
    and ZeRO-3: every rank's measured bytes equal the model's for that rank, the model built from the config alone
    (the tie counted once)."""
    torchrun("memory_driver.py", [str(tmp_path), str(data)], timeout=400)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(results) == 19
        for name, result in results.items():
            measured, predicted = result["measured"], result["predicted"]
            if "offload" in name:  # grads, masters and moments in CPU memory
                assert sum(measured[k] for k in ("grads", "masters", "moments")) == predicted["host"], name
                assert measured["params"] == predicted["params"], name
                continue
            assert {k: measured[k] for k in EXACT} == {k: predicted[k] for k in EXACT}, name
            if name.startswith("fsdp"):  # the exact host shards of int8 / NF4 frozen matrices (0 otherwise)
                assert measured["host"] == predicted["host"], name
                assert (measured["host"] > 0) == ("nf4" in name or "int8" in name), name


def test_fsdp_shards_are_uneven_and_the_model_knows(tmp_path):
    """A 261-row embedding on 2 ranks: rank 0 stores 131 rows, rank 1 130 (both pad storage to 131)."""
    shapes = shapes_of(model_config("tiny-llama"), "tiny")
    rank0 = estimate(shapes, "full", Setup(backend="fsdp", world_size=2, precision="fp32", rank=0))
    rank1 = estimate(shapes, "full", Setup(backend="fsdp", world_size=2, precision="fp32", rank=1))
    assert rank0.params == rank1.params and rank0.moments > rank1.moments


def test_lisa_fits_70b_on_one_node_where_full_fine_tuning_does_not():
    shapes = shapes_of(model_config("llama-2-70b"), "llama-2-70b", lora_r=16)
    setup = Setup(backend="fsdp", world_size=8, precision="bf16", frozen_storage="bfloat16", gamma=2, lora_r=16)
    plan = {m: estimate(shapes, m, setup) for m in METHODS}
    budget = 0.9 * 80 * 1024**3
    assert plan["lisa"].device_total < budget < plan["full"].device_total
    assert not plan["naive_lisa"].supported
    # Adam moments: 2 x fp32 x (2 of 80 layers + embeddings and head) / 8 ranks
    per_layer = sum(p.numel for p in shapes.layers[0])
    always = sum(p.numel for p in shapes.always)
    assert plan["lisa"].moments == pytest.approx(8 * (2 * per_layer + always) / 8, rel=1e-6)


def test_estimate_cli_prints_every_method(capsys):
    assert cli_main(["estimate", "--model", "llama-2-7b", "--gpus", "8", "--backend", "zero3", "--gamma", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("full fine-tuning", "LoRA", "naive LISA", "lisa_dist LISA", "fits 80 GiB"):
        assert name in out


def test_bad_estimate_input_names_the_field():
    with pytest.raises(ConfigError, match="backend='tpu'"):
        Setup(backend="tpu")
    with pytest.raises(ConfigError, match="not a preset"):
        model_config("llama-9-1t")


def test_adapters_count_only_in_the_lora_row():
    """The planner builds one set of shapes for the whole table: LoRA's adapters must not add to the other rows."""
    plain = shapes_of(model_config("tiny-llama"), "tiny")
    with_lora = shapes_of(model_config("tiny-llama"), "tiny", lora_r=8)
    for backend, world in (("local", 1), ("fsdp", 2), ("zero2", 2), ("zero3", 2)):
        setup = Setup(backend=backend, world_size=world, precision="fp32")
        for method in ("full", "lisa"):
            assert estimate(with_lora, method, setup).as_dict() == estimate(plain, method, setup).as_dict()
        assert estimate(with_lora, "lora", setup).params > estimate(plain, "full", setup).params


LEAN = dict(
    backend="local",
    world_size=1,
    precision="bf16",
    frozen_storage="nf4",
    train_embeddings=False,
    adam_8bit="all",
    loss_chunk_tokens=1024,
)


def test_lisa_below_lora_on_llama_3_8b_and_70b_on_one_gpu():
    """The issue's targets, from the planner: Llama-3-8B with LISA gamma 2 at or below LoRA r 8 on the same bf16 base
    (it was 1.45x with bf16 weights), Llama-2-70B on one 80 GB GPU at gamma 1 and 2."""
    budget = 0.9 * 80 * 1024**3
    shapes = shapes_of(model_config("llama-3-8b"), "llama-3-8b", lora_r=8)
    lean = estimate(shapes, "lisa", Setup(**LEAN, gamma=2))
    lora = estimate(shapes, "lora", Setup(**LEAN, gamma=2))
    assert lean.device_total <= lora.device_total
    assert lora.params == 2 * shapes.num_params + 4 * sum(p.numel for p in shapes.lora)  # a bf16 base, fp32 adapters
    before = Setup(backend="local", world_size=1, precision="bf16", param_dtype="bfloat16", gamma=2)
    assert estimate(shapes, "lisa", before).device_total > 1.4 * estimate(shapes, "lora", before).device_total
    # The exact host copies: every layer matrix in fp32.
    assert lean.host == 4 * sum(p.numel for layer in shapes.layers for p in layer if len(p.shape) == 2)
    big = shapes_of(model_config("llama-2-70b"), "llama-2-70b", lora_r=8)
    for gamma in (1, 2):
        assert estimate(big, "lisa", Setup(**LEAN, gamma=gamma, host_dtype="bfloat16")).device_total < budget
        assert (
            estimate(
                big, "lisa", Setup(backend="local", world_size=1, precision="bf16", param_dtype="bfloat16", gamma=gamma)
            ).device_total
            > budget
        )


def test_qlora_row_and_lora_base_dtype():
    shapes = shapes_of(model_config("llama-2-7b"), "llama-2-7b", lora_r=8)
    fp32 = Setup(backend="local", world_size=1)
    bf16 = Setup(backend="local", world_size=1, frozen_storage="bfloat16")
    assert estimate(shapes, "lora", bf16).params * 2 == pytest.approx(estimate(shapes, "lora", fp32).params, rel=1e-3)
    qlora = estimate(shapes, "qlora", fp32)
    assert qlora.params < estimate(shapes, "lora", bf16).params / 3
    assert not estimate(shapes, "qlora", Setup(backend="zero3", world_size=8)).supported


def test_longest_sequence_grows_with_each_memory_option():
    from lisa_dist.tools import longest_seq_len

    shapes = shapes_of(model_config("llama-3-70b"), "llama-3-70b", lora_r=8)
    fsdp = dict(backend="fsdp", world_size=8, precision="bf16", gamma=2)
    plain = longest_seq_len(shapes, Setup(**fsdp), "lisa", 80)
    bf16 = longest_seq_len(shapes, Setup(**fsdp, frozen_storage="bfloat16"), "lisa", 80)
    lean = longest_seq_len(
        shapes,
        Setup(**fsdp, frozen_storage="bfloat16", train_embeddings=False, adam_8bit="all", loss_chunk_tokens=1024),
        "lisa",
        80,
    )
    assert 0 < plain < bf16 < lean and lean % 256 == 0
    budget = 0.9 * 80 * 1024**3
    assert estimate(shapes, "lisa", Setup(**fsdp, seq_len=plain)).gpu_total <= budget
    assert estimate(shapes, "lisa", Setup(**fsdp, seq_len=plain + 256)).gpu_total > budget
    assert longest_seq_len(shapes, Setup(**fsdp), "full", 80) == 0


def test_estimate_cli_memory_flags(capsys):
    assert (
        cli_main(
            [
                "estimate",
                "--model",
                "llama-3-8b",
                "--gpus",
                "1",
                "--backend",
                "local",
                "--frozen-storage",
                "nf4",
                "--frozen-embeddings",
                "--adam-8bit",
                "all",
                "--loss-chunk",
                "1024",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "QLoRA (NF4 base)" in out and "frozen layers nf4" in out and "host (CPU)" in out
    assert cli_main(["estimate", "--model", "llama-3-70b", "--gpus", "8", "--longest-seq"]) == 0
    assert "| lisa_dist LISA | " in capsys.readouterr().out
    assert cli_main(["estimate", "--model", "llama-3-8b", "--backend", "zero3", "--frozen-storage", "nf4"]) == 2
    assert "backend=zero3: frozen storage and 8-bit moments run on local and fsdp only" in capsys.readouterr().err
