"""The GPU check's stages (benchmarks.gpu_kit.check runs each in its own process): each returns its figures as a
dict, or raises. Sizes by device: a width-1024, 8-layer Llama on 1,024-token blocks on CUDA; the tests' 4-layer,
width-64 Llama on 64-token blocks on the CPU."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks import harness

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "lisa_dist" / "assets" / "demo_alpaca.jsonl"
MODELS = {
    "cuda": {
        "vocab_size": 32000,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 64,
    },
    "cpu": {"num_hidden_layers": 4, "hidden_size": 64},
}
SEQ = {"cuda": 1024, "cpu": 128}
PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "datasets",
    "pyarrow",
    "huggingface_hub",
    "torchao",
    "deepspeed",
    "liger_kernel",
    "triton",
    "tensorboard",
    "mpi4py",
    "pydantic",
)
# The private and recent APIs of docs/internals.md that can be looked up by name: (module, attribute path).
APIS = (
    ("torch.distributed.distributed_c10d", "_get_default_store"),
    ("torch.distributed.distributed_c10d", "_get_default_group"),
    ("torch.distributed.distributed_c10d", "_rank_not_in_group"),
    ("torch.distributed", "all_gather_single"),
    ("torch.distributed", "all_gather_into_tensor"),
    ("torch.distributed", "reduce_scatter_tensor"),
    ("torch.distributed.tensor._utils", "compute_local_shape_and_global_offset"),
    ("torch.distributed.fsdp._fully_shard._fsdp_param", "FSDPParam.reset_sharded_param"),
    ("torch.distributed.fsdp._fully_shard._fsdp_state", "FSDPState._pre_forward"),
    ("torch.distributed.fsdp._fully_shard._fsdp_state", "FSDPState._post_forward"),
    ("torch.nn.parallel", "DistributedDataParallel._build_params_for_reducer"),
    ("torch.nn.parallel", "DistributedDataParallel._ddp_init_helper"),
    ("torch._dynamo.config", "skip_fwd_side_effects_in_bwd_under_checkpoint"),
    ("torch._functorch.config", "enable_autograd_cache"),
    ("torch.cuda._pin_memory_utils", "pin_memory"),
    ("torch.distributed.checkpoint.api", "CheckpointException"),
    ("transformers", "PreTrainedModel.gradient_checkpointing_enable"),
    ("transformers", "PreTrainedModel.activation_checkpointing_enable"),
    ("transformers", "Trainer._prepare_for_training"),
    ("accelerate", "Accelerator"),
    ("torchao.optim", "AdamW8bit._new_buffer"),
    ("torchao.quantization", "Int8Tensor"),
    ("deepspeed.runtime.engine", "DeepSpeedEngine._broadcast_model"),
    ("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy"),
)


def overrides(device: str, out: Path, *extra: str, data_format: str = "text") -> list[str]:
    """A run of the kit's model for `device` writing to `out`: 6 steps, 2 of the layers switched every 2 steps."""
    data = [f"--data.format={data_format}"] + (["--data.text_field=output"] if data_format == "text" else [])
    return [
        f"--data.path={DATA}",
        *data,
        f"--data.max_length={SEQ[device]}",
        f"--data.cache_dir={out}/cache",
        "--model.name=tiny-llama",
        f"--model.config_overrides={json.dumps(MODELS[device])}",
        "--train.micro_batch_size=2",
        "--train.steps=6",
        f"--train.output_dir={out}/run",
        f"--train.device={device}",
        "--optim.lr=1e-3",
        "--optim.schedule=constant",
        "--lisa.gamma=2",
        "--lisa.interval=2",
        "--logging.progress=false",
        "--logging.level=WARNING",
        *extra,
    ]


def versions(device: str, work: Path) -> dict:
    found = {}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
            found[name] = getattr(module, "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - reported, the next package is still tried
            found[name] = f"missing ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    apis = {f"{module}.{path}": _has(module, path) for module, path in APIS}
    cuda = {}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        cuda = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "count": torch.cuda.device_count(),
        }
    return {
        "python": platform.python_version(),
        "packages": found,
        "apis": apis,
        "missing_apis": sorted(k for k, v in apis.items() if not v),
        "cuda": cuda,
        "unmet_requirements": _unmet("datasets") + _unmet("deepspeed") + _unmet("torchao"),
    }


