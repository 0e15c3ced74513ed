"""Checkpoints that are never half-written: `step-N/` folders with a manifest, a `latest` pointer, keep-last-k.

A checkpoint is written into `step-N.tmp-<id>/` by every rank (the backend's own state under `state/`, each rank's
RNG under `rng/`), then the main rank lists every file with its size (and the SHA-256 of files up to 1 MiB) in
`manifest.json`, renames the folder to `step-N`, points `latest` at it (write, then rename), and only then removes
checkpoints beyond the newest `keep_last`. At resume each candidate is checked against its manifest, newest first;
a truncated or corrupted one is reported and the previous good one is used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
HASHED_MAX_BYTES = 1 << 20
PREFIX = "step-"


@dataclass(frozen=True)
class Problem:
    checkpoint: Path
    reason: str


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step}"


def temp_dir(root: Path, step: int, token: str) -> Path:
    return root / f"{PREFIX}{step}.tmp-{token}"


def new_token() -> str:
    return uuid.uuid4().hex[:12]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        entry: dict[str, Any] = {"bytes": path.stat().st_size}
        if entry["bytes"] <= HASHED_MAX_BYTES:
            entry["sha256"] = _sha256(path)
        files[str(path.relative_to(folder))] = entry
    manifest = {"files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify(folder: Path) -> str | None:
    """None when `folder` matches its manifest, else what is wrong with it."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        return f"manifest.json is unreadable ({exc})"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, the manifest says {entry['bytes']}"
        if "sha256" in entry and _sha256(path) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def finalize(tmp: Path, root: Path, step: int, keep_last: int) -> Path:
    """Main rank, after every rank wrote into `tmp`: manifest, rename, `latest`, then prune."""
    write_manifest(tmp)
    final = step_dir(root, step)
    if final.exists():  # a previous attempt at the same step: replaced only by a complete one
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".{LATEST}.{new_token()}"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    prune(root, keep_last)
    return final


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished `step-N` folders, newest first (temporary folders are ignored)."""
    found = []
    for path in root.glob(f"{PREFIX}*") if root.is_dir() else []:
        suffix = path.name[len(PREFIX):]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found, reverse=True)


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` good checkpoints; broken ones and stale temporary folders go too. The newest good
    checkpoint is never removed."""
    good = 0
    for _, path in checkpoints(root):
        problem = verify(path)
        if problem is None and good < keep_last:
            good += 1
            continue
        if problem is None or good > 0:
            shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(f"{PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def find_resumable(root: Path, explicit: Path | None = None) -> tuple[Path | None, list[Problem]]:
    """The newest checkpoint that matches its manifest (or `explicit`, which must), and the broken ones skipped."""
    if explicit is not None:
        problem = verify(explicit)
        return (None, [Problem(explicit, problem)]) if problem else (explicit, [])
    problems = []
    for _, path in checkpoints(root):
        problem = verify(path)
        if problem is None:
            return path, problems
        problems.append(Problem(path, problem))
    return None, problems
