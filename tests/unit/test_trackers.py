"""The TensorBoard and W&B sinks, read back from the files they write: training and evaluation records as
"train/<key>" and "eval/<key>" scalars, nested dicts flattened, a resumed run's repeated steps, offline W&B without
network or account, and the error that names the config field when a tracker's package is missing."""

import json
import sys
import time
from pathlib import Path

import pytest

from lisa_dist.errors import ConfigError
from lisa_dist.run import TensorBoardSink, WandbSink


def train_record(step: int, loss: float) -> dict:
    return {
        "step": step,
        "epoch": 0,
        "loss": loss,
        "lr": 1e-3 * step,
        "grad_norm": 0.5,
        "tokens": 100 * step,
        "tokens_per_s": 1000.0,
        "elapsed_s": 0.1 * step,
        "active_layers": [step % 4, 3],
        "switched": step == 1,
        "switch_s": 0.01,
        "trainable_params": 4096,
        "optimizer_state_bytes": 32768,
        "state_bytes": {"params": 1000 + step, "grads": 500, "moments": 2000},
    }


EVAL = {"step": 3, "eval_loss": 2.5, "eval_ppl": 12.18, "eval_tokens": 640, "tokens": 300, "eval_s": 0.2}


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_sink_writes_train_and_eval_scalars(tmp_path):
    sink = TensorBoardSink(tmp_path / "tb")
    for step, loss in ((1, 4.0), (2, 3.5), (3, 3.0)):
        sink.write(train_record(step, loss))
    sink.write(EVAL)
    # Read before close: every record is flushed as it is written, so a crash loses none of them.
    scalars = tensorboard_scalars(tmp_path / "tb")
    sink.close()
    assert scalars["train/loss"] == [(1, 4.0), (2, 3.5), (3, 3.0)]
    assert scalars["train/state_bytes/params"] == [(1, 1001), (2, 1002), (3, 1003)]
    assert scalars["train/switched"] == [(1, 1), (2, 0), (3, 0)]
    assert scalars["eval/eval_loss"] == [(3, 2.5)]
    assert scalars["eval/tokens"] == [(3, 300)]
    assert scalars["eval/eval_ppl"] == [(3, pytest.approx(12.18))]
    train_tags = {
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
        "elapsed_s",
        "epoch",
        "switched",
        "switch_s",
        "trainable_params",
        "optimizer_state_bytes",
        "state_bytes/params",
        "state_bytes/grads",
        "state_bytes/moments",
    }
    eval_tags = {"eval_loss", "eval_ppl", "eval_tokens", "tokens", "eval_s"}
    # No step tag (it is the x axis) and no list (active_layers).
    assert set(scalars) == {f"train/{t}" for t in train_tags} | {f"eval/{t}" for t in eval_tags}


def test_tensorboard_sink_resumed_hides_the_steps_after_the_checkpoint(tmp_path):
    first = TensorBoardSink(tmp_path)
    for step in range(1, 5):
        first.write(train_record(step, 10.0 + step))
    first.close()
    resumed = TensorBoardSink(tmp_path, start_step=2)  # resumed from the checkpoint of step 2
    for step in (3, 4):
        resumed.write(train_record(step, float(step)))
    resumed.close()
    assert tensorboard_scalars(tmp_path)["train/loss"] == [(1, 11.0), (2, 12.0), (3, 3.0), (4, 4.0)]


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B transaction log (run-<id>.wandb). The file is a LevelDB-style log: a 7-byte
    header, then 32 KiB blocks of chunks (crc32, length, type; full, first, middle, last), checked with wandb 0.31;
    wandb ships no reader for it any more."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, records, pending = path.read_bytes(), 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_log(path: Path, timeout_s: float = 20.0) -> list:
    """The records of a run's transaction log once its exit record is in it: wandb-core writes the file from its
    own process, and `finish()` can return a moment before the last records reach the disk."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record {timeout_s} s after finish()"
        time.sleep(0.05)


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """W&B quiet, offline and kept out of the home folder: its settings, cache and credentials live in tmp_path."""
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": tmp_path / "config",
        "WANDB_CACHE_DIR": tmp_path / "cache",
        "WANDB_DATA_DIR": tmp_path / "data",
        "NETRC": tmp_path / "netrc",
    }.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_wandb_sink_offline_writes_a_run_folder(wandb_home):
    run_dir = wandb_home / "out"
    sink = WandbSink("lisa-dist-test", run_dir, config={"lisa": {"gamma": 2}}, mode="offline", name="unit")
    for step, loss in ((1, 4.0), (2, 3.5), (3, 3.0)):
        sink.write(train_record(step, loss))
    sink.write(EVAL)
    sink.close()
    (log,) = run_dir.glob(f"wandb/offline-run-*-{sink.run_id}/run-{sink.run_id}.wandb")
    records = finished_log(log)
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[items["_step"]] = items
    assert sorted(rows) == [1, 2, 3]
    assert rows[3]["train/loss"] == 3.0 and rows[3]["eval/eval_loss"] == 2.5 and rows[3]["eval/tokens"] == 300
    assert rows[2]["train/state_bytes/params"] == 1002 and rows[1]["train/switched"] == 1
    assert not any(key.endswith(("active_layers", "/step")) for row in rows.values() for key in row)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "lisa-dist-test" and run.display_name == "unit"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["lisa"] == {"gamma": 2}


def test_wandb_sink_online_without_credentials_does_not_prompt(wandb_home):
    with pytest.raises(ConfigError, match=r"logging.wandb_mode='online' needs W&B credentials.*wandb login"):
        WandbSink("lisa-dist-test", wandb_home / "out", config={}, mode="online")


@pytest.mark.parametrize(
    ("make", "module", "field", "extra"),
    [
        (lambda tmp: TensorBoardSink(tmp), "torch.utils.tensorboard", "logging.tensorboard", "tensorboard"),
        (lambda tmp: WandbSink("p", tmp, config={}), "wandb", "logging.wandb", "wandb"),
    ],
)
def test_missing_tracker_package_names_the_field_and_the_fix(tmp_path, monkeypatch, make, module, field, extra):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when the package is not installed
    with pytest.raises(ConfigError) as caught:
        make(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{field}=true needs the {extra} package")
    assert f"pip install -e .[{extra}]" in message
