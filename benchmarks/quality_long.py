"""Where LISA earns its place: its settings swept, a full epoch of both studies, quality against memory.

    python -m benchmarks.quality_long                  # the study on SmolLM2-135M-Instruct (resumable)
    python -m benchmarks.quality_long --budget-min 60  # stop starting runs after 60 minutes (run it again to go on)
    python -m benchmarks.quality_long --quick          # a tiny random model, 2 steps a run: the pipeline (make test)
    python -m benchmarks.quality_long --report-only    # the report and the PNGs from the runs done

The data, the model and every run's settings are those of `benchmarks.quality` (its instruction-tuning and
continued-pretraining splits, 4 x 256 tokens a step, bf16 autocast, AdamW, warmup + cosine), through the one trainer
loop. What this study adds, in the order its runs start (the runs that fit come first):

1. A full epoch (--steps: 248 instruction-tuning steps; --cpt-steps: 291) of full fine-tuning and LoRA r 32 at the
   best learning rates of `benchmarks.quality`'s sweep.
2. LISA's settings, swept one at a time around a base (gamma 4, K 16, uniform sampling, the always-trained modules
   at the layers' lr) over --sweep-steps of instruction tuning: the interval K (4, 16, 32), gamma (2, 4, 8), the
   always-trained lr scale (optim.always_lr_scale: 0, 0.3, 1) and the sampling strategy (uniform, grad_norm, a depth
   weighting that favours the bottom and top layers). The base runs two seeds: their gap is the noise a variant
   must beat to be chosen.
3. LISA at its best settings (each setting's winner, where it beats the base by more than the noise) for a full
   epoch of both studies, and LISA whose gamma is raised (with bf16 frozen layers and frozen always-trained
   modules) until the planner puts its state at LoRA r 32's.
4. More seeds of the final comparison: seed 1 of both studies, then seed 2.

Each run is its own process with one thread, --workers at a time. A run writes its result to
<work>/results/<name>.json when it ends; a study stopped (or its driver killed) starts again where it stopped, and
a run still going in another process is not started twice.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks import harness
from benchmarks.quality import REPO, add_sizes, resolve_sizes, run_one, run_overrides, split_cpt, split_sft

LR = {"full": 1e-4, "lora": 2e-3, "lisa": 3e-4}
"""Each method's best lr in `benchmarks.quality`'s 32-step sweep (2026-12-02): full 1e-4, LoRA r 32 2e-3, LISA
gamma 4 3e-4."""
LORA_R = 32


@dataclass(frozen=True)
class Lisa:
    """One LISA setting."""

    gamma: int = 4
    interval: int = 16
    scale: float = 1.0
    strategy: str = "uniform"
    storage: str = "float32"

    @property
    def name(self) -> str:
        extra = "" if self.storage == "float32" else f", {self.storage} frozen"
        return f"LISA g{self.gamma} K{self.interval} {self.strategy} scale {self.scale:g}{extra}"

    def args(self, layers: int) -> list[str]:
        out = [
            f"--lisa.gamma={self.gamma}",
            f"--lisa.interval={self.interval}",
            f"--optim.always_lr_scale={self.scale:g}",
            f"--lisa.frozen_storage={self.storage}",
        ]
        if self.strategy == "depth":
            out += ["--lisa.strategy=weighted", f"--lisa.weights={json.dumps(depth_weights(layers))}"]
        else:
            out.append(f"--lisa.strategy={self.strategy}")
        return out


def depth_weights(layers: int) -> list[float]:
    """The depth weighting: a U over the layers, the bottom and top ones three times as likely as the middle one
    (the paper's observation that the first and last layers matter most)."""
    if layers == 1:
        return [1.0]
    return [round(1.0 + 2.0 * abs(2.0 * i / (layers - 1) - 1.0), 4) for i in range(layers)]


BASE = Lisa()
SWEEP = {
    "interval": [4, 16, 32],
    "gamma": [2, 4, 8],
    "scale": [0.0, 0.3, 1.0],
    "strategy": ["uniform", "grad_norm", "depth"],
}


@dataclass(frozen=True)
class Arm:
    name: str
    method: str
    args: tuple[str, ...]
    lr: float


def full_arm() -> Arm:
    return Arm("full fine-tuning", "full", ("--lisa.enabled=false",), LR["full"])


def lora_arm() -> Arm:
    args = ("--lisa.enabled=false", "--lora.enabled=true", f"--lora.r={LORA_R}", f"--lora.alpha={2 * LORA_R}")
    return Arm(f"LoRA r {LORA_R}", "lora", args, LR["lora"])


def lisa_arm(setting: Lisa, layers: int) -> Arm:
    return Arm(setting.name, "lisa", tuple(setting.args(layers)), LR["lisa"])


# -- the study ----------------------------------------------------------------------------------------------------


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work or REPO / "runs" / ("quality_long_quick" if args.quick else "quality_long"))
        (self.work / "results").mkdir(parents=True, exist_ok=True)
        (self.work / "running").mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        if args.quick:
            overrides = {"num_hidden_layers": 8, "hidden_size": 64}  # gamma 8 of the sweep
            self.model = ["--model.name=tiny-llama", f"--model.config_overrides={json.dumps(overrides)}"]
            self.layers = overrides["num_hidden_layers"]
        else:
            from lisa_dist.tools import prepare_model

            folder = prepare_model("smollm2-135m-instruct")
            self.model = [f"--model.name={folder}"]
            self.layers = json.loads((Path(folder) / "config.json").read_text())["num_hidden_layers"]
        self.data = {
            "sft": split_sft(self.work / "data" / "sft", args.quick),
            "cpt": split_cpt(self.work / "data" / "cpt", args.quick),
        }
        self.results: dict[str, dict] = {}
        self.failed: set[str] = set()
        self.plans: dict[Arm, int] = {}

    # -- one run's overrides
    def base(self, study: str, steps: int, seed: int, out: Path, evals: int, eval_at_start: bool) -> list[str]:
        common = run_overrides(self.model, self.data[study], self.work, self.args, steps, seed, out, eval_at_start)
        at = common.index(f"--train.eval_at_start={str(eval_at_start).lower()}") + 1
        common.insert(at, f"--train.eval_every={max(1, steps // evals) if evals else 0}")
        if study == "sft":
            return [*common, "--data.format=chat", "--data.packing=true"]
        return [*common, "--data.format=text", f"--train.eval_batches={self.args.cpt_eval_batches}"]

    def spec(self, study: str, stage: str, arm: Arm, steps: int, seed: int, evals: int) -> dict:
        where = f"{stage} | " if stage != "final" else ""
        key = f"{study} | {where}{steps} steps | {arm.name} | lr {arm.lr:g} | seed {seed}"
        slug = "".join(c if c.isalnum() else "_" for c in key)
        # The first full-fine-tuning run of each study at the full horizon also evaluates the untrained weights.
        first = arm.method == "full" and seed == 0 and evals > 0
        return {
            "key": key,
            "slug": slug,
            "study": study,
            "stage": stage,
            "arm": arm.name,
            "method": arm.method,
            "lr": arm.lr,
            "seed": seed,
            "steps": steps,
            "overrides": [
                *self.base(study, steps, seed, self.work / "runs" / slug, evals, first),
                *arm.args,
                f"--optim.lr={arm.lr}",
            ],
            "prompts": [],
            "threads": self.args.threads,
            "max_new_tokens": 0,
        }

    # -- the stages, in the order their runs start
    def sweep_settings(self) -> list[tuple[str, Lisa]]:
        out = [("base", BASE)]
        for field, values in SWEEP.items():
            out += [(field, replace(BASE, **{field: v})) for v in values if v != getattr(BASE, field)]
        return out

    def sweep_specs(self) -> list[dict]:
        specs = [
            self.spec("sft", "sweep", lisa_arm(setting, self.layers), self.args.sweep_steps, 0, 0)
            for _, setting in self.sweep_settings()
        ]
        specs.insert(1, self.spec("sft", "sweep", lisa_arm(BASE, self.layers), self.args.sweep_steps, 1, 0))
        return specs

    def sweep_done(self) -> bool:
        return all(s["key"] in self.results for s in self.sweep_specs())

    def sweep_loss(self, setting: Lisa, seed: int = 0) -> float:
        spec = self.spec("sft", "sweep", lisa_arm(setting, self.layers), self.args.sweep_steps, seed, 0)
        return self.results[spec["key"]]["heldout_loss"]

    def noise(self) -> float:
        """The gap between the base's two seeds: a variant must beat the base by more to be chosen."""
        return abs(self.sweep_loss(BASE, 0) - self.sweep_loss(BASE, 1))

    def best_lisa(self) -> Lisa:
        """Each swept setting's best value where it beats the base by more than the noise, the base's otherwise."""
        chosen = BASE
        for field, values in SWEEP.items():
            scored = {v: self.sweep_loss(replace(BASE, **{field: v})) for v in values}
            best = min(scored, key=scored.get)
            if scored[best] < scored[getattr(BASE, field)] - self.noise():
                chosen = replace(chosen, **{field: best})
        return chosen

    def lisa_at_lora_memory(self, best: Lisa) -> Lisa:
        """`best` with bf16 frozen layers and frozen always-trained modules, gamma the largest whose planned state
        is at most LoRA r 32's (gamma 1 if none is)."""
        lean = replace(best, storage="bfloat16", scale=0.0)
        target = self.planned(lora_arm())
        gamma = 1
        for g in range(1, self.layers + 1):
            if self.planned(lisa_arm(replace(lean, gamma=g), self.layers)) <= target:
                gamma = g
        return replace(lean, gamma=gamma)

    def planned(self, arm: Arm) -> int:
        """The planner's state bytes (params, grads, masters, Adam moments) of `arm` in this study's runs."""
        from lisa_dist.config import load_config
        from lisa_dist.tools import estimate, plan_config

        if arm not in self.plans:
            spec = self.spec("sft", "plan", arm, 1, 0, 0)
            shapes, setup = plan_config(load_config(None, spec["overrides"]), 1)
            self.plans[arm] = estimate(shapes, arm.method, setup).state
        return self.plans[arm]

    def final_arms(self) -> list[Arm] | None:
        if not self.sweep_done():
            return None
        return [full_arm(), lora_arm(), lisa_arm(self.best_lisa(), self.layers)]

    def candidates(self) -> list[dict]:
        """Every run the study wants now, in the order they start; the runs after the sweep once it is done."""
        a = self.args
        full = {"sft": a.steps, "cpt": a.cpt_steps}
        evals = {"sft": a.sft_evals, "cpt": a.cpt_evals}

        def at(study: str, arm: Arm, seed: int) -> dict:
            return self.spec(study, "final", arm, full[study], seed, evals[study])

        def short(arm: Arm) -> dict:  # beside the sweep, at its horizon
            return self.spec("sft", "sweep", arm, a.sweep_steps, 0, 0)

        specs = [at("sft", full_arm(), 0), at("sft", lora_arm(), 0), *self.sweep_specs(), at("cpt", full_arm(), 0)]
        final = self.final_arms()
        if final is None:
            return [*specs, at("cpt", lora_arm(), 0)]
        memory = lisa_arm(self.lisa_at_lora_memory(self.best_lisa()), self.layers)
        specs += [at("sft", final[2], 0), short(lora_arm()), short(memory)]
        specs += [at("cpt", final[2], 0), at("cpt", lora_arm(), 0)]
        for seed in range(1, a.seeds):
            specs += [at(study, arm, seed) for study in ("sft", "cpt") for arm in final]
        specs += [short(full_arm()), at("sft", memory, 0), at("cpt", memory, 0)]
        return specs

    # -- running them
    def load(self) -> None:
        for path in (self.work / "results").glob("*.json"):
            result = json.loads(path.read_text())
            self.results[result["key"]] = result

    def running(self) -> set[str]:
        alive = set()
        for lock in (self.work / "running").iterdir():
            try:
                os.kill(int(lock.read_text()), 0)
                alive.add(lock.name)
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)
        return alive

    def todo(self) -> list[dict]:
        return [
            s
            for s in self.candidates()
            if self.results.get(s["key"], {}).get("spec") != s and s["key"] not in self.failed
        ]

    def execute(self, budget_s: float) -> None:
        start = time.perf_counter()
        if self.args.quick:  # in this process, one after another
            while todo := self.todo():
                self.record(run_one(todo[0]))
            print(f"{len(self.results)} runs done, 0 to go", flush=True)
            return
        children: dict[str, tuple[dict, subprocess.Popen]] = {}
        while True:
            # The runs that ended before this load: their results, written before they exit, are in it.
            ended = [(spec, child) for spec, child in children.values() if child.poll() is not None]
            self.load()
            for spec, child in ended:
                del children[spec["slug"]]
                (self.work / "running" / spec["slug"]).unlink(missing_ok=True)
                self.report_end(spec, child.returncode)
            running = self.running()
            todo = [s for s in self.todo() if s["slug"] not in running]
            out_of_time = time.perf_counter() - start > budget_s
            if todo and len(running) < self.args.workers and not out_of_time:
                children[todo[0]["slug"]] = todo[0], self.launch(todo[0])
                continue
            if not running:
                break
            time.sleep(5)
        left = self.todo()
        print(f"{len(self.results)} runs done, {len(left)} to go" + (" (out of time)" if left else ""), flush=True)

    def launch(self, spec: dict) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
        log = (self.work / "logs" / f"{spec['slug']}.log").open("w")
        out = self.work / "results" / f"{spec['slug']}.json"
        child = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.quality_long", "--one", json.dumps(spec), "--result", str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            start_new_session=True,  # a driver stopped leaves its runs to finish; the next one collects them
        )
        (self.work / "running" / spec["slug"]).write_text(str(child.pid))
        print(f"started  {spec['key']}", flush=True)
        return child

    def report_end(self, spec: dict, code: int) -> None:
        result = self.results.get(spec["key"])
        if code or result is None or result["spec"] != spec:
            self.failed.add(spec["key"])
            print(f"FAILED   {spec['key']} (exit {code}): {self.work / 'logs' / spec['slug']}.log", flush=True)
            return
        self.print_result(result)

    def record(self, result: dict) -> None:
        self.results[result["key"]] = result
        path = self.work / "results" / f"{result['spec']['slug']}.json"
        path.write_text(json.dumps(result))
        self.print_result(result)

    def print_result(self, result: dict) -> None:
        print(
            f"finished {result['key']:70s} held-out loss {result['heldout_loss']:.4f} ppl "
            f"{result['heldout_ppl']:7.2f} {result['wall_s']:6.0f} s",
            flush=True,
        )


