"""Peak resident memory of exporting a checkpoint of a model of over 1B parameters, before and after streaming.

    python -m benchmarks.export_memory [--layers 22] [--keep WORKDIR]

Trains a randomly initialised Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32,000-token vocabulary) for
one LISA step on the local backend and saves its checkpoint (fp32, 4.7 GB), then exports that checkpoint in fresh
processes, each measured on its own:

- before: what `lisa-dist export` did until issue 32, step for step: the skeleton allocated whole, `model.pt` read
  whole, loaded into it, `save_pretrained` (one 50 GB shard by default);
- after: `lisa_dist.tools.export` in float32 and bfloat16 at several --max-shard-size values.

Each process reports its peak resident set (VmHWM: anonymous memory plus the file pages it mapped) and the peak of
its anonymous memory alone (RssAnon, sampled every 20 ms), both less what the same process held after its imports.
Results: benchmarks/results/<date>_<hardware>_export_memory.{md,json}.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import harness

GIB = 1024**3
SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
}

# The child process: imports, its baseline, the export, its peaks; one JSON line on stdout.
CHILD = r"""
import json, sys, threading, time
from pathlib import Path

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

import torch, yaml
from lisa_dist.config import from_dict
from lisa_dist.models import allocate, open_model
from lisa_dist.tools import export

mode, ckpt, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
base_anon, base_hwm = status("RssAnon"), status("VmHWM")
peak = [base_anon]
done = threading.Event()

def sample():
    while not done.wait(0.02):
        peak[0] = max(peak[0], status("RssAnon"))

threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
if mode == "before":  # the export of lisa_dist 8fa5159 for a local checkpoint
    cfg = from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    model, tokenizer, _ = open_model(cfg.model, seed=cfg.train.seed)
    allocate(model, "cpu")
    state = torch.load(ckpt / "state" / "model.pt", map_location="cpu")
    model.load_state_dict(state, strict=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
else:
    _, dtype, shard = mode.split(":")
    export(ckpt, out, dtype=dtype, max_shard_size=shard)
seconds = time.perf_counter() - start
done.set()
peak[0] = max(peak[0], status("RssAnon"))
print(json.dumps({"mode": mode, "seconds": seconds, "baseline": base_anon, "peak_anon": peak[0] - base_anon,
                  "vm_hwm": status("VmHWM") - base_hwm, "files": len(list(out.glob("*.safetensors"))),
                  "written": sum(p.stat().st_size for p in out.glob("*.safetensors"))}))
"""


def make_checkpoint(work: Path, layers: int) -> Path:
    """One LISA step of the 1B-class model on the local backend, checkpointed."""
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}: " + "lisa " * 40}) + "\n" for i in range(16)))
    overrides = json.dumps({**SHAPE, "num_hidden_layers": layers})
    cmd = [
        sys.executable,
        "-m",
        "lisa_dist.cli",
        "train",
        f"--data.path={data}",
        "--data.format=text",
        "--data.max_length=32",
        f"--data.cache_dir={work / 'cache'}",
        "--model.name=tiny-llama",
        f"--model.config_overrides={overrides}",
        "--train.steps=1",
        "--train.micro_batch_size=1",
        f"--train.output_dir={work / 'run'}",
        "--train.device=cpu",
        "--lisa.gamma=1",
        "--checkpoint.every=1",
        "--logging.progress=false",
        "--train.overwrite=true",
    ]
    subprocess.run(cmd, check=True)
    return work / "run" / "checkpoints" / "step-1"


def measure(mode: str, ckpt: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(ckpt), str(out)], check=True, capture_output=True, text=True
    )
    row = json.loads(result.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    print(row, flush=True)
    return row


def main() -> None:
    parser = harness.parser(__doc__, "export_memory")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--keep", default=None, help="a folder to keep the checkpoint in (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="export_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = work / "run" / "checkpoints" / "step-1"
        if not (ckpt / "manifest.json").is_file():
            ckpt = make_checkpoint(work, args.layers)
        model_bytes = (ckpt / "state" / "model.pt").stat().st_size
        modes = [
            "before",
            "after:float32:5GB",
            "after:float32:1GB",
            "after:float32:500MB",
            "after:bfloat16:1GB",
            "after:bfloat16:500MB",
        ]
        rows = [measure(mode, ckpt, work / "out") for mode in modes]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    params = model_bytes / 4
    lines = [
        f"# Export memory: a {params / 1e9:.2f}B-parameter Llama (fp32 checkpoint {model_bytes / GIB:.2f} GiB)",
        "",
        f"`python -m benchmarks.export_memory --layers {args.layers}`, 2-core CPU machine, each export in a "
        "fresh process. Peaks are less the process's own after its imports "
        f"(about {rows[0]['baseline'] / GIB:.2f} GiB of anonymous memory).",
        "",
        "| export | dtype | --max-shard-size | files | peak RSS (VmHWM) GiB | peak anonymous GiB | "
        "x model size | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        kind, dtype, shard = (
            ([*row["mode"].split(":"), "", ""])[:3]
            if row["mode"] != "before"
            else ("before (8fa5159)", "float32", "50GB (save_pretrained's)")
        )
        lines.append(
            f"| {kind} | {dtype} | {shard} | {row['files']} | {row['vm_hwm'] / GIB:.2f} | "
            f"{row['peak_anon'] / GIB:.2f} | {row['vm_hwm'] / model_bytes:.2f} | {row['seconds']:.0f} |"
        )
    harness.write_results(args.out, args.name, lines, {"model_bytes": model_bytes, "rows": rows})


if __name__ == "__main__":
    main()
