"""A run's output folders: checked before the first step, locked for the run's life, never silently overwritten.

- `check_writable`: `train.output_dir` and the checkpoint folder exist (or can be made), are folders and are
  writable, before any step runs; a read-only or full disk is named with its cause, not found after an hour.
- `OutputLock`: an exclusive `flock` on `<folder>/.lisa_dist.lock`, held by the main rank while the run lives, so a
  second job on the same folder is refused (naming the process that holds it) instead of resuming from, or pruning,
  the first one's checkpoints. The kernel drops the lock when its holder dies, however it dies; the file's text
  names the last holder, so a lock left by a dead process is reported and taken over.
- `earlier_run`: what an output folder already holds (a finished run's summary, another run's metrics), so that a
  fresh start never overwrites them unless `train.overwrite=true` asks for it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lisa_dist.config import Config
from lisa_dist.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".lisa_dist.lock"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
# Filesystems without flock (some parallel filesystems mount with noflock) fall back to the holder's pid.
NO_FLOCK = (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.train.output_dir) / "checkpoints")


def metrics_path(cfg: Config) -> Path:
    return Path(cfg.logging.jsonl or Path(cfg.train.output_dir) / METRICS)


def describe_os_error(exc: OSError) -> str:
    """The cause of an OSError in words a user acts on."""
    causes = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the filesystem is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EEXIST: "a file of that name exists",
    }
    return causes.get(exc.errno or 0, exc.strerror or str(exc))


def check_writable(folder: Path, field: str, probe_bytes: int = 2) -> None:
    """Make `folder` if needed and prove `probe_bytes` can be written in it; ConfigError naming `field` otherwise."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{field}={str(folder)!r} is a file, not a folder")
    probe = folder / f".lisa_dist.write-test.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(bytes(probe_bytes))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ConfigError(f"{field}={str(folder)!r} is not writable: {describe_os_error(exc)}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def check_outputs(cfg: Config) -> None:
    """Before the first step: the output and checkpoint folders are folders this process can write into."""
    check_writable(Path(cfg.train.output_dir), "train.output_dir")
    field = "checkpoint.dir" if cfg.checkpoint.dir else "train.output_dir (its checkpoints/ folder)"
    check_writable(checkpoint_root(cfg), field)
    if cfg.logging.jsonl:
        check_writable(Path(cfg.logging.jsonl).parent, "logging.jsonl (its folder)")


def _holder() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})


def _alive(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another host's process: it cannot be checked from here, so assume it runs
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


class OutputLock:
    """Exclusive use of `folder` by this process until `release()` (or its death)."""

    def __init__(self, folder: Path, field: str) -> None:
        self.folder, self.field = folder, field
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    def _read_holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def _refuse(self, holder: dict[str, Any]) -> ConfigError:
        who = (
            f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
            if holder
            else "another process"
        )
        return ConfigError(
            f"{self.field}={str(self.folder)!r} is in use by another run: {who} holds {self.path}. "
            "Two runs on one folder would resume from and prune each other's checkpoints: wait for "
            f"it to finish or stop it, or choose another {self.field}"
        )

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refuse(self._read_holder()) from None
        except OSError as exc:
            if exc.errno not in NO_FLOCK:
                os.close(fd)
                raise
            holder = self._read_holder()
            if holder and _alive(holder) and holder.get("pid") != os.getpid():
                os.close(fd)
                raise self._refuse(holder) from None
        previous = self._read_holder()
        if previous and previous.get("pid") != os.getpid():
            log.warning(
                "%s: taking over a lock left by process %s on %s (since %s), which no longer holds it",
                self.folder,
                previous.get("pid"),
                previous.get("host"),
                previous.get("since"),
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder().encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # Emptied first: a reader then never mistakes a finished run for a dead holder.
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None


@dataclass(frozen=True)
class EarlierRun:
    """What an output folder already holds from an earlier launch."""

    summary: dict[str, Any] | None
    metrics_records: bool
    checkpoints: list[str]


def earlier_run(cfg: Config) -> EarlierRun:
    out = Path(cfg.train.output_dir)
    summary = None
    if (out / SUMMARY).is_file():
        try:
            summary = json.loads((out / SUMMARY).read_text())
        except (OSError, json.JSONDecodeError):
            summary = {}
    metrics = metrics_path(cfg)
    has_records = metrics.is_file() and metrics.stat().st_size > 0
    root = checkpoint_root(cfg)
    found = sorted(p.name for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []
    return EarlierRun(summary, has_records, found)


def remove_earlier_outputs(cfg: Config) -> None:
    """train.overwrite=true: the earlier run's metrics, summary, config and checkpoints go before this one starts."""
    out = Path(cfg.train.output_dir)
    for path in (out / SUMMARY, metrics_path(cfg), out / "config.yaml"):
        path.unlink(missing_ok=True)
    root = checkpoint_root(cfg)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(("step-", "latest", ".latest")):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    log.warning("train.overwrite=true: removed the earlier run's outputs from %s", out)


def replace_dir(new: Path, old: Path) -> None:
    """Put the complete folder `new` in the place of `old` (whole: no file of `old` survives beside it)."""
    if new == old:
        return
    if not old.exists():
        os.replace(new, old)
        return
    aside = old.with_name(f".{old.name}.replaced-{os.getpid()}-{time.time_ns()}")
    os.replace(old, aside)
    os.replace(new, old)
    shutil.rmtree(aside)


def overlap(a: Path, b: Path) -> bool:
    """Whether one of the two folders is, or lies inside, the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def set_aside_metrics(cfg: Config) -> None:
    """Before a restart from step 0 (no checkpoint was usable): keep the earlier metrics under another name."""
    path = metrics_path(cfg)
    if path.is_file() and path.stat().st_size:
        kept = path.with_name(f"{path.name}.before-restart-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(kept)
        log.warning("kept the earlier metrics as %s", kept)
