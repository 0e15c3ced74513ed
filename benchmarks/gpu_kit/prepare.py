"""Prepare the GPU kit's wheels on a machine with a package registry, for a GPU machine without one.

    python -m benchmarks.gpu_kit.prepare [--out .gpu_kit/wheels] [--python-version 3.12]

Downloads, for CPython 3.12 on manylinux x86_64, the wheels the lent GPU machine lacks and the check needs
(datasets and its pure-Python dependencies, torchao, liger-kernel, DeepSpeed's dependencies), at the versions of
constraints.txt (the lock make test passed on), and builds a pure-Python DeepSpeed wheel (DS_BUILD_OPS=0: ops are
built just in time where they are needed, never here) with this venv's CPU torch, without build isolation, so no
CUDA torch is ever fetched. Keeps one version per package, writes manifest.json (name, size, sha256) and fails when
the folder outgrows --limit-mib: a GPU call carries at most 64 MiB, the repo included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from scripts.refresh_lock import normalize, read_lock  # the lock's reader, beside `make lock`'s writer

REPO = Path(__file__).resolve().parents[2]

LOCK = REPO / "constraints.txt"
# The lent machine's image has torch, transformers, accelerate, peft, pyarrow, pandas, xxhash, msgpack, ninja,
# einops, py-cpuinfo, nvidia-ml-py, numpy, packaging, tqdm and pyyaml; these it lacks (or has too old for datasets
# and pydantic).
WHEELS = (
    "datasets",
    "dill",
    "multiprocess",
    "fsspec",
    "torchao",
    "liger-kernel",
    "hjson",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def requirement(name: str, locked: dict[str, str]) -> str:
    version = locked.get(normalize(name))
    return f"{name}=={version}" if version else name


def download(names: tuple[str, ...], out: Path, python_version: str, locked: dict[str, str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "-d",
        str(out),
        "-q",
    ]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run([*cmd, *(requirement(n, locked) for n in names)], check=True)


def build_deepspeed(out: Path, locked: dict[str, str]) -> None:
    """A py3-none-any DeepSpeed wheel from its sdist, ops not prebuilt, with this venv's torch (no isolation)."""
    env = {**os.environ, "DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cuda", "PIP_CONSTRAINT": ""}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-binary",
            "deepspeed",
            "-w",
            str(out),
            "-q",
            requirement("deepspeed", locked),
        ],
        check=True,
        env=env,
    )


def manifest(out: Path) -> list[dict]:
    rows = []
    for wheel in sorted(out.glob("*.whl")):
        rows.append(
            {
                "wheel": wheel.name,
                "bytes": wheel.stat().st_size,
                "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            }
        )
    names = [normalize(r["wheel"].split("-")[0]) for r in rows]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f"prepare.py: two versions of {', '.join(twice)} in {out}: pip --no-deps stops on that")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / ".gpu_kit" / "wheels"))
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--limit-mib", type=float, default=60.0)
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # one version per package: nothing left from an earlier lock
    out.mkdir(parents=True)
    locked = read_lock(LOCK)
    download(WHEELS, out, args.python_version, locked)
    build_deepspeed(out, locked)
    rows = manifest(out)
    total = sum(r["bytes"] for r in rows)
    (out / "manifest.json").write_text(
        json.dumps({"python": args.python_version, "bytes": total, "wheels": rows}, indent=1)
    )
    for r in rows:
        print(f"{r['bytes'] / 2**20:8.2f} MiB  {r['wheel']}")
    print(f"{total / 2**20:8.2f} MiB in {len(rows)} wheels: {out}")
    if total > args.limit_mib * 2**20:
        print(f"prepare.py: {total / 2**20:.1f} MiB is over --limit-mib {args.limit_mib:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
