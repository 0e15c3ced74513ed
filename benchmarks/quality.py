"""Quality on a real model: LISA against full fine-tuning, LoRA and BAdam on SmolLM2-135M-Instruct.

    python benchmarks/quality.py [--steps 30] [--out benchmarks/results]   # the study (see README for its time)
    python benchmarks/quality.py --quick                                   # a tiny random model: the pipeline, CI

Alpaca-GPT4 (../shared/data/alpaca_gpt4_en_999.json) is split once, by a fixed permutation, into 90% training and
10% held-out rows. Every run sees the same tokens in the same order (same seed, micro-batch, steps, warmup + cosine
schedule) through the one trainer loop, then reports its held-out response loss (summed token loss of the held-out
responses / their tokens), its loss curve, peak RSS and wall time. Stages:

1. a learning-rate sweep per method (LoRA also over its rank), the best lr by held-out loss;
2. LISA's ablation at its best lr: gamma in {1, 2, 4} x K in {5, 13, 50};
3. importance sampling: lisa.strategy=grad_norm against uniform at the headline gamma and K;
4. greedy answers of each method's best run to five held-out prompts (answered by every run that can be a
   method's best: the sweeps, and LISA at the headline gamma).

Each run is a fresh process (its peak RSS is its own), except with --quick. Writes quality.json, quality.md and
quality_loss.png (quality_quick.* with --quick).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "alpaca_gpt4_en_999.json"
FALLBACK = REPO / "lisa_dist" / "assets" / "demo_alpaca.jsonl"
HELDOUT_SHARE, SPLIT_SEED = 0.1, 0
PROMPTS = 5


def split(source: Path, out: Path) -> tuple[Path, Path]:
    """The fixed 90/10 split of `source` into out/train.json and out/heldout.json."""
    text = source.read_text()
    rows = json.loads(text) if source.suffix == ".json" else [json.loads(line) for line in text.splitlines()]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    cut = round(len(rows) * HELDOUT_SHARE)
    out.mkdir(parents=True, exist_ok=True)
    heldout, train = out / "heldout.json", out / "train.json"
    heldout.write_text(json.dumps([rows[i] for i in order[:cut]]))
    train.write_text(json.dumps([rows[i] for i in order[cut:]]))
    return train, heldout


# -- one run ------------------------------------------------------------------------------------------------------


def heldout_loss(run, heldout: Path, batch: int = 16) -> float:
    """Mean token loss of the held-out responses (the same prompt template and truncation as training)."""
    from dataclasses import replace

    from lisa_dist.data import collate, load_examples
    from lisa_dist.models import lm_loss_sum, supervised_tokens

    cfg = replace(run.cfg.data, path=str(heldout), skip_bad_rows=True)
    dataset = load_examples(cfg, run.tokenizer)
    model = run.backend.model
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch):
            rows = dataset[start:start + batch]
            b = collate(rows["input_ids"], rows["labels"], run.tokenizer.pad_token_id)
            total += float(lm_loss_sum(model, b))
            tokens += supervised_tokens(b)
    model.train()
    return total / tokens


def answers(run, heldout: Path, max_new_tokens: int) -> list[dict]:
    from lisa_dist.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    rows = json.loads(heldout.read_text())[:PROMPTS]
    model, tok = run.backend.model, run.tokenizer
    model.eval()
    out = []
    for row in rows:
        template = ALPACA_PROMPT if row.get("input", "").strip() else ALPACA_PROMPT_NO_INPUT
        ids = tok(template.format(instruction=row["instruction"], input=row.get("input", "")),
                  return_tensors="pt", add_special_tokens=True)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out.append({"instruction": row["instruction"],
                    "answer": tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()})
    model.train()
    return out


def run_one(spec: dict) -> dict:
    """Train one configuration (spec: name, method, overrides, generate) and evaluate it."""
    from lisa_dist.config import load_config
    from lisa_dist.run import build, train_step
    from lisa_dist.tools import build_baseline

    torch.manual_seed(0)
    cfg = load_config(None, spec["overrides"])
    start = time.perf_counter()
    backend = None
    if spec["method"] == "badam":
        backend = build_baseline("badam", cfg, spec["layers_path"], spec["num_layers"])
    run = build(cfg, backend)
    curve, state = [], 0
    for step in range(cfg.train.steps):
        record = train_step(run, step)
        curve.append(record["loss"])
        state = max(state, record["optimizer_state_bytes"])  # BAdam drops its state at each block switch
    train_s = time.perf_counter() - start
    result = {**spec, "curve": curve, "train_s": train_s, "heldout_loss": heldout_loss(run, Path(spec["heldout"])),
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "optimizer_state_bytes": state,
              "layers_visited": sorted(run.layers_visited)}
    if spec.get("generate"):
        result["answers"] = answers(run, Path(spec["heldout"]), spec["max_new_tokens"])
    result["wall_s"] = time.perf_counter() - start
    return result


# -- the study ------------------------------------------------------------------------------------------------------


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = REPO / "runs" / ("quality_quick" if args.quick else "quality")
        source = ALPACA if ALPACA.exists() and not args.quick else FALLBACK
        self.train, self.heldout = split(source, self.work / "data")
        self.source = source
        if args.quick:
            self.model = ["--model.name=tiny-llama",
                          '--model.preset_overrides={"num_hidden_layers": 4, "hidden_size": 64}']
            self.layers = 4
        else:
            from lisa_dist.tools import prepare_model

            self.model = [f"--model.name={prepare_model('smollm2-135m-instruct')}"]
            self.layers = 30
        self.results: dict[str, dict] = {}

    def base(self, name: str) -> list[str]:
        a = self.args
        return [*self.model, f"--data.path={self.train}", "--data.format=alpaca", f"--data.max_length={a.seq_len}",
                "--data.skip_bad_rows=true", f"--data.cache_dir={self.work / 'cache'}",
                f"--train.micro_batch_size={a.micro_batch}", f"--train.steps={a.steps}", "--train.seed=0",
                f"--train.output_dir={self.work / name}", f"--optim.warmup_steps={max(1, a.steps // 10)}",
                "--optim.schedule=cosine", "--logging.progress=false", "--logging.level=WARNING",
                "--logging.log_every=1", "--checkpoint.save_final=false", "--train.overwrite=true"]

    def run(self, name: str, method: str, extra: list[str], generate: bool = True) -> dict:
        """Train and evaluate configuration `name` once; `generate`: also answer the held-out prompts (the runs that
        can be a method's best, known only afterwards)."""
        if name in self.results:
            return self.results[name]
        slug = "".join(c if c.isalnum() else "_" for c in name)
        spec = {"name": name, "method": method, "overrides": self.base(slug) + extra, "generate": generate,
                "heldout": str(self.heldout), "layers_path": "model.layers", "num_layers": self.layers,
                "max_new_tokens": 8 if self.args.quick else 48}
        if self.args.quick:
            result = run_one(spec)
        else:
            done = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                                  text=True, cwd=REPO)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.exit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            result = json.loads(lines[-1][len("RESULT "):])
        self.results[name] = result
        print(f"{name:28s} held-out {result['heldout_loss']:.4f}  train {result['curve'][-1]:.4f}  "
              f"{result['wall_s']:6.1f} s  peak {result['peak_rss'] / 2**20:6.0f} MiB", flush=True)
        return result

    def best(self, names: list[str]) -> str:
        return min(names, key=lambda n: self.results[n]["heldout_loss"])

    def sweep(self) -> dict[str, str]:
        a = self.args
        best = {}
        for method, lrs in (("full", a.lr_full), ("lisa", a.lr_lisa), ("badam", a.lr_badam)):
            names = [self.lisa(a.gamma, a.interval, lr) if method == "lisa" else f"{method} lr={lr:g}" for lr in lrs]
            for name, lr in zip(names, lrs, strict=True):
                if method != "lisa":
                    extra = ["--lisa.enabled=false"] + ([f"--lisa.interval={a.interval}"] if method == "badam" else [])
                    self.run(name, method, extra + [f"--optim.lr={lr}"])
            best[method] = self.best(names)
        names = []
        for r, lr in a.lora_grid:
            names.append(f"lora r={r} lr={lr:g}")
            self.run(names[-1], "lora", ["--lisa.enabled=false", "--lora.enabled=true", f"--lora.r={r}",
                                         f"--lora.alpha={2 * r}", f"--optim.lr={lr}"])
        best["lora"] = self.best(names)
        return best

    def lisa(self, gamma: int, k: int, lr: float, strategy: str = "uniform") -> str:
        """Run (once) LISA with these settings; returns the run's name."""
        name = f"lisa{' grad_norm' if strategy != 'uniform' else ''} gamma={gamma} K={k} lr={lr:g}"
        self.run(name, "lisa", [f"--lisa.gamma={gamma}", f"--lisa.interval={k}", f"--optim.lr={lr}",
                                f"--lisa.strategy={strategy}"],
                 generate=gamma == self.args.gamma and strategy == "uniform")  # the headline's candidates
        return name

    def lr_of(self, name: str) -> float:
        return float(next(o for o in self.results[name]["overrides"] if o.startswith("--optim.lr=")).split("=")[1])

    def ablation(self, lisa_best: str) -> dict[tuple[int, int], str]:
        lr = self.lr_of(lisa_best)
        return {(g, k): self.lisa(g, k, lr) for g in self.args.ablation_gamma for k in self.args.ablation_k}


