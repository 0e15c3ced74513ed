"""One metrics processor with pluggable sinks: a JSONL file (what tests read back) and a console line."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line, flushed at every record so a crash loses nothing already logged."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ConsoleSink:
    """A compact line through `logging` every `every` steps."""

    def __init__(self, every: int) -> None:
        self.every = every

    def write(self, record: dict[str, Any]) -> None:
        if record["step"] % self.every == 0:
            log.info(
                "step %d | loss %.4f | lr %.2e | grad_norm %.3f | %.0f tok/s | layers %s",
                record["step"], record["loss"], record["lr"], record["grad_norm"], record["tokens_per_s"],
                record["active_layers"],
            )

    def close(self) -> None:
        pass


class MetricsLogger:
    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def truncate_jsonl(path: str | Path, last_step: int) -> None:
    """Drop records after `last_step` (a run resumed from that step writes them again), and a last line torn by a
    crash."""
    path = Path(path)
    if not path.is_file():
        return
    records = read_jsonl(path)
    kept = [r for r in records if r.get("step", 0) <= last_step]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if text != path.read_text(encoding="utf-8"):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a last line torn by a crash (cut short while written) is left out."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.warning("%s: dropping its last line, torn by an interrupted write (%s)", path, exc)
                break
            raise ValueError(f"{path}, line {number}: not a JSON record ({exc})") from None
    return records
