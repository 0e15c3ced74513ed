"""The quality study end to end in its --quick form (a tiny random model, a few steps), and the real-model cache."""
import json
import subprocess
import sys

import pytest

from lisa_dist.errors import ConfigError
from lisa_dist.tools import prepare_model

from ..helpers import REPO


def test_quick_study_runs_every_method_and_writes_its_report(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    study = json.loads((tmp_path / "quality_quick.json").read_text())
    assert set(study["best"]) == {"full", "lora", "badam", "lisa"}
    results = study["results"]
    methods = {r["method"] for r in results.values()}
    assert methods == {"full", "lora", "badam", "lisa"}
    for result in results.values():
        assert 0 < result["heldout_loss"] < 10 and len(result["curve"]) == 4
    # Each method's best run (LISA: the headline) answered the five held-out prompts.
    for name in [*study["best"].values(), study["headline"]]:
        assert len(results[name]["answers"]) == 5, name
    # Every run saw the same first batch: the same loss before any update.
    assert len({round(r["curve"][0], 5) for r in results.values()}) == 1
    assert any("grad_norm" in name for name in results)
    report = (tmp_path / "quality_quick.md").read_text()
    for section in ("Best run of each method", "LISA ablation", "grad_norm against uniform", "Greedy answers"):
        assert section in report
    assert (tmp_path / "quality_quick_loss.png").stat().st_size > 0


def test_prepare_model_uses_the_converted_folder_and_names_unknown_models(tmp_path):
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    assert prepare_model("smollm2-135m-instruct", tmp_path, install=False) == folder  # no install, no conversion
    with pytest.raises(ConfigError, match="known models are smollm2-135m-instruct"):
        prepare_model("llama-9-1t", tmp_path)
