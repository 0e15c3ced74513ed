"""Does a finished run exit 0 every time? Launch each 2-rank path N times and count non-zero exits and aborts.

    python -m benchmarks.exit_stress [--runs 30] [--paths fsdp zero2 ...] [--minutes 20] [--name exit_stress]

Paths: local (one process), fsdp (torchrun; also saving a checkpoint at each step), zero2 and zero3 (the deepspeed
launcher; ZeRO-3 also under torchrun saving checkpoints), mpirun (FSDP), the
transformers.Trainer driver on DDP, FSDP2 and ZeRO-3 (torchrun), the collective-counting driver (torchrun), the
checkpoint driver (torchrun, saving through `resume.save` and closing the backend itself), and the race made
frequent (benchmarks/exit_race.py: plain torch as gloo-race, through lisa_dist.dist as gloo-race-lisa-dist). Each
run trains 2 steps of the tiny Llama (the race: a few all-reduces) and must exit 0; a run counts as an abort when
any rank died of SIGABRT or printed "terminate called". A path stops early when its `--minutes` are spent. Writes
benchmarks/results/<date>_<hardware>_<name>.md and .json, and keeps the output of every failed run under
runs/exit_stress/; a rank that aborts leaves a core dump where `kernel.core_pattern` says (the runs allow cores).
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness
from tests.helpers import DRIVERS, exit_race_command, free_port, launcher_env, tiny_overrides, write_text_data

REPO = Path(__file__).resolve().parents[1]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
DS = {stage: f"--backend.ds_config={REPO / 'ds_configs' / f'{stage}.json'}" for stage in ("zero2", "zero3")}
ABORT = re.compile(r"terminate called|SIGABRT|Signal 6 \(SIGABRT\)|exitcode\s*:\s*-6")


def command(path: str, work: Path, data: Path) -> list[str]:
    """The launch command of one run of `path`, writing under `work`."""
    over = tiny_overrides(work, data, "--train.steps=2", "--logging.level=WARNING")
    train = ["-m", "lisa_dist.cli", "train"]
    if path == "local":
        return [sys.executable, *train, *over]
    if path == "fsdp":
        return [*TORCHRUN, *train, *over, "--backend.name=fsdp"]
    if path == "fsdp-checkpoint":
        return [*TORCHRUN, *train, *over, "--backend.name=fsdp", "--checkpoint.every=1"]
    if path == "zero3-checkpoint":
        return [*TORCHRUN, *train, *over, "--backend.name=deepspeed", DS["zero3"], "--checkpoint.every=1"]
    if path in DS:
        return [
            "deepspeed",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "lisa_dist.cli",
            "train",
            *over,
            "--backend.name=deepspeed",
            DS[path],
        ]
    if path == "mpirun":
        return ["mpirun", "-n", "2", sys.executable, *train, *over, "--backend.name=fsdp"]
    if path.startswith("trainer-"):
        backend = path.split("-", 1)[1]
        return [
            *TORCHRUN,
            str(DRIVERS / "hf_driver.py"),
            str(work / "out"),
            "--backend",
            backend,
            "--",
            *tiny_overrides(work, data, "--train.steps=2", "--lisa.interval=1"),
        ]
    if path == "checkpoint-driver":
        return [
            *TORCHRUN,
            str(DRIVERS / "ckpt_driver.py"),
            str(work),
            "save",
            "2",
            *over,
            "--backend.name=fsdp",
            "--train.steps=4",
        ]
    if path.startswith("gloo-race"):
        return exit_race_command(*(["--lisa-dist"] if path.endswith("lisa-dist") else []))
    if path == "comm":
        return [*TORCHRUN, str(DRIVERS / "comm_driver.py"), str(work), *over, "--backend.name=fsdp"]
    raise SystemExit(f"unknown path {path!r}")


def _allow_cores() -> None:
    # An aborting rank leaves a core where kernel.core_pattern says (gdb -batch -ex bt PYTHON CORE reads it).
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


PATHS = (
    "local",
    "fsdp",
    "fsdp-checkpoint",
    "zero2",
    "zero3",
    "zero3-checkpoint",
    "mpirun",
    "trainer-ddp",
    "trainer-fsdp",
    "trainer-zero3",
    "comm",
    "checkpoint-driver",
    "gloo-race",
    "gloo-race-lisa-dist",
)


def stress(path: str, runs: int, minutes: float, data: Path, keep: Path) -> dict:
    outcomes = {"runs": 0, "nonzero": 0, "aborts": 0, "codes": {}, "seconds": 0.0}
    deadline = time.monotonic() + 60 * minutes
    for i in range(runs):
        if time.monotonic() > deadline:
            break
        with tempfile.TemporaryDirectory(prefix=f"exit_{path}_") as tmp:
            work = Path(tmp)
            start = time.monotonic()
            proc = subprocess.run(
                command(path, work, data),
                cwd=REPO,
                env=launcher_env() | {"PYTHONFAULTHANDLER": "1"},
                capture_output=True,
                text=True,
                timeout=600,
                preexec_fn=_allow_cores,
            )
            outcomes["seconds"] += time.monotonic() - start
        output = proc.stdout + proc.stderr
        aborted = bool(ABORT.search(output)) or proc.returncode == -6
        outcomes["runs"] += 1
        outcomes["nonzero"] += proc.returncode != 0
        outcomes["aborts"] += aborted
        outcomes["codes"][str(proc.returncode)] = outcomes["codes"].get(str(proc.returncode), 0) + 1
        if proc.returncode != 0 or aborted:
            keep.mkdir(parents=True, exist_ok=True)
            (keep / f"{path}-{i}.log").write_text(output)
        print(f"{path:14s} run {i + 1:3d}: exit {proc.returncode}{' ABORT' if aborted else ''}", flush=True)
    return outcomes


def main() -> None:
    parser = harness.parser(__doc__, "exit_stress")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--minutes", type=float, default=20.0, help="time budget per path")
    args = parser.parse_args()
    if shutil.which("mpirun", path=launcher_env()["PATH"]) is None and "mpirun" in args.paths:
        args.paths.remove("mpirun")
    keep = REPO / "runs" / "exit_stress" / args.name
    with tempfile.TemporaryDirectory() as tmp:
        data = write_text_data(Path(tmp) / "data.jsonl")
        results = {path: stress(path, args.runs, args.minutes, data, keep) for path in args.paths}
    lines = [
        f"`python -m benchmarks.exit_stress --runs {args.runs} --paths {' '.join(args.paths)}` ({args.name}): "
        "each run trains 2 steps on 2 ranks (local: one process; gloo-race: a few all-reduces) and must exit 0.",
        "",
        "| path | runs | non-zero exits | aborts (SIGABRT / terminate called) | exit codes | s per run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for path, r in results.items():
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(r["codes"].items()))
        lines.append(
            f"| {path} | {r['runs']} | {r['nonzero']} | {r['aborts']} | {codes} | "
            f"{r['seconds'] / max(1, r['runs']):.1f} |"
        )
    harness.write_results(args.out, args.name, lines, results)


if __name__ == "__main__":
    main()
