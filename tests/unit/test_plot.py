"""`lisa-dist plot`: loss curves and the LISA layer schedule of runs, from metrics files written by the JSONL sink;
bad run folders are refused with one line and exit status 2."""

import pytest
import yaml
from matplotlib.image import imread

from lisa_dist import cli
from lisa_dist.run.metrics import JsonlSink
from lisa_dist.tools import load_run

STEPS = 8


def fake_run(folder, loss_scale=1.0, num_hidden_layers=None):
    """A run folder as training leaves it: a record a step (two of four layers, switched every 2 steps) and an
    evaluation every 4 steps; config.yaml when the model's layer count is given."""
    sink = JsonlSink(folder / "metrics.jsonl")
    for step in range(1, STEPS + 1):
        period = (step - 1) // 2
        sink.write(
            {
                "step": step,
                "epoch": 0,
                "loss": loss_scale * 5.0 / step,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens": 128 * step,
                "tokens_per_s": 1000.0,
                "elapsed_s": 0.1 * step,
                "active_layers": sorted({period % 4, (period + 2) % 4}),
                "switched": step % 2 == 1,
                "switch_s": 0.01,
                "trainable_params": 1000,
                "optimizer_state_bytes": 8000,
                "state_bytes": {"params": 4000},
            }
        )
        if step % 4 == 0:
            sink.write(
                {
                    "step": step,
                    "eval_loss": loss_scale * 6.0 / step,
                    "eval_ppl": 2.0,
                    "eval_tokens": 256,
                    "tokens": 128 * step,
                    "eval_s": 0.05,
                }
            )
    sink.close()
    if num_hidden_layers:
        model = {"name": "tiny-llama", "config_overrides": {"num_hidden_layers": num_hidden_layers}}
        (folder / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    return folder


@pytest.fixture
def runs(tmp_path):
    return [fake_run(tmp_path / "lisa_a", 1.0, num_hidden_layers=6), fake_run(tmp_path / "lisa_b", 1.3)]


def test_plot_writes_loss_and_layer_pngs_of_several_runs(tmp_path, runs, capsys):
    out = tmp_path / "plots"
    assert cli.main(["plot", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(out / "loss.png"), str(out / "layers.png")]
    for name in ("loss.png", "layers.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(out / name)
        height, width, channels = image.shape
        assert width > 1000 and height > 400 and channels in (3, 4)
        assert image[..., :3].std() > 0.05, f"{name} is blank"


def test_plot_defaults_to_the_first_runs_plots_folder(runs, capsys):
    assert cli.main(["plot", str(runs[1])]) == 0
    assert capsys.readouterr().out.splitlines() == [
        str(runs[1] / "plots" / "loss.png"),
        str(runs[1] / "plots" / "layers.png"),
    ]
    assert (runs[1] / "plots" / "layers.png").stat().st_size > 5000


def test_load_run_splits_the_records_and_counts_the_layers(runs):
    declared, undeclared = load_run(runs[0]), load_run(runs[1])
    assert [r["step"] for r in declared.train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in declared.eval] == [4, 8]
    assert declared.name == "lisa_a"
    assert declared.num_layers == 6  # config.yaml's model, though layers 4 and 5 never trained
    assert undeclared.num_layers == 4  # no config.yaml: the highest active layer + 1


def test_plot_refuses_a_folder_without_metrics(tmp_path, runs, capsys):
    empty_dir = tmp_path / "not_a_run"
    empty_dir.mkdir()
    assert cli.main(["plot", str(runs[0]), str(empty_dir)]) == cli.EXIT_BAD_INPUT
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("lisa-dist: ") and f"{empty_dir / 'metrics.jsonl'} does not exist" in line
    assert not (runs[0] / "plots").exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "is empty"),
        ('{"step": 4, "eval_loss": 2.0, "tokens": 10}\n', "holds no training record"),
        ('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n', "line 2: not a JSON record"),
    ],
)
def test_plot_refuses_an_unusable_metrics_file(tmp_path, capsys, text, problem):
    (tmp_path / "metrics.jsonl").write_text(text)
    assert cli.main(["plot", str(tmp_path)]) == cli.EXIT_BAD_INPUT
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("lisa-dist: ") and str(tmp_path / "metrics.jsonl") in line and problem in line
