"""The one-shot GPU check: every stage of the CUDA reading's last section, each in its own process, each result
written the moment it ends; a failed or timed-out stage does not stop the next.

    python -m benchmarks.gpu_kit.check --device cuda --out DIR [--budget-s 450] [--stages local zero2 ...]
    python -m benchmarks.gpu_kit.check --device cpu --out DIR [--quick]     # the same stages at tiny sizes

DIR gets results.jsonl (a line per stage: name, status ok|failed|skipped|timeout, error, wall_s, figures),
check.log (every stage's output), machine.json (harness.machine()) and summary.md. benchmarks/gpu_kit/check.sh
installs the carried wheels first; benchmarks/README.md says how to read the results.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.gpu_kit.stages import REPO, STAGES, run_stage

# Each stage's limit in seconds (CUDA), in the order they run: the cheapest and most telling first.
LIMITS = {
    "versions": 60,
    "local": 90,
    "quantized": 90,
    "liger": 60,
    "fsdp_nf4": 120,
    "zero2": 90,
    "zero3": 90,
    "compile_resume": 150,
    "methods": 240,
}
QUICK = ("versions", "local")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", help="results folder (default: a fresh benchmarks/results/<date>_<hardware>_gpu_kit)")
    parser.add_argument(
        "--work", help="scratch folder for the stages' runs (default: OUT_work beside --out, else runs/gpu_kit_work)"
    )
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting stages after this many seconds")
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), help="these stages only (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)} (make test's form)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        run_stage(args.stage, args.device, Path(args.work) / args.stage, Path(args.result))
        return 0
    out = Path(args.out) if args.out else harness.reserve(harness.RESULTS, "gpu_kit")
    scratch = out.parent / f"{out.name}_work" if args.out else REPO / "runs" / "gpu_kit_work"
    work = Path(args.work) if args.work else scratch
    names = [n for n in LIMITS if n in (args.stages or (QUICK if args.quick else LIMITS))]
    return run_all(names, args.device, out, work, args.budget_s)


def run_all(names: list[str], device: str, out: Path, work: Path, budget_s: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    results, log = out / "results.jsonl", out / "check.log"
    results.write_text("")
    log.write_text("")
    (out / "machine.json").write_text(json.dumps(harness.machine(), indent=1))
    env = _env(device)
    start, rows = time.monotonic(), []
    for name in names:
        left = budget_s - (time.monotonic() - start)
        if left < 20:
            row = {"stage": name, "status": "skipped", "error": f"no time left of --budget-s {budget_s:g}"}
        else:
            row = _run(name, device, work, env, min(LIMITS[name] * (1 if device == "cuda" else 2), left), log)
        rows.append(row)
        with results.open("a") as f:  # at once: a check cut short keeps every stage that ended
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(
            f"{name:15s} {row['status']:8s} {row.get('wall_s', 0):6.1f} s  {row.get('error') or ''}"[:300], flush=True
        )
    (out / "summary.md").write_text(summary(rows, device))
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


def _env(device: str) -> dict[str, str]:
    # This python's tools first (torchrun, and the ninja that builds DeepSpeed's just-in-time ops).
    path = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")]))
    env = {
        **os.environ,
        "PATH": path,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
    }
    if device == "cpu":  # never CUDA or NCCL by accident on a GPU host
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    else:  # the reading's advice: less fragmentation across LISA switches
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def _run(name: str, device: str, work: Path, env: dict[str, str], limit: float, log: Path) -> dict:
    result = work / f"{name}.result.json"
    result.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.gpu_kit.check",
        "--stage",
        name,
        "--device",
        device,
        "--work",
        str(work),
        "--result",
        str(result),
    ]
    began = time.monotonic()
    with log.open("a") as f:
        f.write(f"\n===== {name} ({device}, limit {limit:.0f} s)\n")
        f.flush()
        # Its own process group: a stage that runs past its limit is killed with the ranks it started.
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {
                "stage": name,
                "status": "timeout",
                "error": f"still running after {limit:.0f} s",
                "wall_s": round(time.monotonic() - began, 1),
            }
    wall = round(time.monotonic() - began, 1)
    if not result.is_file():
        return {
            "stage": name,
            "status": "failed",
            "error": f"the stage's process exited {code} without a result (see check.log)",
            "wall_s": wall,
        }
    return {"stage": name, **json.loads(result.read_text()), "wall_s": wall}


def summary(rows: list[dict], device: str) -> str:
    lines = [f"# GPU kit: {device}", "", "| stage | status | s | error |", "| --- | --- | --- | --- |"]
    for r in rows:
        error = (r.get("error") or "").replace("\n", " ").replace("|", "/")[:200]
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('wall_s', 0):.1f} | {error} |")
    return "\n".join(lines) + "\n\nFigures: results.jsonl (one line per stage); output: check.log.\n"


if __name__ == "__main__":
    sys.exit(main())
