"""What every benchmark shares: its common arguments, a description of the machine, and its result files.

    parser = harness.parser(__doc__, "packing", repeats=5)    # --out, --name (and --repeats N, or --quick)
    args = parser.parse_args()
    harness.write_results(args.out, args.name, lines, data)   # <date>_<hardware>_<name>.md and .json

Results are named by the UTC date and the hardware (`cpu2`: 2 CPU cores and no GPU; `h100x1`: one H100) and are
never overwritten: a name already taken gets `-2`, `-3`, ... The Markdown ends with the command and the machine;
the JSON carries them under "run" (a list of rows is written as {"run": ..., "rows": [...]}). `latest(name)` finds
the newest result of a name, for the scripts that read another's.

    python -m benchmarks.harness machine        # this machine's description, as JSON
    python -m benchmarks.harness reserve NAME   # a fresh result path (no suffix) for NAME, e.g. a folder of files
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
PACKAGES = ("torch", "transformers", "deepspeed", "peft", "torchao")
_STEM = re.compile(r"^(\d{4}-\d{2}-\d{2})_([a-z0-9]+)_(.+?)(?:-(\d+))?$")


def parser(
    doc: str | None,
    name: str,
    *,
    quick: bool = False,
    repeats: int | None = None,
) -> argparse.ArgumentParser:
    """The benchmark's argument parser with the shared options: --out (the results folder), --name (the result's
    name), and --quick or --repeats N where the benchmark has one."""
    found = argparse.ArgumentParser(
        description=(doc or name).strip().splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    found.add_argument("--out", type=Path, default=RESULTS, help="folder of the result files (default: %(default)s)")
    found.add_argument(
        "--name", default=name, help="result name: <date>_<hardware>_<name>.md/.json (default: %(default)s)"
    )
    if quick:
        found.add_argument("--quick", action="store_true", help="a tiny form that checks the pipeline only")
    if repeats is not None:
        found.add_argument("--repeats", type=int, default=repeats, help="timed repeats (default: %(default)s)")
    return found


def machine() -> dict[str, Any]:
    """CPU model and cores, RAM, GPUs (through torch.cuda), OS, Python, the packages' versions, the git commit."""
    gpus = _gpus()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(_ram_bytes() / 2**30, 1),
        "gpus": gpus,
        "hardware": hardware(gpus),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in PACKAGES},
        "commit": _commit(),
    }


def hardware(gpus: list[str] | None = None) -> str:
    """The short name of this machine in result names: `<gpu model>x<count>` (h100x1), else `cpu<cores>`."""
    gpus = _gpus() if gpus is None else gpus
    if not gpus:
        return f"cpu{os.cpu_count()}"
    model = next((w for w in gpus[0].replace("NVIDIA", "").split() if re.fullmatch(r"[A-Za-z]+\d+\w*", w)), "gpu")
    return f"{re.sub(r'[^a-z0-9]', '', model.lower())}x{len(gpus)}"


def describe(info: dict[str, Any]) -> str:
    """One line for a report: hardware, CPU, RAM, GPUs, versions and commit."""
    gpus = f"{len(info['gpus'])} x {info['gpus'][0]}" if info["gpus"] else "no GPU"
    versions = ", ".join(f"{p} {v}" for p, v in info["versions"].items() if v)
    return (
        f"{info['hardware']}: {info['cpu']}, {info['cores']} cores, {info['ram_gib']:g} GiB RAM, {gpus}; "
        f"{info['os']}, Python {info['python']}; {versions}; commit {info['commit']}"
    )


def command() -> str:
    """How this benchmark was started: `python -m benchmarks.NAME ...`, under torchrun when it was."""
    module = Path(sys.argv[0]).resolve()
    try:
        name = ".".join(module.relative_to(REPO).with_suffix("").parts)
    except ValueError:
        name = sys.argv[0]
    world = os.environ.get("LOCAL_WORLD_SIZE") if "TORCHELASTIC_RUN_ID" in os.environ else None
    launcher = f"torchrun --standalone --nproc-per-node {world} -m" if world else "python -m"
    return f"{launcher} {name} {shlex.join(sys.argv[1:])}".strip()