def _has(module: str, path: str) -> bool:
    try:
        target = importlib.import_module(module)
        for part in path.split("."):
            target = getattr(target, part)
        return True
    except Exception:  # noqa: BLE001 - absent, whatever the reason
        return False


def _unmet(dist: str) -> list[str]:
    """The requirements of installed distribution `dist` that this environment does not meet."""
    from packaging.requirements import Requirement

    try:
        requires = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return [f"{dist}: not installed"]
    unmet = []
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{dist} needs {req}: not installed")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{dist} needs {req}: {have} installed")
    return unmet


def _build(argv: list[str]):
    from lisa_dist.config import load_config
    from lisa_dist.run import build

    cfg = load_config(None, argv)
    return cfg, build(cfg)


def _planned(run, cfg) -> dict:
    """The planner's figures for this run, beside what it measured."""
    from lisa_dist.tools import Setup, estimate, shapes_of_model

    return estimate(
        shapes_of_model(run.layout.model), "lisa", Setup.from_config(cfg), active=list(run.active)
    ).as_dict()


def _train(run, steps: range, syncs_at: int | None = None) -> tuple[list[dict], list[str]]:
    from benchmarks.lib import count_syncs
    from lisa_dist.run import train_step

    records, where = [], []
    for step in steps:
        if step == syncs_at:
            with count_syncs(run.backend.device) as found:
                records.append(train_step(run, step))
            where = found.take()
        else:
            records.append(train_step(run, step))
    return records, where


def local(device: str, work: Path) -> dict:
    """bf16, chunked loss, packed Alpaca rows: host syncs of a step inside a LISA period (step 2) at grad_accum 1
    and 8, which must be equal; finite losses; memory against the planner."""
    from lisa_dist.run import device_memory

    out = {}
    for accum in (1, 8):
        argv = overrides(
            device,
            work / f"accum{accum}",
            "--train.precision=bf16",
            "--train.loss=chunked",
            "--train.loss_chunk_tokens=512",
            "--data.packing=true",
            f"--train.grad_accum={accum}",
            "--lisa.interval=4",
            "--train.activation_checkpointing=true",
            "--data.skip_bad_rows=true",
            f"--data.max_length={max(SEQ[device], 512)}",
            data_format="alpaca",
        )
        cfg, run = _build(argv)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        records, where = _train(run, range(4), syncs_at=1)
        wall = time.perf_counter() - start
        out[f"grad_accum_{accum}"] = {
            "losses": [r["loss"] for r in records],
            "syncs_step_2": len(where),
            "syncs_where": where,
            "tokens_per_s": records[-1]["tokens_per_s"],
            "wall_s": round(wall, 2),
            "memory": device_memory(run.backend.device),
            "state_bytes": records[-1]["state_bytes"],
            "planned": _planned(run, cfg),
        }
        run.backend.close()
    one, eight = out["grad_accum_1"], out["grad_accum_8"]
    _check(all(math.isfinite(v) for r in out.values() for v in r["losses"]), "a loss is not finite")
    _check(
        one["syncs_step_2"] == eight["syncs_step_2"],
        f"syncs per step grow with grad_accum: {one['syncs_step_2']} at 1, {eight['syncs_step_2']} at 8",
    )
    return out


def quantized(device: str, work: Path) -> dict:
    """NF4 frozen layers, 8-bit Adam for all, frozen embeddings, bf16, chunked loss: the first step's loss beside
    fp32 storage's, finite losses, host copies against the planner, memory."""
    from lisa_dist.run import device_memory

    lean = ["--lisa.frozen_storage=nf4", "--optim.adam_8bit=all", "--lisa.train_embeddings=false"]
    common = ["--train.precision=bf16", "--train.loss=chunked", "--train.loss_chunk_tokens=512"]
    results = {}
    for name, extra in (("fp32_storage", []), ("lean", lean)):
        cfg, run = _build(overrides(device, work / name, *common, *extra))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        records, _ = _train(run, range(4))
        store = getattr(run.backend, "store", None)
        results[name] = {
            "losses": [r["loss"] for r in records],
            "state_bytes": records[-1]["state_bytes"],
            "memory": device_memory(run.backend.device),
            "planned": _planned(run, cfg),
            "host_pinned": bool(store and store.buffers and store.buffers[0].flat.is_pinned()),
        }
        run.backend.close()
    lean_r, exact = results["lean"], results["fp32_storage"]
    results["first_loss_difference"] = abs(lean_r["losses"][0] - exact["losses"][0])
    _check(all(math.isfinite(v) for v in lean_r["losses"]), "a loss is not finite")
    _check(
        lean_r["state_bytes"]["host"] == lean_r["planned"]["host"],
        f"host copies {lean_r['state_bytes']['host']} B, planned {lean_r['planned']['host']} B",
    )
    _check(device != "cuda" or lean_r["host_pinned"], "the host copies are not page-locked")
    return results


