"""Checkpoints that are never half-written: `step-N/` folders with a manifest, a `latest` pointer, keep-last-k.

A checkpoint is written into `step-N.tmp-<id>/` by every rank (the backend's own state under `state/`, each rank's
RNG under `rng/`), then every file is hashed (SHA-256, streamed; the files are shared out among the ranks by size,
so each rank reads about 1/W of the bytes), the main rank lists every file with its size and digest in
`manifest.json`, renames the folder to `step-N`, points `latest` at it (write, then rename), and only then removes
checkpoints beyond the newest `keep_last`. At resume and at export each candidate is checked against its manifest,
newest first, every byte hashed; a truncated or corrupted one is reported and the previous good one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
BEST = "best"
EVAL = "eval.json"
"""In a checkpoint: the last evaluation before it ({"step", "eval_loss"}), what checkpoint.keep_best ranks by."""
PREFIX = "step-"
CHUNK = 8 << 20


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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def files_of(folder: Path) -> dict[str, int]:
    """Every file under `folder` but the manifest: relative name -> bytes."""
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """The names `rank` hashes: the files dealt out largest first to the least loaded rank (the same split on every
    rank, as every rank lists the same folder)."""
    loads = [0] * world
    mine = []
    for name, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        owner = loads.index(min(loads))
        loads[owner] += size
        if owner == rank:
            mine.append(name)
    return mine


def digests(folder: Path, names: Sequence[str]) -> dict[str, str]:
    return {name: sha256(folder / name) for name in names}


def write_manifest(folder: Path, hashed: dict[str, str]) -> dict[str, Any]:
    """`manifest.json` listing every file of `folder` with its size and its digest from `hashed`."""
    sizes = files_of(folder)
    missing = sorted(set(sizes) - set(hashed))
    if missing:
        raise RuntimeError(f"no digest for {', '.join(missing[:3])} of {folder}")
    manifest = {"files": {name: {"bytes": size, "sha256": hashed[name]} for name, size in sizes.items()}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest's file table, or why there is none."""
    if not folder.exists():
        return None, "the folder does not exist"
    if not folder.is_dir():
        return None, "it is a file, not a checkpoint folder"
    path = folder / MANIFEST
    if not path.is_file():
        if any(folder.glob(f"{PREFIX}*")):
            return None, (
                "it is a folder of checkpoints, not one checkpoint: name one of its step-N folders, or "
                "use checkpoint.resume=auto"
            )
        return None, "no manifest.json (the save did not finish, or this is not a lisa_dist checkpoint)"
    try:
        return json.loads(path.read_text())["files"], None
    except (json.JSONDecodeError, KeyError, OSError) as exc:
        return None, f"manifest.json is unreadable ({exc})"


def verify(folder: Path, names: Sequence[str] | None = None, deep: bool = True) -> str | None:
    """None when `folder` matches its manifest, else what is wrong with it.

    Every listed file must exist with its size; with `deep` the files `names` (default: all) are hashed too.
    """
    files, problem = read_manifest(folder)
    if files is None or problem:
        return problem or "manifest.json lists no files"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, the manifest says {entry['bytes']}"
    if not deep:
        return None
    for name in files if names is None else names:
        entry = files.get(name)
        if entry is None:
            continue
        if "sha256" not in entry:
            return f"{name} has no digest in the manifest (written by an older lisa_dist): it cannot be verified"
        if sha256(folder / name) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (the file is corrupted)"
    return None


def manifest_files(folder: Path) -> dict[str, int]:
    """name -> bytes from the manifest (empty when unreadable)."""
    files, _ = read_manifest(folder)
    return {name: entry["bytes"] for name, entry in (files or {}).items()}


def finalize(tmp: Path, root: Path, step: int, keep_last: int, hashed: dict[str, str], keep_best: int = 0) -> Path:
    """Main rank, after every rank wrote into `tmp` and the files were hashed: manifest, rename, `latest`, prune."""
    write_manifest(tmp, hashed)
    final = step_dir(root, step)
    if final.exists() and not is_ours(final):  # a folder of the user's that happens to be named step-N: kept
        aside = root / f"{final.name}.not-a-checkpoint-{new_token()}"
        os.replace(final, aside)
        log.warning("%s was not a lisa_dist checkpoint (no %s or trainer.json): moved to %s", final, MANIFEST, aside)
    elif final.exists():  # a previous attempt at the same step: replaced only by a complete one
        shutil.rmtree(final)
    os.replace(tmp, final)
    _point(root, LATEST, final)
    prune(root, keep_last, keep_best)
    return final


def _point(root: Path, name: str, target: Path) -> None:
    pointer = root / f".{name}.{new_token()}"
    pointer.write_text(target.name + "\n")
    os.replace(pointer, root / name)


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished `step-N` folders, newest first (temporary folders are ignored)."""
    found = []
    for path in root.glob(f"{PREFIX}*") if root.is_dir() else []:
        suffix = path.name[len(PREFIX) :]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found, reverse=True)


def is_ours(folder: Path) -> bool:
    """Whether `folder` was written by lisa_dist as a checkpoint (complete or damaged since)."""
    return (folder / MANIFEST).is_file() or (folder / "trainer.json").is_file()


def eval_loss_of(folder: Path) -> float | None:
    """The eval loss a checkpoint was saved with (None without one)."""
    try:
        return float(json.loads((folder / EVAL).read_text())["eval_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune(root: Path, keep_last: int, keep_best: int = 0) -> None:
    """Keep the newest `keep_last` complete checkpoints (sizes checked, not hashes: the newest was just hashed) and
    the `keep_best` of lowest eval loss (`best` names the lowest); broken ones and stale temporary folders go too.
    The newest complete checkpoint is never removed."""
    # A step-N folder without a manifest or trainer.json was never written by lisa_dist (it renames a checkpoint
    # into place only once both are in it): the user's, left alone.
    found = [(step, path, verify(path, deep=False)) for step, path in checkpoints(root) if is_ours(path)]
    scored = sorted(
        (loss, -step, path)
        for step, path, problem in found
        if keep_best and problem is None and (loss := eval_loss_of(path)) is not None
    )
    best = {path for _, _, path in scored[:keep_best]}
    if best:
        _point(root, BEST, scored[0][2])
    good = 0
    for _, path, problem in found:
        if problem is None and good < keep_last:
            good += 1
            continue
        if problem is None and path in best:
            continue
        if problem is None or good > 0:
            shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(f"{PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def find_resumable(root: Path, explicit: Path | None = None) -> tuple[Path | None, list[Problem]]:
    """The newest checkpoint that matches its manifest, every byte hashed (or `explicit`, which must), and the
    broken ones skipped. One process: export and tools."""
    if explicit is not None:
        problem = verify(explicit)
        return (None, [Problem(explicit, problem)]) if problem else (explicit, [])
    problems: list[Problem] = []
    for _, path in checkpoints(root):
        problem = verify(path)
        if problem is None:
            return path, problems
        problems.append(Problem(path, problem))
    return None, problems
