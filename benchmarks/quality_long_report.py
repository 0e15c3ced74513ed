"""The report of `benchmarks.quality_long`: tables, verdicts and PNGs from the runs done (any subset of them)."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import harness
from benchmarks.quality import compare, spread

if TYPE_CHECKING:
    from benchmarks.quality_long import Study

METRIC = {"sft": ("heldout_loss", "held-out loss"), "cpt": ("heldout_ppl", "held-out perplexity")}
TITLE = {"sft": "Instruction tuning", "cpt": "Continued pretraining on tinyshakespeare"}


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def groups(study: Study, name: str, stage: str) -> dict[str, list[dict]]:
    """arm -> its runs (seed order) of study `name` in `stage`."""
    out: dict[str, list[dict]] = {}
    for r in sorted(study.results.values(), key=lambda r: r["spec"]["seed"]):
        spec = r["spec"]
        if spec["study"] == name and spec["stage"] == stage:
            out.setdefault(spec["arm"], []).append(r)
    return out


def planned(study: Study, arm_name: str) -> int | None:
    from benchmarks.quality_long import full_arm, lisa_arm, lora_arm

    arms = [full_arm(), lora_arm()]
    if study.sweep_done():
        best = study.best_lisa()
        arms += [lisa_arm(best, study.layers), lisa_arm(study.lisa_at_lora_memory(best), study.layers)]
    arms += [lisa_arm(s, study.layers) for _, s in study.sweep_settings()]
    arm = next((a for a in arms if a.name == arm_name), None)
    return study.planned(arm) if arm is not None else None


def final_table(study: Study, name: str) -> list[str]:
    field, what = METRIC[name]
    runs = groups(study, name, "final")
    if not runs:
        return [f"No {what} at the full horizon yet.", ""]
    steps = next(iter(runs.values()))[0]["spec"]["steps"]
    lines = [
        f"{steps} steps of {study.args.micro_batch} x {study.args.seq_len} tokens. State: params + grads + Adam "
        "moments (+ masters), exact bytes, the planner's and the largest a run measured.",
        "",
        f"| arm | lr | seeds | {what} mean ± spread | range | held-out loss | planned state (MB) | "
        "measured state (MB) | wall per run (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, rs in sorted(runs.items(), key=lambda kv: statistics.fmean(r[field] for r in kv[1])):
        values = [r[field] for r in rs]
        mean, sd = spread(values)
        plan = planned(study, arm)
        lines.append(
            f"| {arm} | {rs[0]['spec']['lr']:g} | {len(rs)} | {mean:.4f} ± {sd:.4f} | {min(values):.4f}-"
            f"{max(values):.4f} | {statistics.fmean(r['heldout_loss'] for r in rs):.4f} | "
            f"{mb(plan) if plan else '-'} | {mb(max(r['state_bytes'] for r in rs))} | "
            f"{statistics.fmean(r['wall_s'] for r in rs):.0f} |"
        )
    return [*lines, ""]


def verdicts(study: Study, name: str, stage: str = "final") -> list[dict]:
    """Each pair of the comparison where both sides ran: the chosen LISA against LoRA and full fine-tuning, LoRA
    against full fine-tuning, and LISA at LoRA's memory against LoRA (at the sweep's horizon: the best LISA
    setting of the sweep instead of the chosen one, which may not have run there)."""
    from benchmarks.quality_long import full_arm, lisa_arm, lora_arm

    field, what = METRIC[name]
    runs = groups(study, name, stage)
    if not study.sweep_done():
        return []
    best = study.best_lisa()
    named = {
        "full": full_arm().name,
        "lora": lora_arm().name,
        "memory": lisa_arm(study.lisa_at_lora_memory(best), study.layers).name,
        "lisa": lisa_arm(best, study.layers).name,
    }
    if stage == "sweep":
        lisa = {a: rs for a, rs in runs.items() if rs[0]["spec"]["method"] == "lisa" and a != named["memory"]}
        named["lisa"] = min(lisa, key=lambda a: lisa[a][0][field]) if lisa else ""
    out = []
    for a, b in (("lisa", "lora"), ("lisa", "full"), ("lora", "full"), ("memory", "lora")):
        if named[a] in runs and named[b] in runs:
            c = compare([r[field] for r in runs[named[a]]], [r[field] for r in runs[named[b]]])
            if min(c["n"]) < 2:  # no spread of its own: against the sweep base's two seeds
                c["strength"] = "one seed"
                c["noise_multiple"] = abs(c["gap"]) / noise if (noise := base_noise(study)) else math.nan
            horizon = runs[named[a]][0]["spec"]["steps"]
            out.append({"study": name, "steps": horizon, "a": named[a], "b": named[b], "what": what, **c})
    return out


def base_noise(study: Study) -> float:
    """The held-out loss gap between the sweep base's two seeds (0 before both ran)."""
    from benchmarks.quality_long import BASE

    runs = groups(study, "sft", "sweep").get(BASE.name, [])
    return abs(runs[0]["heldout_loss"] - runs[1]["heldout_loss"]) if len(runs) > 1 else 0.0


