"""Shared test helpers: tiny run configs, the repo's small data, and real ranks through torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DRIVERS = TESTS / "distributed" / "drivers"  # the scripts the distributed and end-to-end tests start on 2 ranks
DEMO_DATA = REPO / "lisa_dist" / "assets" / "demo_alpaca.jsonl"


def write_text_data(path: Path) -> Path:
    """The demo's responses as `{text}` rows: packed into blocks by the text format, no row is ever skipped."""
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    path.write_text("".join(json.dumps({"text": row["output"]}) + "\n" for row in rows))
    return path


def tiny_overrides(tmp_path: Path, data_file: Path, *extra: str) -> list[str]:
    """A 4-layer, width-64 Llama on 64-token blocks of `data_file`: 6 steps, one layer switched every 2."""
    return [
        f"--data.path={data_file}",
        "--data.format=text",
        "--data.max_length=64",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--model.name=tiny-llama",
        '--model.config_overrides={"num_hidden_layers":4,"hidden_size":64}',
        "--train.micro_batch_size=4",
        "--train.steps=6",
        f"--train.output_dir={tmp_path / 'run'}",
        "--train.device=cpu",
        "--optim.lr=3e-3",
        "--lisa.gamma=1",
        "--lisa.interval=2",
        "--logging.progress=false",
        *extra,
    ]


def torchrun(script: str, args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run tests/distributed/drivers/<script> under `torchrun --standalone` (the OS picks a free port); fail with
    the ranks' output."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(DRIVERS / script),
        *args,
    ]
    return run_launcher(cmd, timeout)


def quick_study(module: str, tmp_path: Path, *extra: str, timeout: int = 400) -> str:
    """`python -m benchmarks.MODULE --quick` with its results in tmp_path/out and its work in tmp_path/work; the
    stdout (the test fails with the output's tail if the study does)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            f"benchmarks.{module}",
            "--quick",
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def launcher_env() -> dict[str, str]:
    # The venv's launchers first on PATH; DeepSpeed's CPU comm op compiled once into the repo's ignored cache.
    # No GPU for the ranks even on a GPU host: these tests compare gloo ranks on the CPU with a CPU reference.
    # The repo first on the path: drivers started by file import benchmarks.lib (the counters kept out of the wheel).
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
    }


ABORT_MARK = "terminate called"


def exit_race_command(*args: str) -> list[str]:
    """benchmarks/exit_race.py on two ranks started side by side as plain SLURM tasks are, with torch's default
    OpenMP threads (torchrun would set OMP_NUM_THREADS=1: fewer threads contend with gloo's workers and the race
    is rarer); the command fails when either rank does."""
    rank = (
        f"env -u OMP_NUM_THREADS RANK={{r}} WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT={free_port()} "
        f"{sys.executable} {REPO / 'benchmarks' / 'exit_race.py'} {' '.join(args)}"
    )
    return ["bash", "-c", f"{rank.format(r=0)} & {rank.format(r=1)}; one=$?; wait $!; exit $(( $? | one ))"]


def run_launcher(
    cmd: list[str],
    timeout: int = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a launcher command; fail with the ranks' output when it does not exit 0, or when a rank aborted at exit
    ("terminate called": a launcher may still report success when a rank's abort came late)."""
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=launcher_env() | (env or {}), cwd=REPO
    )
    if proc.returncode != 0 or ABORT_MARK in proc.stdout + proc.stderr:
        raise AssertionError(
            f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_results(out: Path, nproc: int = 2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def local_reference(tmp_path: Path, data_file: Path, *extra: str, micro: int = 4, world: int = 2):
    """The local backend computing exactly the micro-batches `world` ranks of micro batch `micro` compute (micro
    batch `micro`, `world` accumulation steps): per-step records and the final (exact) weights in fp32."""
    from lisa_dist.config import load_config
    from lisa_dist.run import build, train_step

    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path / "ref", data_file, f"--train.micro_batch_size={micro}", f"--train.grad_accum={world}", *extra
        ),
    )
    run = build(cfg)
    records = [train_step(run, s) for s in range(cfg.train.steps)]
    return records, {k: v.detach().float().clone() for k, v in run.backend.exact_state_dict().items()}


def local_eval(tmp_path: Path, data_file: Path, *extra: str, micro: int = 4, world: int = 2):
    """`local_reference`'s losses, and its eval record after the last step (the config must give evaluation
    data)."""
    from lisa_dist.config import load_config
    from lisa_dist.run import build, train_step
    from lisa_dist.run.evaluation import evaluate

    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path / "ref", data_file, f"--train.micro_batch_size={micro}", f"--train.grad_accum={world}", *extra
        ),
    )
    run = build(cfg)
    losses = [train_step(run, s)["loss"] for s in range(cfg.train.steps)]
    return losses, evaluate(run, cfg.train.steps)


# The tiny Llama with its LM head tied to the input embedding (as SmolLM2, Gemma and small Qwen2 models are).
TIED = '--model.config_overrides={"num_hidden_layers":4,"hidden_size":64,"tie_word_embeddings":true}'


def tied_param_count() -> int:
    """What transformers itself builds for the TIED model: the tied weight counted once."""
    from transformers import AutoModelForCausalLM

    from lisa_dist.models import preset_config

    config = preset_config("tiny-llama", {"num_hidden_layers": 4, "hidden_size": 64, "tie_word_embeddings": True})
    return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def load_tied_export(folder: Path):
    """A Hugging Face export of a tied model, loaded as a user would; fails unless the folder holds the tied weight
    once, loads without a warning, and comes back tied."""
    import logging

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    names = set()
    for file in folder.glob("*.safetensors"):  # one file, or the shards of save_final's writer
        with safe_open(str(file), framework="pt") as f:
            names |= set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names, sorted(names)[:5]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.get_logger().addHandler(handler)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder)
    finally:
        hf_logging.get_logger().removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not warnings, warnings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model
