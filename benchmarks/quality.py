"""Does LISA beat LoRA where the paper says it should? Instruction tuning and continued pretraining, with seeds.

    python -m benchmarks.quality                  # the study on SmolLM2-135M-Instruct (time: README, "Quality")
    python -m benchmarks.quality --quick          # a tiny random model, 2 steps a run: the pipeline only (make test)
    python -m benchmarks.quality --report-only    # the report and the PNGs again from the runs already done

Two studies, every run through the one trainer loop (`lisa_dist.run.train`) with its evaluation and packing:

- sft (instruction tuning): Alpaca-GPT4 (999 rows) and self-instruct's seed and user-oriented tasks (175 + 252, the
  first instance of each) from ../shared/data, as chat conversations through the model's own ChatML template
  (assistant turns supervised), packed into rows of --seq-len tokens; a fixed 100 conversations held out.
- cpt (continued pretraining): ../shared/data/tinyshakespeare.txt, its first 90% trained on in blocks of --seq-len
  tokens, the last 10% (cut at a paragraph) held out; the held-out perplexity every --cpt-eval-every steps over its
  first --cpt-eval-batches micro-batches.

Arms (ARMS): full fine-tuning; LoRA r 8 and r 32 (alpha 2r); LISA with the paper's always-trained embeddings and
head, gamma 2 and 4; LISA with NF4 frozen layers and frozen embeddings (the tied matrix trains as the head); BAdam.
All: AdamW, warmup + cosine, bf16 autocast with fp32 weights and Adam state, the chunked loss, K = --interval for
LISA's and BAdam's switches, the same --steps of --micro-batch rows (equal tokens).

Stages: (1) the lr sweep, seed 0, each arm at each of its lrs; (2) seeds 1 and 2 of the best --top settings (arm,
lr) of each method in sft, of the best one in cpt. A method's verdict uses its best setting's mean over the seeds.
Each run is its own process with one thread, two at a time on the 2 cores (--workers); each appends its result
to runs/quality/results.jsonl, so a study that stopped resumes where it stopped (a changed setting reruns).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

from benchmarks import harness

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
FALLBACK = REPO / "lisa_dist" / "assets" / "demo_alpaca.jsonl"
SPLIT_SEED, SFT_HELDOUT, CPT_HELDOUT_SHARE, PROMPTS = 0, 100, 0.1, 5

METHODS = {  # method -> its label in the report
    "full": "full fine-tuning",
    "lora": "LoRA",
    "lisa": "LISA (embeddings and head train)",
    "lisa_nf4": "LISA, NF4 frozen layers, frozen embeddings",
    "badam": "BAdam",
}


@dataclass(frozen=True)
class Arm:
    name: str
    method: str
    args: tuple[str, ...]
    sft_lrs: tuple[float, ...]
    cpt_lrs: tuple[float, ...]


def arms(interval: int) -> list[Arm]:
    lisa = (f"--lisa.interval={interval}",)
    off = ("--lisa.enabled=false",)

    def lora(r: int) -> tuple[str, ...]:
        return (*off, "--lora.enabled=true", f"--lora.r={r}", f"--lora.alpha={2 * r}")

    return [
        Arm("full", "full", off, (2e-5, 5e-5, 1e-4, 2e-4), (1e-4, 2e-4)),
        Arm("LoRA r 8", "lora", lora(8), (1e-3, 2e-3, 4e-3), (2e-3, 4e-3)),
        Arm("LoRA r 32", "lora", lora(32), (1e-3, 2e-3, 4e-3), (2e-3, 4e-3)),
        Arm("LISA gamma 2", "lisa", (*lisa, "--lisa.gamma=2"), (1.5e-4, 3e-4, 6e-4), (3e-4, 6e-4)),
        Arm("LISA gamma 4", "lisa", (*lisa, "--lisa.gamma=4"), (1.5e-4, 3e-4, 6e-4), (3e-4, 6e-4)),
        Arm(
            "LISA gamma 2, NF4, frozen emb",
            "lisa_nf4",
            (*lisa, "--lisa.gamma=2", "--lisa.frozen_storage=nf4", "--lisa.train_embeddings=false"),
            (1.5e-4, 3e-4, 6e-4),
            (3e-4, 6e-4),
        ),
        Arm("BAdam", "badam", (*off, f"--lisa.interval={interval}"), (1.5e-4, 3e-4, 6e-4), (3e-4, 6e-4)),
    ]


# -- the data -------------------------------------------------------------------------------------------------------


def _rows(path: Path) -> list[dict]:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]


def _chat(instruction: str, context: str, output: str) -> dict:
    user = instruction.strip() + (f"\n\n{context.strip()}" if context.strip() else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output.strip()}]}


def sft_conversations(quick: bool) -> tuple[list[dict], list[str]]:
    """Every instruction row as a conversation, and the files they came from."""
    if quick or not (SHARED / "alpaca_gpt4_en_999.json").is_file():
        return [_chat(r["instruction"], r.get("input", ""), r["output"]) for r in _rows(FALLBACK)], [FALLBACK.name]
    files = ["alpaca_gpt4_en_999.json", "self_instruct_seed_tasks.jsonl", "self_instruct_user_oriented.jsonl"]
    out = [_chat(r["instruction"], r.get("input", ""), r["output"]) for r in _rows(SHARED / files[0])]
    for name in files[1:]:
        for r in _rows(SHARED / name):
            first = r["instances"][0]
            out.append(_chat(r["instruction"], first.get("input", ""), first["output"]))
    return out, files


def split_sft(out: Path, quick: bool) -> dict:
    """out/train.jsonl and out/eval.jsonl: a fixed permutation's first SFT_HELDOUT conversations held out."""
    import torch

    rows, files = sft_conversations(quick)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    cut = min(SFT_HELDOUT, len(rows) // 10) if quick else SFT_HELDOUT
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval.jsonl", order[:cut]), ("train.jsonl", order[cut:])):
        (out / name).write_text("".join(json.dumps(rows[i]) + "\n" for i in part))
    return {
        "train": str(out / "train.jsonl"),
        "eval": str(out / "eval.jsonl"),
        "sources": files,
        "train_rows": len(rows) - cut,
        "eval_rows": cut,
    }


def split_cpt(out: Path, quick: bool) -> dict:
    """out/train.txt and out/heldout.txt: the text's first 90% and its last 10%, cut at a paragraph."""
    source = SHARED / "tinyshakespeare.txt"
    if source.is_file():
        text = source.read_text()[: 60_000 if quick else None]
    else:  # no ../shared: the shipped responses as a stand-in text
        source, text = FALLBACK, "\n\n".join(r["output"] for r in _rows(FALLBACK))
    cut = text.find("\n\n", int(len(text) * (1 - CPT_HELDOUT_SHARE)))
    cut = cut if cut > 0 else int(len(text) * (1 - CPT_HELDOUT_SHARE))
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text(text[:cut].strip() + "\n")
    (out / "heldout.txt").write_text(text[cut:].strip() + "\n")
    return {
        "train": str(out / "train.txt"),
        "eval": str(out / "heldout.txt"),
        "sources": [source.name],
        "train_chars": cut,
        "eval_chars": len(text) - cut,
    }


# -- one run ------------------------------------------------------------------------------------------------------


def run_overrides(
    model: list[str],
    data: dict,
    work: Path,
    sizes: argparse.Namespace,
    steps: int,
    seed: int,
    out: str | Path,
    eval_at_start: bool,
) -> list[str]:
    """The overrides every run of the quality studies shares: the data split, `sizes.micro_batch` rows of
    `sizes.seq_len` tokens, bf16 autocast, the chunked loss, warmup (a tenth of `steps`) and cosine, quiet logs."""
    return [
        *model,
        f"--data.path={data['train']}",
        f"--data.eval_path={data['eval']}",
        f"--data.max_length={sizes.seq_len}",
        "--data.skip_bad_rows=true",
        f"--data.cache_dir={work / 'cache'}",
        f"--train.micro_batch_size={sizes.micro_batch}",
        f"--train.steps={steps}",
        f"--train.seed={seed}",
        "--train.precision=bf16",
        "--train.loss=chunked",
        f"--train.output_dir={out}",
        f"--train.eval_at_start={str(eval_at_start).lower()}",
        f"--optim.warmup_steps={max(1, steps // 10)}",
        "--optim.schedule=cosine",
        "--logging.progress=false",
        "--logging.level=WARNING",
        "--logging.log_every=1",
        "--checkpoint.save_final=false",
        "--train.overwrite=true",
    ]


def run_one(spec: dict) -> dict:
    """Train one run (spec: key, method, overrides, prompts) through the trainer loop and collect its numbers."""
    import torch

    from benchmarks.lib import build_baseline
    from lisa_dist.backends import build_backend
    from lisa_dist.config import load_config
    from lisa_dist.models import find_layout, open_model
    from lisa_dist.run import EvalSet, evaluate, load_data, read_jsonl, train
    from lisa_dist.tools import generate

    torch.set_num_threads(spec["threads"])
    cfg = load_config(None, spec["overrides"])
    skeleton, tokenizer, _ = open_model(cfg.model, seed=cfg.train.seed)  # meta device: the layout, the tokenizer
    layout = find_layout(skeleton)
    start = time.perf_counter()
    if spec["method"] == "badam":
        backend = build_baseline("badam", cfg, layout.layers_path, len(layout.layers))
    else:
        backend = build_backend(cfg)
    del skeleton
    summary = train(cfg, backend)
    train_s = time.perf_counter() - start
    records = read_jsonl(Path(cfg.train.output_dir) / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    tokens_at = {0: 0, **{r["step"]: r["tokens"] for r in steps}}
    evals = [
        {"step": r["step"], "tokens": tokens_at[r["step"]], "loss": r["eval_loss"], "ppl": r["eval_ppl"]}
        for r in records
        if "eval_loss" in r
    ]
    result = {
        "key": spec["key"],
        "spec": spec,
        "train_s": train_s,
        "curve": [[r["tokens"], r["loss"]] for r in steps],
        "evals": evals,
        "heldout_loss": evals[-1]["loss"],
        "heldout_ppl": evals[-1]["ppl"],
        "tokens": steps[-1]["tokens"],
        "state_bytes": max(sum(r["state_bytes"].values()) for r in steps),
        "optimizer_state_bytes": max(r["optimizer_state_bytes"] for r in steps),
        "trainable_params": max(r["trainable_params"] for r in steps),
        "layers_visited": summary.get("layers_visited", []),
    }
    if getattr(backend, "store", None) is not None and cfg.lisa.frozen_storage in ("int8", "nf4"):
        # The loop evaluated the model as it trains (quantized frozen layers); the export writes the exact weights
        # (every block from its host copy): evaluate, and answer with, those. On one process, with no gradients.
        result["heldout_loss_as_trained"], result["heldout_ppl_as_trained"] = evals[-1]["loss"], evals[-1]["ppl"]
        backend.store.set_active(range(len(layout.layers)))
        held_out = load_data(cfg, tokenizer, backend).held_out
        eval_set = EvalSet(held_out, cfg.train.micro_batch_size, 0, 1, tokenizer.pad_token_id, cfg.train.eval_batches)
        exact = evaluate(
            SimpleNamespace(backend=backend, eval_set=eval_set, tokens_seen=result["tokens"]), cfg.train.steps
        )
        result["heldout_loss"], result["heldout_ppl"] = exact["eval_loss"], exact["eval_ppl"]
    if spec["prompts"]:
        result["answers"] = [
            {
                "prompt": p,
                "answer": generate(backend.model, tokenizer, p, max_new_tokens=spec["max_new_tokens"]).strip(),
            }
            for p in spec["prompts"]
        ]
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["wall_s"] = time.perf_counter() - start
    return result


# -- the study ------------------------------------------------------------------------------------------------------


def fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def run_key(study: str, arm: str, lr: float, seed: int) -> str:
    """A run's name: its line in results.jsonl and the report."""
    return f"{study} | {arm} | lr {fmt_lr(lr)} | seed {seed}"


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work or REPO / "runs" / ("quality_quick" if args.quick else "quality"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.results_path = self.work / "results.jsonl"
        chosen = arms(args.interval)
        if args.quick:  # one lr per arm, two for full fine-tuning: every stage, few runs
            chosen = [
                replace(
                    arm,
                    sft_lrs=(1e-3, 3e-3)[: 2 if arm.method == "full" else 1],
                    cpt_lrs=(1e-3, 3e-3)[: 2 if arm.method == "full" else 1],
                )
                for arm in chosen
            ]
        self.arms = {a.name: a for a in chosen}
        if args.quick:
            self.model = [
                "--model.name=tiny-llama",
                '--model.config_overrides={"num_hidden_layers": 4, "hidden_size": 64}',
            ]
        else:
            from lisa_dist.tools import prepare_model

            self.model = [f"--model.name={prepare_model('smollm2-135m-instruct')}"]
        self.data = {
            "sft": split_sft(self.work / "data" / "sft", args.quick),
            "cpt": split_cpt(self.work / "data" / "cpt", args.quick),
        }
        self.prompts = [
            json.loads(line)["messages"][0]["content"]
            for line in Path(self.data["sft"]["eval"]).read_text().splitlines()[:PROMPTS]
        ]
        self.results: dict[str, dict] = {}
        if self.results_path.is_file():
            for line in self.results_path.read_text().splitlines():
                result = json.loads(line)
                self.results[result["key"]] = result

    def base(self, study: str, out: str, seed: int, eval_at_start: bool) -> list[str]:
        a = self.args
        common = run_overrides(self.model, self.data[study], self.work, a, a.steps, seed, out, eval_at_start)
        if study == "sft":
            return [*common, "--data.format=chat", "--data.packing=true"]
        return [
            *common,
            "--data.format=text",
            f"--train.eval_every={a.cpt_eval_every}",
            f"--train.eval_batches={a.cpt_eval_batches}",
        ]

    def spec(self, study: str, arm: Arm, lr: float, seed: int) -> dict:
        key = run_key(study, arm.name, lr, seed)
        slug = "".join(c if c.isalnum() else "_" for c in key)
        # The study's first run also evaluates the weights before training: every run starts from them.
        first = arm is next(iter(self.arms.values())) and lr == self.lrs(study, arm)[0] and seed == 0
        return {
            "key": key,
            "study": study,
            "arm": arm.name,
            "method": arm.method,
            "lr": lr,
            "seed": seed,
            "overrides": [
                *self.base(study, str(self.work / "runs" / slug), seed, first),
                *arm.args,
                f"--optim.lr={lr}",
            ],
            "prompts": self.prompts if study == "sft" else [],
            "threads": self.args.threads,
            "max_new_tokens": 8 if self.args.quick else 64,
        }

    def lrs(self, study: str, arm: Arm) -> tuple[float, ...]:
        return arm.sft_lrs if study == "sft" else arm.cpt_lrs

    def prepare_data(self) -> None:
        """Tokenize both studies once here (the cache), before runs read it side by side; note their sizes."""
        from lisa_dist.config import load_config
        from lisa_dist.data import load_examples_with_stats, pack_examples
        from lisa_dist.models import open_model

        tokenizer = None
        for study, data in self.data.items():
            cfg = load_config(None, self.spec(study, next(iter(self.arms.values())), 1e-4, 0)["overrides"])
            tokenizer = tokenizer or open_model(cfg.model, seed=0)[1]  # both studies: the same model
            for part, path in (("train", data["train"]), ("eval", data["eval"])):
                dataset, stats = load_examples_with_stats(replace(cfg.data, path=path), tokenizer)
                rows = len(pack_examples(dataset, cfg.data.max_length)) if cfg.data.packing else len(dataset)
                data[f"{part}_examples"], data[f"{part}_rows_packed"] = stats.examples, rows
                data[f"{part}_tokens"], data[f"{part}_truncated"] = stats.tokens, stats.truncated_rows
                data[f"{part}_skipped"] = stats.skipped_rows
            data["steps_per_epoch"] = data["train_rows_packed"] // self.args.micro_batch

    def execute(self, specs: list[dict]) -> None:
        todo = [s for s in specs if self.results.get(s["key"], {}).get("spec") != s]
        if not todo:
            return
        done_before = len(specs) - len(todo)
        print(f"{len(todo)} runs to go ({done_before} done before)", flush=True)
        if self.args.quick:
            for spec in todo:
                self.record(run_one(spec))
            return
        with ThreadPoolExecutor(self.args.workers) as pool:
            for future in as_completed([pool.submit(self.subprocess_run, spec) for spec in todo]):
                self.record(future.result())

    def subprocess_run(self, spec: dict) -> dict:
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.quality", "--one", json.dumps(spec)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            raise RuntimeError(
                f"{spec['key']} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return json.loads(lines[-1][len("RESULT ") :])

    def record(self, result: dict) -> None:
        self.results[result["key"]] = result
        with self.results_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(
            f"{result['key']:52s} held-out loss {result['heldout_loss']:.4f} ppl {result['heldout_ppl']:8.2f}  "
            f"{result['wall_s']:6.1f} s  peak {result['peak_rss'] / 2**20:6.0f} MiB",
            flush=True,
        )

    # The stages.
    def sweep_specs(self) -> list[dict]:
        return [
            self.spec(study, arm, lr, 0)
            for study in ("sft", "cpt")
            for arm in self.arms.values()
            for lr in self.lrs(study, arm)
        ]

    def settings(self, study: str) -> dict[tuple[str, float], list[dict]]:
        """(arm, lr) -> its runs' results (seeds in order), of the runs done."""
        out: dict[tuple[str, float], list[dict]] = {}
        for arm in self.arms.values():
            for lr in self.lrs(study, arm):
                runs = [
                    self.results[k]
                    for s in range(self.args.seeds)
                    if (k := run_key(study, arm.name, lr, s)) in self.results
                ]
                if runs:
                    out[arm.name, lr] = runs
        return out

    def best_settings(self, study: str, count: int) -> dict[str, list[tuple[str, float]]]:
        """Each method's `count` best settings by the seed-0 held-out loss of the sweep."""
        settings = self.settings(study)
        best = {}
        for method in METHODS:
            mine = [s for s in settings if self.arms[s[0]].method == method]
            best[method] = sorted(mine, key=lambda s: settings[s][0]["heldout_loss"])[:count]
        return best

    def seed_specs(self) -> list[dict]:
        specs = []
        for study, count in (("sft", self.args.top), ("cpt", 1)):
            for chosen in self.best_settings(study, count).values():
                specs += [
                    self.spec(study, self.arms[arm], lr, seed)
                    for arm, lr in chosen
                    for seed in range(1, self.args.seeds)
                ]
        return specs


# -- the report -----------------------------------------------------------------------------------------------------


def smooth(points: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """(x, mean of the last `window` y's): the per-step loss moves with each batch."""
    ys = [y for _, y in points]
    return [(x, statistics.fmean(ys[max(0, i + 1 - window) : i + 1])) for i, (x, _) in enumerate(points)]


def fill(data: dict, seq_len: int) -> float:
    """The share of the packed rows' token slots that hold tokens."""
    return data.get("train_tokens", 0) / max(1, data.get("train_rows_packed", 0) * seq_len)


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(a: list[float], b: list[float]) -> dict:
    """a against b (lower is better): the gap of the means, Welch's t-test over the seeds and how sure it is:
    clear (p < 0.05 and every seed of one on its side of every seed of the other), weak (one of the two), none."""
    from scipy import stats

    gap = statistics.fmean(b) - statistics.fmean(a)
    separated = max(a) < min(b) or max(b) < min(a)
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue) if len(a) > 1 and len(b) > 1 else math.nan
    significant = p < 0.05
    strength = "clear" if separated and significant else "weak" if separated or significant else "none"
    return {"gap": gap, "p": p, "separated": separated, "strength": strength, "n": (len(a), len(b))}


def verdict_words(name_a: str, name_b: str, c: dict, what: str) -> str:
    lower, higher = (name_a, name_b) if c["gap"] > 0 else (name_b, name_a)
    ranges = "the seeds' ranges do not overlap" if c["separated"] else "the seeds' ranges overlap"
    test = "no t-test with one seed" if math.isnan(c["p"]) else f"Welch's t-test p = {c['p']:.3f}"
    return (
        f"{lower}'s {what} is lower than {higher}'s by {abs(c['gap']):.4f} ({c['n'][0]} and {c['n'][1]} seeds; "
        f"{ranges}; {test}): confidence {c['strength']}."
    )


def before_training(results: dict[str, dict], name: str) -> dict | None:
    """The evaluation of the untrained weights: the one run of study `name` that evaluated at step 0."""
    return next(
        (r["evals"][0] for r in results.values() if r["spec"]["study"] == name and r["evals"][0]["step"] == 0), None
    )


def notes(study: Study, name: str, metric: str, what: str) -> list[str]:
    """What the table does not show: quantized arms' loss as they trained, and sweeps whose best lr is an edge."""
    out = []
    for (arm, lr), runs in study.settings(name).items():
        trained = [r[f"{metric}_as_trained"] for r in runs if f"{metric}_as_trained" in r]
        if trained:
            out.append(
                f"- {arm}, lr {fmt_lr(lr)}: the {what} of its exact weights (what the export writes, every "
                f"block from its host copy); the model as it trained, with NF4 frozen layers: "
                f"{statistics.fmean(trained):.4f} (mean of {len(trained)})."
            )
    for arm in study.arms.values():
        lrs = study.lrs(name, arm)
        seed0 = {lr: runs[0][metric] for (a, lr), runs in study.settings(name).items() if a == arm.name}
        if len(seed0) == len(lrs) > 1:
            best = min(seed0, key=seed0.get)
            if best in (min(lrs), max(lrs)):
                out.append(
                    f"- {arm.name}: the sweep's best lr ({fmt_lr(best)}) is the edge of its grid "
                    f"({', '.join(fmt_lr(x) for x in lrs)}): a {'lower' if best == min(lrs) else 'higher'} "
                    "lr might do better."
                )
    return [*out, ""] if out else []


def report(study: Study, elapsed_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, res = study.args, study.results
    path = harness.reserve(a.out, a.name)
    out, stem = path.parent, path.name
    sft, cpt = study.data["sft"], study.data["cpt"]
    model = (
        "tiny-llama (4 layers, width 64, random init)"
        if a.quick
        else "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32; 134,515,008 params, 30 layers, tied head)"
    )
    lines = [
        f"# Quality: LISA against full fine-tuning, LoRA and BAdam{' (--quick)' if a.quick else ''}",
        "",
        f"{model}. Command: `python -m benchmarks.quality{' --quick' if a.quick else ''}`; the study took "
        f"{elapsed_s / 60:.1f} minutes on 2 CPU cores ({a.workers} runs at a time, {a.threads} thread each; a run's "
        "wall time is measured beside another run). Every run: "
        f"{a.steps} steps of {a.micro_batch} rows of {a.seq_len} tokens (warmup {max(1, a.steps // 10)}, cosine), "
        f"AdamW, bf16 autocast (fp32 weights and Adam state), the chunked loss, K = {a.interval} for LISA and BAdam. "
        "Seed 0 sweeps each arm's lr; the best settings then run seeds 1 and 2 (`spread` is the standard deviation "
        "over the seeds, `range` their min-max). Peak RSS: the run's process (the model, its data, Python). State: "
        "the largest params + grads + fp32 masters + Adam moments + host copies the run held (exact bytes). "
        "Confidence of a verdict: clear = Welch's t-test over the seeds gives p < 0.05 and the seeds' ranges do not "
        "overlap; weak = one of the two; none = neither. With 3 seeds a side only gaps well beyond the seed-to-seed "
        "spread can be clear.",
        "",
    ]

    def setting_rows(name: str, metric: str) -> list[str]:
        settings = study.settings(name)
        rows = []
        for method in METHODS:
            for (arm, lr), runs in sorted(settings.items()):
                if study.arms[arm].method != method:
                    continue
                values = [r[metric] for r in runs]
                mean, sd = spread(values)
                rows.append(
                    f"| {METHODS[method]} | {arm} | {fmt_lr(lr)} | {len(runs)} | {mean:.4f} ± {sd:.4f} | "
                    f"{min(values):.4f}-{max(values):.4f} | "
                    f"{max(r['peak_rss'] for r in runs) / 2**20:.0f} | "
                    f"{max(r['state_bytes'] for r in runs) / 1e6:.0f} | "
                    f"{max(r['optimizer_state_bytes'] for r in runs) / 1e6:.1f} | "
                    f"{statistics.fmean(r['wall_s'] for r in runs):.0f} |"
                )
        return rows

    header = (
        "| method | arm | lr | seeds | {m} mean ± spread | range | peak RSS (MiB) | state (MB) | "
        "Adam moments (MB) | wall per run (s) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )

    def headline(name: str, metric: str, top: int) -> dict[str, tuple[str, float]]:
        """Each method's best setting among those with every seed: the lowest mean."""
        settings, best = study.settings(name), {}
        for method, chosen in study.best_settings(name, top).items():
            full = [s for s in chosen if len(settings[s]) == a.seeds] or chosen
            if full:
                best[method] = min(full, key=lambda s: statistics.fmean(r[metric] for r in settings[s]))
        return best

    # -- instruction tuning
    base_sft = before_training(res, "sft")
    lines += [
        "## 1. Instruction tuning",
        "",
        f"Data: {', '.join(sft['sources'])} as chat conversations ({sft['train_rows']} trained on, a fixed "
        f"{sft['eval_rows']} held out), assistant turns supervised, packed: {sft.get('train_tokens', 0):,} training "
        f"tokens in {sft.get('train_rows_packed', 0)} rows of {a.seq_len} "
        f"({fill(sft, a.seq_len):.0%} filled), {sft.get('train_truncated', 0)} conversations cut at {a.seq_len} "
        f"tokens and {sft.get('train_skipped', 0)} left out (prompt alone longer; held out: "
        f"{sft.get('eval_truncated', 0)} cut, {sft.get('eval_skipped', 0)} left out). One epoch is "
        f"{sft.get('steps_per_epoch', 0)} steps: every run trains "
        f"{a.steps / max(1, sft.get('steps_per_epoch', 1)):.2f} epoch (what the 100-minute budget allows). Metric: "
        "the held-out loss (mean next-token loss over the held-out assistant tokens) after the last step"
        + (f"; before training it is {base_sft['loss']:.4f}." if base_sft else "."),
        "",
        header.format(m="held-out loss"),
        *setting_rows("sft", "heldout_loss"),
        "",
        *notes(study, "sft", "heldout_loss", "held-out loss"),
    ]
    sft_best = headline("sft", "heldout_loss", a.top)
    settings = study.settings("sft")

    def losses(name: str, setting: tuple[str, float], metric: str) -> list[float]:
        return [r[metric] for r in study.settings(name)[setting]]

    verdicts = {}
    if "lisa" in sft_best and "lora" in sft_best:
        c = compare(losses("sft", sft_best["lisa"], "heldout_loss"), losses("sft", sft_best["lora"], "heldout_loss"))
        verdicts["sft"] = verdict_words(
            f"LISA ({sft_best['lisa'][0]}, lr {fmt_lr(sft_best['lisa'][1])})",
            f"LoRA ({sft_best['lora'][0]}, lr {fmt_lr(sft_best['lora'][1])})",
            c,
            "mean held-out loss",
        )
        lines += ["**Claim 1, LISA beats LoRA on instruction tuning.** " + verdicts["sft"], ""]
        others = []
        for method, setting in sft_best.items():
            mean, sd = spread(losses("sft", setting, "heldout_loss"))
            others.append(f"{METHODS[method]} {mean:.4f} ± {sd:.4f} ({setting[0]}, lr {fmt_lr(setting[1])})")
        lines += ["Best setting of each method (mean ± spread over its seeds): " + "; ".join(others) + ".", ""]
    lines += [f"![instruction tuning: training loss]({stem}_sft.png)", ""]

    # -- continued pretraining
    base_cpt = before_training(res, "cpt")
    lines += [
        "## 2. Continued pretraining",
        "",
        f"Data: {', '.join(cpt['sources'])}: the first 90% ({cpt.get('train_tokens', 0):,} tokens, "
        f"{cpt.get('train_rows_packed', 0)} blocks of {a.seq_len}) trained on, the last 10% "
        f"({cpt.get('eval_tokens', 0):,} tokens) held out. One epoch is {cpt.get('steps_per_epoch', 0)} steps: every "
        f"run trains {a.steps / max(1, cpt.get('steps_per_epoch', 1)):.2f} epoch. Metric: the held-out perplexity "
        f"every {a.cpt_eval_every} steps over the held-out text's first {a.cpt_eval_batches * a.micro_batch} blocks "
        f"({a.cpt_eval_batches * a.micro_batch * a.seq_len:,} tokens)"
        + (f"; before training it is {base_cpt['ppl']:.2f}." if base_cpt else "."),
        "",
        header.format(m="held-out perplexity"),
        *setting_rows("cpt", "heldout_ppl"),
        "",
        *notes(study, "cpt", "heldout_ppl", "held-out perplexity"),
    ]
    cpt_best = headline("cpt", "heldout_ppl", 1)
    if "lora" in cpt_best:
        parts = []
        for method in ("full", "lisa", "lisa_nf4"):
            if method in cpt_best:
                c = compare(
                    losses("cpt", cpt_best[method], "heldout_ppl"), losses("cpt", cpt_best["lora"], "heldout_ppl")
                )
                parts.append(
                    verdict_words(
                        f"{METHODS[method]} ({cpt_best[method][0]})",
                        f"LoRA ({cpt_best['lora'][0]})",
                        c,
                        "mean held-out perplexity",
                    )
                )
        verdicts["cpt"] = " ".join(parts)
        lines += ["**Claim 2, LoRA falls short in continued pretraining.** " + verdicts["cpt"], ""]
    lines += [f"![continued pretraining: held-out perplexity]({stem}_cpt.png)", ""]

    # -- answers
    lines += [
        "## Greedy answers to five held-out prompts",
        "",
        "Each method's best instruction-tuning run (its lowest held-out loss of any setting and seed), greedy, "
        f"at most {64 if not a.quick else 8} new tokens.",
        "",
    ]
    for method in METHODS:
        mine = [
            r
            for r in res.values()
            if r["spec"]["study"] == "sft" and r["spec"]["method"] == method and r.get("answers")
        ]
        if not mine:
            continue
        best_run = min(mine, key=lambda r: r["heldout_loss"])
        lines += [f"### {METHODS[method]} ({best_run['key']}, held-out loss {best_run['heldout_loss']:.4f})", ""]
        for qa in best_run["answers"]:
            prompt = " ".join(qa["prompt"].split())
            lines += [f"- **{prompt[:300]}**", f"  {qa['answer']!r}"]
        lines.append("")
    harness.write_stem(
        path,
        lines,
        {
            "elapsed_s": elapsed_s,
            "data": study.data,
            "verdicts": verdicts,
            "best": {
                "sft": {m: list(s) for m, s in sft_best.items()},
                "cpt": {m: list(s) for m, s in cpt_best.items()},
            },
            "results": res,
        },
        echo=False,
    )

    # -- plots: each method's best setting, mean over its seeds (band: min-max)
    def band(ax, runs: list[dict], field: str, pick, label: str, window: int = 1) -> None:
        series = [smooth([pick(p) for p in r[field]], window) for r in runs]
        length = min(len(s) for s in series)
        xs = [x for x, _ in series[0][:length]]
        ys = [[s[i][1] for s in series] for i in range(length)]
        (line,) = ax.plot(xs, [statistics.fmean(y) for y in ys], label=label)
        if len(runs) > 1:
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.2)

    fig, ax = plt.subplots(figsize=(7.5, 6))
    for method, setting in sft_best.items():
        band(
            ax,
            settings[setting],
            "curve",
            lambda p: (p[0], p[1]),
            f"{METHODS[method]}: {setting[0]}, lr {fmt_lr(setting[1])}",
            window=8,
        )
    finish(fig, ax, "training loss (mean of the last 8 steps)", "Instruction tuning", out / f"{stem}_sft.png")
    fig, ax = plt.subplots(figsize=(7.5, 6))
    cpt_settings = study.settings("cpt")
    for method, setting in cpt_best.items():
        runs = [
            {**r, "evals": ([base_cpt] if base_cpt and r["evals"][0]["step"] else []) + r["evals"]}
            for r in cpt_settings[setting]
        ]
        quantized = [r for r in runs if "heldout_ppl_as_trained" in r]
        band(
            ax,
            runs,
            "evals",
            lambda e: (e["tokens"], e["ppl"]),
            f"{METHODS[method]}: {setting[0]}, lr {fmt_lr(setting[1])}"
            + (" (curve as it trained; x: its exact weights)" if quantized else ""),
        )
        if quantized:  # the loop's evaluations are of the quantized model; the export's exact weights at the end
            ax.plot(
                [statistics.fmean(r["tokens"] for r in quantized)],
                [statistics.fmean(r["heldout_ppl"] for r in quantized)],
                "x",
                color=ax.lines[-1].get_color(),
                markersize=9,
            )
    finish(fig, ax, "held-out perplexity", "Continued pretraining on tinyshakespeare", out / f"{stem}_cpt.png")


def finish(fig, ax, ylabel: str, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel("tokens seen")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}: mean over seeds, band = min-max")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Each size's default, by mode (the tiny model's byte tokenizer needs long rows for a conversation); a flag given
# on the command line wins in either mode.
DEFAULTS = {
    "steps": (32, 2),
    "micro_batch": (4, 2),
    "seq_len": (256, 1024),
    "interval": (4, 1),
    "seeds": (3, 2),
    "top": (2, 2),
    "cpt_eval_every": (8, 1),
    "cpt_eval_batches": (8, 2),
    "workers": (2, 2),
    "threads": (1, 1),
}


def add_sizes(parser: argparse.ArgumentParser, defaults: dict, helps: dict[str, str]) -> None:
    """An integer flag per entry of `defaults` (name: (full study, --quick)); unset, `resolve_sizes` fills it."""
    for name, (full, quick) in defaults.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=f"{helps.get(name, name.replace('_', ' '))} (default {full}; --quick: {quick})",
        )


def resolve_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: dict) -> None:
    """Each size flag not given: its default for the mode; one given below 1: an error naming it."""
    for name, (full, quick) in defaults.items():
        value = getattr(args, name)
        if value is None:
            setattr(args, name, quick if args.quick else full)
        elif value < 1:
            parser.error(f"--{name.replace('_', '-')}={value}: expected at least 1")


def main() -> None:
    parser = harness.parser(__doc__, "quality", quick=True)
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the runs done")
    helps = {
        "interval": "K: steps between LISA's (and BAdam's) switches",
        "top": "instruction-tuning settings per method given all seeds",
        "workers": "runs at a time",
        "threads": "threads per run",
    }
    add_sizes(parser, DEFAULTS, helps)
    parser.add_argument("--work", help="runs, data and results.jsonl (default: runs/quality or runs/quality_quick)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and args.name == "quality":
        args.name = "quality_quick"
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))))
        return
    resolve_sizes(parser, args, DEFAULTS)
    start = time.perf_counter()
    study = Study(args)
    timing = study.work / "timing.json"
    spent = json.loads(timing.read_text())["elapsed_s"] if timing.is_file() else 0.0
    study.prepare_data()
    if not args.report_only:
        try:
            study.execute(study.sweep_specs())
            study.execute(study.seed_specs())
        finally:  # a study resumed later adds its time to this
            spent += time.perf_counter() - start
            timing.write_text(json.dumps({"elapsed_s": spent}))
    report(study, spent)


if __name__ == "__main__":
    main()
