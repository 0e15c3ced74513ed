"""Stale locks of torch's extension builds, cleared before DeepSpeed builds or loads its ops.

DeepSpeed compiles some ops on first use (on CPU its shm comm op) into TORCH_EXTENSIONS_DIR through torch's
`cpp_extension.load`, which guards each build folder with a `lock` file (`FileBaton`). A process killed during the
build (Ctrl-C, a scheduler's kill) leaves that file behind, and every later load on the machine waits for it
forever, silently. A build in progress runs ninja and the compiler with their working directory in the build
folder; a lock that no such process holds, older than `grace_s` (the builder writes its ninja file in well under a
second before ninja starts), was left by a dead build: it is removed, with a warning naming it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def extensions_root() -> Path:
    """Where torch builds extensions (as `torch.utils.cpp_extension._get_build_directory` derives it)."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def _working_in(folder: Path) -> int | None:
    """A live process whose working directory is `folder` or inside it (Linux /proc), else None."""
    folder = folder.resolve()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd == folder or folder in cwd.parents:
            return int(entry.name)
    return None


def clear_stale_build_locks(root: Path | None = None, grace_s: float = 30.0) -> list[Path]:
    """Remove the build locks under `root` (default: torch's extensions root) that no live build holds; returns
    them. A lock younger than `grace_s`, or whose folder a live process works in, is left alone."""
    root = root or extensions_root()
    removed = []
    for lock in sorted(root.glob("*/lock")) if root.is_dir() else ():
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue  # released meanwhile
        if age < grace_s or not Path("/proc/self").exists():
            continue
        builder = _working_in(lock.parent)
        if builder is not None:
            log.info("%s: a build is in progress (process %d); waiting for it", lock, builder)
            continue
        try:
            lock.unlink()
        except FileNotFoundError:
            continue  # another rank removed it first
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"the build lock {lock} was left by a build that died, and it cannot be "
                f"removed ({exc.strerror}): remove it by hand, or every DeepSpeed start on "
                "this machine waits for it forever",
            ) from None
        log.warning(
            "removed %s: left %.0f s ago by a build of torch extension '%s' that died (no process builds "
            "there); without this, DeepSpeed would wait for it forever",
            lock,
            age,
            lock.parent.name,
        )
        removed.append(lock)
    return removed
