"""One metrics processor with pluggable sinks: a JSONL file (what tests read back), a console line, TensorBoard and
Weights & Biases.

Records are of two kinds, both with an integer "step": training records (loss, lr, grad_norm, tokens, ...) and
evaluation records, told apart by their "eval_loss" key. The trackers get each record's numbers as tags
"train/<key>" or "eval/<key>" (`scalars`).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from lisa_dist.errors import ConfigError, first_line

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
        if "eval_loss" in record:
            log.info(
                "eval at step %d | loss %.4f | perplexity %.3f | %d tokens in %.1f s",
                record["step"],
                record["eval_loss"],
                record["eval_ppl"],
                record["eval_tokens"],
                record["eval_s"],
            )
            return
        if record["step"] % self.every == 0:
            log.info(
                "step %d | loss %.4f | lr %.2e | grad_norm %.3f | %.0f tok/s | layers %s",
                record["step"],
                record["loss"],
                record["lr"],
                record["grad_norm"],
                record["tokens_per_s"],
                record["active_layers"],
            )

    def close(self) -> None:
        pass


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a record as tracker tags: "eval/<key>" for an evaluation record (one with "eval_loss"),
    "train/<key>" otherwise; nested dicts as "train/state_bytes/params", bools as 0/1; lists, strings and None are
    left out, and so is "step" (the x axis)."""
    kind = "eval" if "eval_loss" in record else "train"
    return dict(_numbers({key: value for key, value in record.items() if key != "step"}, kind))


def _numbers(values: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    for key, value in values.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            yield from _numbers(value, tag)
        elif isinstance(value, bool):
            yield tag, int(value)
        elif isinstance(value, int | float):
            yield tag, value


def _import_tracker(module: str, field: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"{field}=true needs the {extra} package, which cannot be imported ({exc}): pip install -e .[{extra}]"
        ) from None


class TensorBoardSink:
    """Every number of each record as a TensorBoard scalar (the tags of `scalars`), flushed at every record."""

    def __init__(self, log_dir: str | Path, start_step: int = 0) -> None:
        tensorboard = _import_tracker("torch.utils.tensorboard", "logging.tensorboard", "tensorboard")
        # A run resumed from `start_step` logs the steps after it again: TensorBoard hides what an earlier launch
        # wrote for them instead of drawing both.
        self._writer = tensorboard.SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, record["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


INIT_TIMEOUT_S = 15.0
"""How long an online W&B start may take before the run stops with a line saying so (W&B's default is 90 s)."""


class WandbSink:
    """Every number of each record to a Weights & Biases run (the tags of `scalars`) at the record's step.

    mode "offline" needs no network and no account: the run is a folder under `<run_dir>/wandb`, uploaded later
    with `wandb sync`. "online" needs credentials already configured (`wandb login` or WANDB_API_KEY); there is no
    login prompt. `resume_id` continues that run (its id is `run_id`)."""

    def __init__(
        self,
        project: str,
        run_dir: str | Path,
        config: dict[str, Any],
        mode: str = "offline",
        name: str | None = None,
        resume_id: str | None = None,
    ) -> None:
        wandb = _import_tracker("wandb", "logging.wandb", "wandb")
        if mode == "online" and not wandb.login(prompt=False, verify=False):
            raise ConfigError(
                "logging.wandb_mode='online' needs W&B credentials and none are configured: run "
                "`wandb login` or set WANDB_API_KEY, or use logging.wandb_mode=offline and "
                "`wandb sync` the run folder later"
            )
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        try:
            self._run = wandb.init(
                project=project,
                dir=str(run_dir),
                config=config,
                mode=mode,
                name=name,
                id=resume_id,
                resume="allow" if resume_id else None,
                settings=wandb.Settings(silent=True, init_timeout=INIT_TIMEOUT_S),
            )
        except wandb.errors.Error as exc:  # no network, a bad key, a server that does not answer in time
            first = first_line(exc)
            raise ConfigError(
                f"logging.wandb_mode={mode!r}: W&B did not start within {INIT_TIMEOUT_S:g} s ({first}): "
                "check the network and the credentials, or use logging.wandb_mode=offline and "
                "`wandb sync` the run folder later"
            ) from None
        self.run_id: str = self._run.id
        if mode == "offline":
            folder = Path(self._run.dir).parent
            log.info("W&B offline run %s in %s: upload it with `wandb sync %s`", self.run_id, folder, folder)
        else:
            log.info("W&B run %s: %s", self.run_id, self._run.url)

    def write(self, record: dict[str, Any]) -> None:
        self._run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self._run.finish()


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
            raise ConfigError(
                f"{path}, line {number}: not a JSON record ({exc}): the run's metrics file is "
                "damaged; repair or delete that line (or move the file away) and launch again"
            ) from None
    return records