def reserve(out: Path | str, name: str, today: datetime.date | None = None) -> Path:
    """A fresh stem `out/<date>_<hardware>_<name>[-N]` that no file or folder of the results uses yet."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    date = (today or datetime.datetime.now(datetime.timezone.utc).date()).isoformat()
    base = f"{date}_{hardware()}_{name}"
    taken = {p.name for p in out.iterdir()}
    for n in range(1, 10_000):
        stem = base if n == 1 else f"{base}-{n}"
        # A stem's PNGs (stem_*.png) come with its .md or .json; `methods_smollm2` does not take `methods`.
        if not any(t == stem or t.startswith(stem + ".") for t in taken):
            return out / stem
    raise FileExistsError(f"out={out}: no free result name for name={name!r}")


def write_results(out: Path | str, name: str, lines: list[str] | None, data: Any) -> Path:
    """Write `lines` (the Markdown) and `data` (the JSON) under a fresh stem (`reserve`); returns the stem."""
    return write_stem(reserve(out, name), lines, data)


def write_stem(stem: Path, lines: list[str] | None, data: Any, echo: bool = True) -> Path:
    """Write stem.md (`lines`, then the command and the machine) and stem.json (`data` with "run"); prints the
    Markdown when `echo`, and the files' names."""
    info = machine()
    run = {
        "command": command(),
        "machine": info,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    lines = lines if lines is not None else [f"# {stem.name}", "", f"The figures are in {stem.name}.json."]
    footer = ["", "---", f"Command: `{run['command']}`", "", f"Machine: {describe(info)}."]
    text = "\n".join([*lines, *footer]) + "\n"
    stem.with_name(stem.name + ".md").write_text(text)
    write_json(stem, data, run)
    if echo:
        print(text)
    print(f"wrote {stem}.md and .json")
    return stem


def write_json(stem: Path, data: Any, run: dict[str, Any] | None = None) -> Path:
    """stem.json: `data` (a dict, or a list as "rows") with the run's command and machine under "run"."""
    run = run or {"command": command(), "machine": machine()}
    body = {"run": run, **data} if isinstance(data, dict) else {"run": run, "rows": data}
    path = stem.with_name(stem.name + ".json")
    path.write_text(json.dumps(body, indent=1, default=str))
    return path


def latest(name: str, out: Path | str = RESULTS, suffix: str = ".json") -> Path | None:
    """The newest result file of `name` in `out` (by date, then by -N), or None."""
    found = []
    for path in Path(out).glob(f"*_{name}*{suffix}"):
        match = _STEM.match(path.name[: -len(suffix)])
        if match and match.group(3) == name:
            found.append((match.group(1), int(match.group(4) or 1), path))
    return max(found)[2] if found else None


def name_of(path: Path) -> str | None:
    """The result name in a result file's name (`methods` in 2026-01-02_cpu2_methods-2.json), or None."""
    match = _STEM.match(path.name.split(".", 1)[0])
    return match.group(3) if match else None


def read_latest(name: str, out: Path | str = RESULTS) -> dict[str, Any] | None:
    """The newest JSON result of `name` in `out`, or None."""
    path = latest(name, out)
    return json.loads(path.read_text()) if path else None


def _gpus() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" (with local changes)" if dirty.stdout.strip() else "")


def main() -> None:
    cli = argparse.ArgumentParser(description="The harness's own commands.")
    sub = cli.add_subparsers(dest="what", required=True)
    sub.add_parser("machine", help="this machine's description, as JSON")
    reserve_cmd = sub.add_parser("reserve", help="print a fresh result path for NAME")
    reserve_cmd.add_argument("name")
    reserve_cmd.add_argument("--out", type=Path, default=RESULTS)
    args = cli.parse_args()
    if args.what == "machine":
        print(json.dumps(machine(), indent=1))
    else:
        print(reserve(args.out, args.name))


if __name__ == "__main__":
    main()
