"""The benchmarks' harness (benchmarks/harness.py): results named by date and hardware, never overwritten, carrying
the command and the machine; `latest` finds the newest result of a name and no other name's."""

import datetime
import json

from benchmarks import harness

DAY = datetime.date(2026, 1, 2)


def test_a_result_name_is_never_reused(tmp_path):
    hw = harness.hardware()
    first = harness.write_stem(harness.reserve(tmp_path, "packing", DAY), ["# one"], {"a": 1})
    second = harness.write_stem(harness.reserve(tmp_path, "packing", DAY), ["# two"], [1, 2])
    assert (first.name, second.name) == (f"2026-01-02_{hw}_packing", f"2026-01-02_{hw}_packing-2")
    assert first.with_name(first.name + ".md").read_text().startswith("# one\n")
    one, two = (json.loads(s.with_name(s.name + ".json").read_text()) for s in (first, second))
    assert one["a"] == 1 and two["rows"] == [1, 2]  # a list of rows is kept under "rows"
    assert one["run"]["machine"]["hardware"] == hw and one["run"]["command"]


def test_the_markdown_ends_with_the_command_and_the_machine(tmp_path):
    stem = harness.write_results(tmp_path, "targets", ["# Speed targets"], {})
    text = stem.with_name(stem.name + ".md").read_text()
    assert "Command: `" in text and f"Machine: {harness.hardware()}: " in text


def test_latest_is_the_newest_of_its_name_only(tmp_path):
    for name in (
        "2026-01-02_cpu2_methods.json",
        "2026-01-02_cpu2_methods-2.json",
        "2025-12-31_h100x1_methods.json",
        "2026-02-01_cpu2_methods_smollm2.json",
        "methods.json",
    ):
        (tmp_path / name).write_text("{}")
    assert harness.latest("methods", tmp_path).name == "2026-01-02_cpu2_methods-2.json"
    assert harness.latest("methods_smollm2", tmp_path).name == "2026-02-01_cpu2_methods_smollm2.json"
    assert harness.latest("quality", tmp_path) is None
    assert harness.name_of(tmp_path / "2026-01-02_cpu2_methods-2.json") == "methods"
    # Another name that starts with this one does not take it.
    assert harness.reserve(tmp_path, "methods", datetime.date(2026, 2, 1)).name.endswith("_methods")


def test_hardware_names_the_gpu_model_and_count():
    assert harness.hardware(["NVIDIA H100 80GB HBM3"]) == "h100x1"
    assert harness.hardware(["NVIDIA H200", "NVIDIA H200"]) == "h200x2"
    assert harness.hardware([]).startswith("cpu")
