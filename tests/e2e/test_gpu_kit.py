"""The GPU kit (benchmarks/gpu_kit) on the CPU, so that it cannot rot while no GPU is lent: the quick form here, the
whole check at tiny sizes in the slow tier."""

import json
import subprocess
import sys

import pytest

from benchmarks.gpu_kit import check

from ..helpers import REPO, launcher_env


def _check(out, *args, timeout=600):
    cmd = [sys.executable, "-m", "benchmarks.gpu_kit.check", "--device", "cpu", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=launcher_env(), cwd=REPO, timeout=timeout)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return proc, {r["stage"]: r for r in rows}


def test_quick_cpu_check_reports_every_stage_with_its_figures(tmp_path):
    proc, rows = _check(tmp_path / "out", "--quick")
    assert proc.returncode == 0, (proc.stdout, (tmp_path / "out" / "check.log").read_text()[-4000:])
    assert {name: r["status"] for name, r in rows.items()} == {"versions": "ok", "local": "ok"}
    versions = rows["versions"]["figures"]
    # Every private API docs/internals.md names exists on the locked versions (liger-kernel is not installed here).
    assert [a for a in versions["missing_apis"] if not a.startswith("liger_kernel")] == [], versions["missing_apis"]
    local = rows["local"]["figures"]
    one, eight = local["grad_accum_1"], local["grad_accum_8"]
    assert one["syncs_step_2"] == eight["syncs_step_2"] <= 3, (one["syncs_where"], eight["syncs_where"])
    assert one["state_bytes"] == {k: one["planned"][k] for k in one["state_bytes"]}  # the planner, exactly
    assert "| local | ok |" in (tmp_path / "out" / "summary.md").read_text()


def test_a_stage_past_its_limit_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(check, "LIMITS", {"versions": 0.5, "liger": 60})
    monkeypatch.setattr(check, "_env", lambda device: launcher_env())
    out = tmp_path / "out"
    assert check.run_all(["versions", "liger"], "cpu", out, tmp_path / "work", budget_s=120) == 1
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["status"]) for r in rows] == [("versions", "timeout"), ("liger", "skipped")]
    assert "still running after 1 s" in rows[0]["error"]
    assert check.run_all(["versions"], "cpu", out, tmp_path / "work", budget_s=10) == 0  # no time: skipped
    assert json.loads((out / "results.jsonl").read_text())["error"] == "no time left of --budget-s 10"


@pytest.mark.slow
def test_the_whole_cpu_check_passes_in_under_five_minutes(tmp_path):
    proc, rows = _check(tmp_path / "out", "--budget-s", "300", timeout=420)
    assert proc.returncode == 0, (proc.stdout, (tmp_path / "out" / "check.log").read_text()[-6000:])
    assert set(rows) == {
        "versions",
        "local",
        "quantized",
        "liger",
        "fsdp_nf4",
        "zero2",
        "zero3",
        "compile_resume",
        "methods",
    }
    assert rows["liger"]["status"] == "skipped"
    assert rows["compile_resume"]["figures"]["max_difference"] == 0.0  # bitwise resume on the CPU
    assert rows["fsdp_nf4"]["figures"]["max_difference"] == 0.0
    assert rows["quantized"]["figures"]["lean"]["state_bytes"]["host"] > 0