def verdict_line(v: dict) -> str:
    lower, higher = (v["a"], v["b"]) if v["gap"] > 0 else (v["b"], v["a"])
    head = f"- {TITLE[v['study']]}, {v['steps']} steps: {lower} beats {higher} by {abs(v['gap']):.4f} in {v['what']}"
    if v["strength"] == "one seed":
        if v["study"] == "sft" and not math.isnan(v["noise_multiple"]):
            scale = f"{v['noise_multiple']:.1f} times the gap between the sweep base's two seeds"
        else:
            scale = "no seed spread measured for this metric"
        return f"{head} ({v['n'][0]} and {v['n'][1]} seeds; {scale}): confidence **one seed**."
    ranges = "ranges apart" if v["separated"] else "ranges overlap"
    return (
        f"{head} ({v['n'][0]} and {v['n'][1]} seeds; {ranges}; Welch's t-test p = {v['p']:.3f}): confidence "
        f"**{v['strength']}**."
    )


def sweep_table(study: Study) -> tuple[list[str], dict]:
    from benchmarks.quality_long import BASE, SWEEP, lisa_arm

    runs = groups(study, "sft", "sweep")
    if not runs:
        return ["The sweep has not run yet.", ""], {}
    base_runs = runs.get(BASE.name, [])
    noise = abs(base_runs[0]["heldout_loss"] - base_runs[1]["heldout_loss"]) if len(base_runs) > 1 else math.nan
    base0 = base_runs[0]["heldout_loss"] if base_runs else math.nan
    lines = [
        f"Instruction tuning, {study.args.sweep_steps} steps, seed 0, lr {lisa_arm(BASE, 1).lr:g}; one setting "
        f"changed at a time from the base ({BASE.name}). The base's two seeds differ by {noise:.4f}: a variant is "
        "chosen only when it beats the base by more.",
        "",
        "| setting | value | held-out loss | vs the base | planned state (MB) | measured state (MB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    findings = {}
    for field, values in SWEEP.items():
        scored = {}
        for v in values:
            setting = lisa_arm(replace(BASE, **{field: v}), study.layers)
            rs = runs.get(setting.name)
            if not rs:
                lines.append(f"| {field} | {v} | (not run yet) | | | |")
                continue
            loss = rs[0]["heldout_loss"]
            scored[v] = loss
            plan = planned(study, setting.name)
            lines.append(
                f"| {field} | {v} | {loss:.4f} | {loss - base0:+.4f} | {mb(plan) if plan else '-'} | "
                f"{mb(rs[0]['state_bytes'])} |"
            )
        if len(scored) == len(values):
            best = min(scored, key=scored.get)
            numeric = all(isinstance(v, int | float) for v in values)
            edge = numeric and best in (min(values), max(values))
            findings[field] = {
                "best": best,
                "scores": scored,
                "beats_noise": scored[best] < scored[getattr(BASE, field)] - noise,
                "edge": edge,
            }
    return [*lines, ""], {"noise": noise, "findings": findings}


def plot_curves(study: Study, name: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = groups(study, name, "final")
    if not runs:
        return False
    start = next((r["evals"][0] for rs in runs.values() for r in rs if r["evals"] and r["evals"][0]["step"] == 0), None)
    key = "loss" if name == "sft" else "ppl"
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for arm, rs in runs.items():
        series = [([start] if start and r["evals"][0]["step"] else []) + r["evals"] for r in rs]
        length = min(len(s) for s in series)
        xs = [series[0][i]["tokens"] for i in range(length)]
        ys = [[s[i][key] for s in series] for i in range(length)]
        (line,) = ax.plot(xs, [statistics.fmean(y) for y in ys], marker="o", markersize=3, label=f"{arm} ({len(rs)})")
        if len(rs) > 1:
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(f"held-out {'loss' if key == 'loss' else 'perplexity'}")
    # The other of the two: perplexity is exp(loss).
    if key == "loss":
        other = ax.secondary_yaxis("right", functions=(np.exp, np.log))
        other.set_ylabel("held-out perplexity")
    else:
        other = ax.secondary_yaxis("right", functions=(np.log, np.exp))
        other.set_ylabel("held-out loss")
    ax.set_title(f"{TITLE[name]}: mean over seeds (n), band = min-max")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def front_points(study: Study) -> list[tuple[str, str, float, int | None, int]]:
    """(stage, arm, mean held-out loss, planned state, measured state) of every instruction-tuning arm."""
    out = []
    for stage in ("final", "sweep"):
        for arm, rs in groups(study, "sft", stage).items():
            plan = planned(study, arm)
            loss = statistics.fmean(r["heldout_loss"] for r in rs)
            out.append((stage, arm, loss, plan, max(r["state_bytes"] for r in rs)))
    return out


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both memory and loss (lower is better in each)."""
    return [
        i
        for i, (m, loss) in enumerate(points)
        if not any(m2 <= m and l2 <= loss and (m2, l2) != (m, loss) for m2, l2 in points)
    ]


def plot_front(study: Study, path: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = front_points(study)
    if not points:
        return []
    lines = [
        "| horizon | arm | held-out loss | planned state (MB) | measured state (MB) | on the front |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, stage in zip(axes, ("final", "sweep"), strict=True):
        mine = [p for p in points if p[0] == stage]
        if not mine:
            ax.set_visible(False)
            continue
        front = set(pareto([(p[4], p[2]) for p in mine]))
        ordered = sorted(range(len(mine)), key=lambda i: mine[i][4])
        for i in ordered:
            _, arm, loss, plan, measured = mine[i]
            lines.append(
                f"| {'full' if stage == 'final' else 'sweep'} | {arm} | {loss:.4f} | {mb(plan) if plan else '-'} | "
                f"{mb(measured)} | {'yes' if i in front else ''} |"
            )
            ax.scatter(measured / 1e6, loss, color="C3" if i in front else "C0", zorder=3)
            ax.annotate(arm, (measured / 1e6, loss), fontsize=6, xytext=(3, 3), textcoords="offset points")
        xs = sorted((mine[i][4] / 1e6, mine[i][2]) for i in front)
        ax.plot([x for x, _ in xs], [y for _, y in xs], color="C3", linewidth=1)
        steps = study.args.steps if stage == "final" else study.args.sweep_steps
        ax.set_title(f"instruction tuning, {steps} steps: the front in red")
        ax.set_xlabel("device state, MB (params + grads + Adam moments, measured)")
        ax.set_ylabel("held-out loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [*lines, ""]


def report(study: Study, elapsed_s: float) -> None:
    args = study.args
    stem = harness.reserve(args.out, args.name)
    sweep_lines, sweep = sweep_table(study)
    all_verdicts = verdicts(study, "sft") + verdicts(study, "cpt") + verdicts(study, "sft", "sweep")
    todo = study.todo()
    model = "a tiny random Llama (--quick)" if args.quick else "SmolLM2-135M-Instruct"
    lines = [
        "# Where LISA earns its place: the long study",
        "",
        f"{model}, {study.layers} layers. The runs: `python -m benchmarks.quality_long` (resumed across "
        f"driver restarts; this report's own command is at the end); the study's time so far: {elapsed_s / 60:.1f} "
        f"minutes on this machine (runs side by side, {args.threads} thread each); {len(study.results)} runs "
        f"done, {len(todo)} still to run (run the command again to go on).",
        "",
        "Every run: the data and settings of `benchmarks.quality` (bf16 autocast, AdamW, warmup 10% + cosine), "
        f"{args.micro_batch} rows of {args.seq_len} tokens a step. Learning rates: the best of that study's "
        "32-step sweep for each method, not swept again at this horizon.",
        "",
        "## 1. The sweep of LISA's settings",
        "",
        *sweep_lines,
    ]
    if study.sweep_done():
        best = study.best_lisa()
        memory = study.lisa_at_lora_memory(best)
        lines += [f"Chosen for the full horizon: **{best.name}**. At LoRA r 32's memory: **{memory.name}**.", ""]
    for field, f in sweep.get("findings", {}).items():
        edge = " It sits on the grid's edge: a value beyond it might do better." if f["edge"] else ""
        lines.append(
            f"- {field}: best {f['best']}"
            + (" (beats the base by more than the noise)" if f["beats_noise"] else " (within the noise of the base)")
            + f".{edge}"
        )
    lines += ["", "## 2. A full epoch", ""]
    for name in ("sft", "cpt"):
        lines += [f"### {TITLE[name]}", "", *final_table(study, name)]
        png = stem.with_name(f"{stem.name}_{name}.png")
        if plot_curves(study, name, png):
            lines += [f"![{TITLE[name]}]({png.name})", ""]
    lines += ["## 3. Verdicts", ""]
    lines += [verdict_line(v) for v in all_verdicts] or ["None yet: the final comparison has no pairs."]
    lines += ["", "## 4. Quality against memory", ""]
    front_png = stem.with_name(f"{stem.name}_front.png")
    front = plot_front(study, front_png)
    if front:
        lines += [*front, f"![loss against memory]({front_png.name})", ""]
    if todo:
        lines += ["## Not run yet", "", *[f"- {s['key']}" for s in todo], ""]
    data = {
        "elapsed_s": elapsed_s,
        "planned": {arm: planned(study, arm) for arm in {r["spec"]["arm"] for r in study.results.values()}},
        "chosen": {"best": study.best_lisa().name, "memory": study.lisa_at_lora_memory(study.best_lisa()).name}
        if study.sweep_done()
        else None,
        "sweep": sweep,
        "verdicts": all_verdicts,
        "todo": [s["key"] for s in todo],
        "results": study.results,
    }
    harness.write_stem(stem, lines, data)