def _cli(argv: list[str], nproc: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    """`lisa-dist train` with these overrides; under torchrun with `nproc` ranks when given."""
    runner = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        if nproc
        else [sys.executable]
    )
    done = subprocess.run(
        [*runner, "-m", "lisa_dist.cli", "train", *argv], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if done.returncode:
        raise RuntimeError(f"lisa-dist train exited {done.returncode}:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
    return done


def _records(out: Path) -> list[dict]:
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _resumed(device: str, work: Path, nproc: int, *extra: str) -> dict:
    """A run of 6 steps straight, and one stopped after 4 (a checkpoint every 2) then resumed to 6: their losses."""
    straight, split = work / "straight", work / "split"
    _cli(overrides(device, straight, *extra), nproc)
    _cli(overrides(device, split, "--train.steps=4", "--checkpoint.every=2", *extra), nproc)
    _cli(
        overrides(device, split, "--train.steps=6", "--checkpoint.every=2", "--checkpoint.save_final=true", *extra),
        nproc,
    )
    summary = json.loads((split / "run" / "summary.json").read_text())
    a = [r["loss"] for r in _records(straight) if "loss" in r]
    b = [r["loss"] for r in _records(split) if "loss" in r]
    memory = [{k: r[k] for k in r if k.startswith("cuda_")} for r in _records(split) if "loss" in r]
    _check(summary.get("resumed_at_step") == 4, f"the second launch did not resume at step 4: {summary}")
    _check(len(a) == len(b) == 6, f"losses: {len(a)} straight, {len(b)} split")
    _check((split / "run" / "final" / "config.json").is_file(), "checkpoint.save_final wrote no final/")
    return {
        "straight": a,
        "resumed": b,
        "max_difference": max(abs(x - y) for x, y in zip(a, b, strict=True)),
        "memory_per_step": memory,
    }


def compile_resume(device: str, work: Path) -> dict:
    """train.compile with bf16: 6 steps straight against 4 + a resume to 6."""
    result = _resumed(device, work, 0, "--train.compile=true", "--train.precision=bf16")
    _check(all(math.isfinite(v) for v in result["resumed"]), "a loss is not finite")
    return result


def fsdp_nf4(device: str, work: Path) -> dict:
    """FSDP2 on one rank (torchrun): NF4 frozen blocks, bf16, grad_norm sampling, checkpoints, save_final, resume."""
    result = _resumed(
        device,
        work,
        1,
        "--backend.name=fsdp",
        "--lisa.frozen_storage=nf4",
        "--train.precision=bf16",
        "--lisa.strategy=grad_norm",
    )
    _check(all(math.isfinite(v) for v in result["resumed"]), "a loss is not finite")
    return result


def _zero(device: str, work: Path, stage: int) -> dict:
    """DeepSpeed ZeRO-`stage` on one rank (torchrun), bf16: 6 steps, a switch every 2; memory per step."""
    _cli(
        overrides(
            device,
            work,
            "--backend.name=deepspeed",
            f"--backend.ds_config=ds_configs/zero{stage}.json",
            "--train.precision=bf16",
        ),
        1,
    )
    records = [r for r in _records(work) if "loss" in r]
    _check(all(math.isfinite(r["loss"]) for r in records), "a loss is not finite")
    _check(sum(r["switched"] for r in records) >= 3, "fewer than 3 switches (the first and two more)")
    reserved = [r.get("cuda_reserved") for r in records]
    return {
        "losses": [r["loss"] for r in records],
        "switched": [r["switched"] for r in records],
        "switch_s": [r["switch_s"] for r in records],
        "cuda_reserved": reserved,
        "cuda_max_allocated": [r.get("cuda_max_allocated") for r in records],
        # Reserved memory from the second switch's step to the third's: flat when a switch frees what it replaces.
        "reserved_growth_between_switches": (reserved[4] - reserved[2]) if reserved[4] is not None else None,
    }


def zero2(device: str, work: Path) -> dict:
    return _zero(device, work, 2)


def zero3(device: str, work: Path) -> dict:
    return _zero(device, work, 3)


def liger(device: str, work: Path) -> dict:
    """Liger's fused linear cross-entropy against the chunked loss on one batch under bf16 autocast: the summed
    loss and the head's gradient."""
    from lisa_dist.models.loss import _liger, chunked_linear_cross_entropy

    if device != "cuda":
        return {"skipped": "Liger's kernels run on CUDA only"}
    if _liger() is None:
        raise RuntimeError("liger-kernel is not installed")
    torch.manual_seed(0)
    hidden_size, vocab, tokens = MODELS["cuda"]["hidden_size"], MODELS["cuda"]["vocab_size"], 4096
    hidden = torch.randn(1, tokens, hidden_size, device="cuda")
    labels = torch.randint(0, vocab, (1, tokens), device="cuda")
    labels[:, ::7] = -100
    weight = torch.randn(vocab, hidden_size, device="cuda") * hidden_size**-0.5
    out = {}
    for fused in (True, False):
        w = weight.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = chunked_linear_cross_entropy(hidden, w, None, labels, 1024, fused=fused)
        loss.backward()
        out[fused] = (float(loss), w.grad.float())
    (fused_loss, fused_grad), (loss, grad) = out[True], out[False]
    relative = float((fused_grad - grad).norm() / grad.norm())
    _check(abs(fused_loss - loss) / abs(loss) < 1e-2, f"losses {fused_loss} (Liger) and {loss} (chunked)")
    _check(relative < 5e-2, f"head gradients differ by {relative:.3g} (relative L2)")
    return {"liger_loss": fused_loss, "chunked_loss": loss, "head_grad_relative_difference": relative}


def methods(device: str, work: Path) -> dict:
    """benchmarks.methods at 1B (CUDA) for lisa, lisa_nf4 and lisa_lean: peak memory and tokens/s, with the
    planner's figure beside each."""
    size = "1b" if device == "cuda" else "tiny"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.methods",
        "--device",
        device,
        "--size",
        size,
        "--steps",
        "6",
        "--methods",
        "lisa",
        "lisa_nf4",
        "lisa_lean",
        "--out",
        str(work),
        "--name",
        "methods",
    ]
    if device == "cuda":
        cmd += ["--precision", "bf16", "--seq-len", "1024", "--micro-batch", "2", "--activation-checkpointing"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    data = harness.read_latest("methods", work) or {}
    results = {}
    for name, r in data.get("results", {}).items():
        keep = ("tokens_per_s", "peak_bytes", "peak_reserved_bytes", "load_peak_bytes", "error", "oom")
        results[name] = {k: r[k] for k in keep if k in r}
        if "predicted_last" in r:
            results[name]["planned_device_total"] = r["predicted_last"]["device_total"]
            results[name]["planned_gpu_total"] = r["predicted_last"].get("gpu_total")
    _check(done.returncode == 0, f"methods.py exited {done.returncode}: {done.stderr[-2000:]}")
    return {"size": size, "results": results}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


STAGES = {
    "versions": versions,
    "local": local,
    "quantized": quantized,
    "compile_resume": compile_resume,
    "fsdp_nf4": fsdp_nf4,
    "zero2": zero2,
    "zero3": zero3,
    "liger": liger,
    "methods": methods,
}


def run_stage(name: str, device: str, work: Path, result: Path) -> None:
    """Run stage `name` and write its figures (or its error) to `result` as JSON."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shutil.rmtree(work, ignore_errors=True)  # a fresh folder: no earlier check's run is resumed
    work.mkdir(parents=True)
    try:
        figures, status, error = STAGES[name](device, work), "ok", None
        if isinstance(figures, dict) and "skipped" in figures:
            status = "skipped"
    except Exception as exc:  # noqa: BLE001 - the stage's result, for the report
        figures, status, error = {}, "failed", f"{type(exc).__name__}: {exc}"
    result.write_text(json.dumps({"status": status, "error": error, "figures": figures}, default=str))
