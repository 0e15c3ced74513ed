"""Refresh constraints.txt, the lock that `make venv`, CI and `make demo` install through (`make lock`).

Installs the newest releases that pyproject.toml allows into a scratch venv (torch from TORCH_PIN first, as `make venv`
does, so no CUDA build is fetched), runs the test suite there (`make test`'s selection, or --pytest-args), and only
if it passes writes the scratch venv's exact versions to the lock and prints what changed. A failing run leaves
the lock as it was and says so (exit 1)."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
HEADER = """\
# The exact versions `make test` passed on, on this project's CPU machine (Python {python}, {date}).
# `make venv` (so `make test`, `make demo` and CI) installs through it: pip install -c constraints.txt.
# Users' `pip install lisa_dist` reads pyproject.toml's lower bounds instead. Refresh with `make lock`, which installs
# the newest releases in a scratch venv, runs the tests there and rewrites this file only when they pass.
"""


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
            if match:
                pins[normalize(match.group(1))] = match.group(2)
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def freeze(python: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--all", "--exclude-editable"], check=True, capture_output=True, text=True
    ).stdout
    pins = {}
    for line in out.splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if match:  # a local version label (torch's +cpu) is this machine's build, not part of the pin
            pins[normalize(match.group(1))] = match.group(2).split("+")[0]
    return pins


def changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(old.keys() | new.keys()):
        if name not in new:
            lines.append(f"  - {name} {old[name]} (no longer installed)")
        elif name not in old:
            lines.append(f"  + {name} {new[name]} (new)")
        elif old[name] != new[name]:
            lines.append(f"  ~ {name} {old[name]} -> {new[name]}")
    return lines


def write_lock(pins: dict[str, str], python_version: str) -> None:
    body = "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))
    LOCK.write_text(HEADER.format(python=python_version, date=time.strftime("%Y-%m-%d")) + body)


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".cache" / "lock-venv", help="the scratch venv (made anew)")
    parser.add_argument("--torch", default="torch==2.13.0", help="the torch requirement installed first")
    parser.add_argument("--python", default=sys.executable, help="the interpreter the scratch venv is made from")
    parser.add_argument("--pytest-args", default="-q -m 'not slow' tests", help="what the tests run")
    args = parser.parse_args(argv)
    shutil.rmtree(args.venv, ignore_errors=True)
    run([args.python, "-m", "venv", str(args.venv)])
    python = args.venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip", "wheel", "setuptools"])
    run([str(python), "-m", "pip", "install", "-q", args.torch])
    # torch held where it is: a newer torch on the index is a CUDA build of several GB, never wanted here.
    hold = args.venv / "torch-constraint.txt"
    hold.write_text(args.torch + "\n")
    run([str(python), "-m", "pip", "install", "-q", "-c", str(hold), "-e", ".[all,test,docs]"])
    new = freeze(python)
    old = read_lock(LOCK)
    diff = changes(old, new)
    print("newest releases against the lock:\n" + ("\n".join(diff) if diff else "  (no change)"), flush=True)
    tests = subprocess.run(f"{python} -m pytest {args.pytest_args}", shell=True, cwd=ROOT)
    if tests.returncode != 0:
        print(
            f"the tests failed (exit {tests.returncode}) on the newest releases: {LOCK.name} is unchanged", flush=True
        )
        return 1
    version = subprocess.run(
        [str(python), "-c", "import platform; print(platform.python_version())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    write_lock(new, version)
    print(f"the tests passed: {LOCK.name} written" + (f" ({len(diff)} changes above)" if diff else ", unchanged pins"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
