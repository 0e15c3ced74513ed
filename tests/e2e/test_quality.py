"""The quality study end to end in its --quick form (a tiny random model, 2 steps a run): every arm of both
studies, the seed stage, the report; a study resumes from its results; and the real-model cache."""

import json

import pytest

from benchmarks import harness
from lisa_dist.errors import ConfigError
from lisa_dist.tools import prepare_model

from ..helpers import quick_study


def quick(tmp_path, *extra):
    return quick_study("quality", tmp_path, *extra, timeout=300)


def test_quick_study_runs_both_studies_seeds_and_report_and_resumes(tmp_path):
    quick(tmp_path)
    written = harness.latest("quality_quick", tmp_path / "out")  # <date>_<hardware>_quality_quick.json
    study = json.loads(written.read_text())
    results = study["results"].values()
    for name in ("sft", "cpt"):
        mine = [r for r in results if r["spec"]["study"] == name]
        # The sweep: every arm (full, LoRA r 8 and 32, LISA gamma 2 and 4, LISA NF4, BAdam), every method.
        assert len({r["spec"]["arm"] for r in mine if r["spec"]["seed"] == 0}) == 7
        assert {r["spec"]["method"] for r in mine} == {"full", "lora", "lisa", "lisa_nf4", "badam"}
        # The seed stage: sft's best two settings of each method (one for a method of one setting), cpt's best.
        for method, chosen in study["best"][name].items():
            seeds = {r["spec"]["seed"] for r in mine if [r["spec"]["arm"], r["spec"]["lr"]] == chosen}
            assert seeds == {0, 1}, (name, method)
        # The sweep: 7 arms, full fine-tuning at 2 lrs; then seed 1 of sft's 8 chosen settings (full 2, LoRA 2, LISA 2,
        # NF4 1, BAdam 1) and of cpt's 5 (one per method).
        assert len(mine) == 8 + (8 if name == "sft" else 5)
        # Same weights, same first batch at seed 0: the same first loss (NF4's frozen layers differ by design).
        first = {
            round(r["curve"][0][1], 5) for r in mine if r["spec"]["seed"] == 0 and r["spec"]["method"] != "lisa_nf4"
        }
        assert len(first) == 1, first
        for r in mine:
            assert 0 < r["heldout_loss"] < 10 and len(r["curve"]) == 2 and r["state_bytes"] > 0
            steps = [e["step"] for e in r["evals"]]
            assert steps in (([1, 2], [0, 1, 2]) if name == "cpt" else ([2], [0, 2]))
            assert len(r.get("answers", [])) == (5 if name == "sft" else 0)
    # Exactly one run per study evaluated the weights before training.
    assert sum(1 for r in results if r["evals"][0]["step"] == 0) == 2
    report = written.with_suffix(".md").read_text()
    for section in (
        "## 1. Instruction tuning",
        "## 2. Continued pretraining",
        "**Claim 1",
        "**Claim 2",
        "Greedy answers",
        "confidence",
    ):
        assert section in report
    assert all(written.with_name(f"{written.stem}_{s}.png").stat().st_size > 0 for s in ("sft", "cpt"))
    # Resume: drop the last three results; only those run again.
    lines = (tmp_path / "work" / "results.jsonl").read_text().splitlines()
    (tmp_path / "work" / "results.jsonl").write_text("\n".join(lines[:-3]) + "\n")
    out = quick(tmp_path)
    assert "3 runs to go" in out and out.count(" held-out loss ") == 3
    again = harness.latest("quality_quick", tmp_path / "out")
    assert again != written  # a result is never overwritten
    assert len(json.loads(again.read_text())["results"]) == len(lines)


def test_prepare_model_uses_the_converted_folder_and_names_unknown_models(tmp_path):
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    assert prepare_model("smollm2-135m-instruct", tmp_path, install=False) == folder  # no install, no conversion
    with pytest.raises(ConfigError, match="known models are smollm2-135m-instruct"):
        prepare_model("llama-9-1t", tmp_path)