DEFAULTS = {  # name: (full study, --quick)
    "steps": (248, 2),
    "cpt_steps": (291, 2),
    "sweep_steps": (64, 2),
    "sft_evals": (4, 1),
    "cpt_evals": (5, 1),
    "cpt_eval_batches": (16, 2),
    "seeds": (3, 2),
    "micro_batch": (4, 2),
    "seq_len": (256, 1024),
    "workers": (2, 1),
    "threads": (1, 1),
}


def main() -> None:
    parser = harness.parser(__doc__, "quality_long", quick=True)
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the runs done")
    parser.add_argument("--budget-min", type=float, default=150.0, help="start no run after this (default 150)")
    helps = {
        "steps": "instruction-tuning steps of the full horizon (one epoch)",
        "cpt_steps": "continued-pretraining steps of the full horizon (one epoch)",
        "sweep_steps": "steps of each run of the sweep",
        "sft_evals": "held-out evaluations of an instruction-tuning run (besides the first run's at step 0)",
        "cpt_evals": "held-out evaluations of a continued-pretraining run",
        "seeds": "seeds of the final comparison",
        "workers": "runs at a time",
        "threads": "threads per run",
    }
    add_sizes(parser, DEFAULTS, helps)
    parser.add_argument("--work", help="runs, data and results (default: runs/quality_long or ..._quick)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # one run, in this process: its result written when it ends (atomically)
        started = time.time()
        result = {**run_one(json.loads(args.one)), "started_at": started, "ended_at": time.time()}
        tmp = Path(args.result + ".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(args.result)
        return
    if args.quick and args.name == "quality_long":
        args.name = "quality_long_quick"
    resolve_sizes(parser, args, DEFAULTS)
    study = Study(args)
    study.load()
    timing = study.work / "timing.json"
    spent = json.loads(timing.read_text())["elapsed_s"] if timing.is_file() else 0.0
    if not args.report_only:
        start = time.perf_counter()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped driver still adds its time
        try:
            study.execute(args.budget_min * 60)
        finally:  # a study resumed later adds its time to this
            spent += time.perf_counter() - start
            timing.write_text(json.dumps({"elapsed_s": spent}))
    from benchmarks.quality_long_report import report

    report(study, spent)


if __name__ == "__main__":
    main()
