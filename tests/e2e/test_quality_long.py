"""The long quality study end to end in its --quick form (a tiny random model, 2 steps a run): the sweep of LISA's
settings, the choice it makes, the full-horizon comparison of both studies with seeds, LISA at LoRA's memory, the
report; the planner's state bytes equal every run's measured ones; a study run again has nothing left to do."""

import json
from dataclasses import replace

from benchmarks import harness
from benchmarks.quality_long import BASE, SWEEP, lisa_arm

from ..helpers import quick_study


def quick(tmp_path, *extra):
    return quick_study("quality_long", tmp_path, *extra, timeout=400)


def test_quick_long_study_sweeps_chooses_compares_and_resumes(tmp_path):
    quick(tmp_path)
    study = json.loads(harness.latest("quality_long_quick", tmp_path / "out").read_text())
    results = list(study["results"].values())
    assert study["todo"] == []
    # The sweep: the base at two seeds and every other value of each setting once, at seed 0; beside it, at its
    # horizon, full fine-tuning, LoRA and LISA at LoRA's memory.
    chosen = study["chosen"]
    sweep = {}
    for r in results:
        if r["spec"]["stage"] == "sweep":
            sweep.setdefault(r["spec"]["arm"], set()).add(r["spec"]["seed"])
    settings = {lisa_arm(replace(BASE, **{f: v}), 8).name for f, values in SWEEP.items() for v in values}
    assert len(settings) == 1 + sum(len(values) - 1 for values in SWEEP.values())
    assert sweep == {
        **{name: {0} for name in settings},
        BASE.name: {0, 1},
        "full fine-tuning": {0},
        "LoRA r 32": {0},
        chosen["memory"]: {0},
    }
    assert set(study["sweep"]["findings"]) == set(SWEEP)
    assert {v["steps"] for v in study["verdicts"]} == {2}
    # The full horizon: full fine-tuning, LoRA and the chosen LISA at seeds 0 and 1 in both studies, and LISA at
    # LoRA's memory (bf16 frozen layers, frozen always-trained modules) at seed 0.
    for name in ("sft", "cpt"):
        final = {}
        for r in results:
            if r["spec"]["study"] == name and r["spec"]["stage"] == "final":
                final.setdefault(r["spec"]["arm"], set()).add(r["spec"]["seed"])
        assert final == {"full fine-tuning": {0, 1}, "LoRA r 32": {0, 1}, chosen["best"]: {0, 1}, chosen["memory"]: {0}}
    assert "scale 0, bfloat16 frozen" in chosen["memory"]
    # Exact bytes: the planner's state of every arm is what each of its runs measured; LISA at LoRA's memory does
    # not exceed LoRA's.
    for r in results:
        assert r["state_bytes"] == study["planned"][r["spec"]["arm"]], r["key"]
    assert study["planned"][chosen["memory"]] <= study["planned"]["LoRA r 32"]
    # Curves of the held-out metric for every arm, from the untrained weights on.
    for name in ("sft", "cpt"):
        starts = [r for r in results if r["spec"]["study"] == name and r["evals"][0]["step"] == 0]
        assert len(starts) == 1 and starts[0]["spec"]["arm"] == "full fine-tuning"
        assert (
            tmp_path / "out" / f"{harness.latest('quality_long_quick', tmp_path / 'out').stem}_{name}.png"
        ).is_file()
    assert "## 4. Quality against memory" in harness.latest("quality_long_quick", tmp_path / "out", ".md").read_text()
    # Run again: every run is done, none runs twice.
    assert f"{len(results)} runs done, 0 to go" in quick(tmp_path)
