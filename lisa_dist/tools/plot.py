"""`lisa-dist plot`: PNGs of runs from their metrics files, several runs overlaid.

- loss.png: the training loss (and the evaluation loss, as markers) against the step and against the tokens seen.
- layers.png: which decoder layers trained at each step, one panel a run, so that LISA's schedule shows at a glance.

matplotlib draws without pyplot (a `Figure` of its own), so no display and no global backend are involved.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lisa_dist.config import config_overrides_of
from lisa_dist.errors import ConfigError
from lisa_dist.models import PRESETS, preset_config
from lisa_dist.run import outputs, read_jsonl


@dataclass
class RunMetrics:
    """A run's metrics file read for drawing."""

    name: str
    train: list[dict[str, Any]]
    """Training records, one a step, in step order."""
    eval: list[dict[str, Any]]
    num_layers: int


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write loss.png and layers.png of the runs in `run_dirs` (each a train.output_dir holding metrics.jsonl) into
    `out` (default: <first run>/plots); returns the paths written. ConfigError names a run that cannot be drawn."""
    if not run_dirs:
        raise ConfigError("plot: no run folder given")
    figure = _figure_class()
    dirs = [Path(d) for d in run_dirs]
    names = [d.resolve().name for d in dirs]
    if len(set(names)) < len(names):  # runs/a/out and runs/b/out: the folder names alone do not tell them apart
        names = [str(d) for d in dirs]
    runs = [load_run(d, name) for d, name in zip(dirs, names, strict=True)]
    target = Path(out) if out is not None else dirs[0] / "plots"
    try:
        if target.exists() and not target.is_dir():
            raise ConfigError(
                f"plot: --out {target} is a file, not a folder: name a folder for loss.png and layers.png"
            )
        target.mkdir(parents=True, exist_ok=True)
        return [
            _draw_loss(figure(figsize=(13, 4.8), layout="constrained"), runs, target / "loss.png"),
            _draw_layers(
                figure(figsize=(13, 2.2 + 2.6 * len(runs)), layout="constrained"), runs, target / "layers.png"
            ),
        ]
    except OSError as exc:
        raise ConfigError(
            f"plot: cannot write the plots into {target}: {outputs.describe_os_error(exc)}"
            + (f" ({exc.filename})" if exc.filename else "")
        ) from None


def load_run(run_dir: str | Path, name: str | None = None) -> RunMetrics:
    """The records of a run folder (a train.output_dir) split by kind, and its decoder layer count (the model's in
    its config.yaml where that tells it, else the highest active layer + 1); ConfigError for a folder without a
    usable metrics file."""
    run_dir = Path(run_dir)
    name = name or run_dir.resolve().name
    path = run_dir / outputs.METRICS
    if not run_dir.is_dir():
        raise ConfigError(f"plot: {run_dir} is not a folder (expected a train.output_dir holding {outputs.METRICS})")
    if not path.is_file():
        raise ConfigError(
            f"plot: {path} does not exist: {run_dir} is not a run's train.output_dir, or the run logged no step yet"
        )
    try:
        records = read_jsonl(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"plot: {path} cannot be read: {exc}") from None
    # A record per step: the last one wins where a resumed run wrote a step again.
    train = sorted({r["step"]: r for r in records if "loss" in r and "step" in r}.values(), key=lambda r: r["step"])
    if not train:
        what = "is empty" if not records else "holds no training record (one with step and loss)"
        raise ConfigError(f"plot: {path} {what}: nothing to draw")
    evals = sorted((r for r in records if "eval_loss" in r and "step" in r), key=lambda r: r["step"])
    seen = 1 + max((i for r in train for i in r.get("active_layers", ())), default=-1)
    return RunMetrics(name, train, evals, max(seen, _declared_layers(run_dir) or 0))


def _declared_layers(run_dir: Path) -> int | None:
    """The decoder layer count of the run's model from its config.yaml: a preset (with its overrides) or a local
    folder's config.json; None where it cannot be told without loading the model."""
    try:
        model = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
        name = str(model["name"])
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return None
    if name in PRESETS:
        try:
            return preset_config(name, config_overrides_of(model)).num_hidden_layers
        except (ConfigError, TypeError, ValueError):
            return None
    folder_config = Path(name) / "config.json"
    try:
        fields = json.loads(folder_config.read_text())
    except (OSError, ValueError):
        return None
    layers = fields.get("num_hidden_layers", fields.get("n_layer"))
    return layers if isinstance(layers, int) else None


def _draw_loss(fig, runs: list[RunMetrics], path: Path) -> Path:
    by_step, by_tokens = fig.subplots(1, 2)
    for run, color in zip(runs, _colors(len(runs)), strict=True):
        by_step.plot([r["step"] for r in run.train], [r["loss"] for r in run.train], color=color, label=run.name)
        by_tokens.plot(
            [r["tokens"] for r in run.train if "tokens" in r],
            [r["loss"] for r in run.train if "tokens" in r],
            color=color,
            label=run.name,
        )
        if run.eval:
            by_step.plot(
                [r["step"] for r in run.eval],
                [r["eval_loss"] for r in run.eval],
                "o--",
                color=color,
                markersize=4,
                label=f"{run.name} (eval)",
            )
            with_tokens = [r for r in run.eval if "tokens" in r]
            by_tokens.plot(
                [r["tokens"] for r in with_tokens],
                [r["eval_loss"] for r in with_tokens],
                "o--",
                color=color,
                markersize=4,
                label=f"{run.name} (eval)",
            )
    for ax, xlabel in ((by_step, "step"), (by_tokens, "tokens seen")):
        ax.set(xlabel=xlabel, ylabel="loss", title=f"loss against {xlabel}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def _draw_layers(fig, runs: list[RunMetrics], path: Path) -> Path:
    import numpy as np

    axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]
    for ax, run in zip(axes, runs, strict=True):
        steps = [r["step"] for r in run.train]
        active = np.zeros((run.num_layers, len(steps)))
        for column, record in enumerate(run.train):
            active[record.get("active_layers", []), column] = 1
        # A record stands for the steps since the one before it (logging.log_every > 1 logs every few steps).
        edges = [steps[0] - (steps[1] - steps[0] if len(steps) > 1 else 1), *steps]
        ax.pcolormesh(edges, np.arange(run.num_layers + 1) - 0.5, active, cmap="Blues", vmin=0, vmax=1.25)
        ax.set(
            xlabel="step",
            ylabel="decoder layer",
            title=f"{run.name}: layers trained at each step ({run.num_layers} decoder layers)",
        )
        ax.set_yticks(range(run.num_layers) if run.num_layers <= 32 else range(0, run.num_layers, 8))
    fig.savefig(path, dpi=110)
    return path


def _colors(count: int) -> list:
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(count)]


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(
            f"lisa-dist plot needs matplotlib, which cannot be imported ({exc}): pip install matplotlib"
        ) from None
    return Figure