def report(study: Study, best: dict[str, str], grid: dict, importance: tuple[str, str], headline: str,
           elapsed: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, res = study.args, study.results
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "quality_quick" if a.quick else "quality"
    (out / f"{stem}.json").write_text(json.dumps({"best": best, "headline": headline, "results": res,
                                                  "grid": {f"{g},{k}": n for (g, k), n in grid.items()}}, indent=1))
    model = "tiny-llama (random init)" if a.quick else "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)"
    finals = {"full": best["full"], "lora": best["lora"], "badam": best["badam"], "lisa": headline}
    lines = [
        "# Quality: LISA against full fine-tuning, LoRA and BAdam" + (" (--quick)" if a.quick else ""),
        "",
        f"{model}; data {study.source.name}: a fixed 90/10 split ({len(json.loads(study.train.read_text()))} "
        f"training rows, {len(json.loads(study.heldout.read_text()))} held-out), Alpaca prompt, responses "
        f"supervised, max {a.seq_len} tokens. Every run: {a.steps} steps of {a.micro_batch} examples (the same "
        "examples in the same order), AdamW, warmup + cosine, fp32, 1 process x 2 threads on 2 CPU cores. "
        f"Command: `python benchmarks/quality.py{' --quick' if a.quick else ''}`, {elapsed / 60:.1f} minutes.",
        "",
        "## Best run of each method",
        "",
        "| method | run (best lr) | held-out loss | last train loss | peak RSS (MiB) | max Adam (MB) | wall (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, name in finals.items():
        r = res[name]
        lines.append(f"| {method} | {name} | {r['heldout_loss']:.4f} | {r['curve'][-1]:.4f} | "
                     f"{r['peak_rss'] / 2**20:.0f} | {r['optimizer_state_bytes'] / 1e6:.1f} | {r['wall_s']:.0f} |")
    verdict = ("LISA's held-out loss is below LoRA's" if res[headline]["heldout_loss"] < res[best["lora"]][
        "heldout_loss"] else "LISA's held-out loss is not below LoRA's")
    lines += ["", f"{verdict} ({res[headline]['heldout_loss']:.4f} against {res[best['lora']]['heldout_loss']:.4f});"
                  f" peak RSS {res[headline]['peak_rss'] / 2**20:.0f} against "
                  f"{res[best['lora']]['peak_rss'] / 2**20:.0f} MiB.", "",
              "![loss curves](" + f"{stem}_loss.png)", "", "## Every run", "",
              "| run | held-out loss | last train loss | peak RSS (MiB) | wall (s) |",
              "| --- | --- | --- | --- | --- |"]
    for name, r in res.items():
        lines.append(f"| {name} | {r['heldout_loss']:.4f} | {r['curve'][-1]:.4f} | {r['peak_rss'] / 2**20:.0f} | "
                     f"{r['wall_s']:.0f} |")
    gammas, ks = sorted({g for g, _ in grid}), sorted({k for _, k in grid})
    lines += ["", "## LISA ablation (lr of the best LISA run): held-out loss / Adam state MB", "",
              "| gamma \\ K | " + " | ".join(str(k) for k in ks) + " |",
              "| --- | " + " | ".join("---" for _ in ks) + " |"]
    for g in gammas:
        cells = [f"{res[grid[g, k]]['heldout_loss']:.4f} / {res[grid[g, k]]['optimizer_state_bytes'] / 1e6:.1f}"
                 for k in ks]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    uniform, grad_norm = importance
    lines += ["", "## Importance sampling: grad_norm against uniform", "",
              "| strategy | held-out loss | layers visited |", "| --- | --- | --- |",
              f"| uniform | {res[uniform]['heldout_loss']:.4f} | {len(res[uniform]['layers_visited'])} |",
              f"| grad_norm | {res[grad_norm]['heldout_loss']:.4f} | {len(res[grad_norm]['layers_visited'])} |",
              "", "## Greedy answers to held-out prompts", ""]
    for method, name in finals.items():
        lines += [f"### {method} ({name})", ""]
        for qa in res[name].get("answers", []):
            lines += [f"- **{qa['instruction']}**", f"  {qa['answer']!r}"]
        lines.append("")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, name in finals.items():
        ax.plot(range(1, len(res[name]["curve"]) + 1), res[name]["curve"], label=f"{method} ({name})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}_loss.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / f'{stem}.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, few steps: the pipeline only")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=192)
    parser.add_argument("--gamma", type=int, default=2)
    parser.add_argument("--interval", type=int, default=5, help="K of the sweep runs")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))))
        return
    if args.quick:
        args.steps = args.steps or 4
        args.lr_full, args.lr_lisa, args.lr_badam, args.lora_grid = [1e-3], [1e-3], [1e-3], [(4, 1e-3)]
        args.ablation_gamma, args.ablation_k, args.interval = [1, 2], [2], 2
        args.seq_len, args.micro_batch = 512, 2  # the byte tokenizer needs room for an Alpaca prompt
    else:
        args.steps = args.steps or 20  # 24 steps measured 63.5 min (partly shared cores): 20 fits the 60
        args.lr_full, args.lr_lisa, args.lr_badam = [2e-5, 5e-5], [5e-5, 1.5e-4], [5e-5, 1.5e-4]
        args.lora_grid = [(8, 3e-4), (8, 1e-3), (32, 1e-3)]  # lr at r 8, then the rank at the larger lr
        args.ablation_gamma, args.ablation_k = [1, 2, 4], [5, 13, 50]
    start = time.perf_counter()
    study = Study(args)
    best = study.sweep()
    grid = study.ablation(best["lisa"])
    # The headline LISA: gamma 2 at the K the ablation found best for it.
    headline = study.best([grid[args.gamma, k] for k in args.ablation_k])
    k = next(k for k in args.ablation_k if grid[args.gamma, k] == headline)
    importance = (headline, study.lisa(args.gamma, k, study.lr_of(headline), strategy="grad_norm"))
    report(study, best, grid, importance, headline, time.perf_counter() - start)


if __name__ == "__main__":
    main()
