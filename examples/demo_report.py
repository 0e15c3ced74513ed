"""What `make demo` prints after training: the eval loss before and after, and one held-out example answered by the
model before and after the fine-tune (greedy), next to the reference answer.

    python examples/demo_report.py RUN_DIR BASE_MODEL_DIR [--max-new-tokens N]

The held-out example is the first of the run's evaluation examples (data.eval_fraction, drawn by train.seed as the
run drew them), prompted exactly as it was trained: the tokens before its response.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from lisa_dist.config import from_dict
from lisa_dist.data import load_examples, split_heldout
from lisa_dist.models import IGNORE_INDEX
from lisa_dist.run import read_jsonl
from lisa_dist.tools import continue_ids, load_for_generation


def held_out_example(run_dir: Path, tokenizer) -> tuple[list[int], str]:
    """The first held-out example's prompt ids and its reference answer."""
    cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    examples = load_examples(cfg.data, tokenizer)
    _, held_out = split_heldout(examples, cfg.data.eval_fraction, cfg.train.seed)
    ids, labels = held_out[0]["input_ids"], held_out[0]["labels"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[:first], tokenizer.decode(ids[first:], skip_special_tokens=True)


def answer(folder: Path, prompt: list[int], max_new_tokens: int) -> str:
    model, tokenizer = load_for_generation(folder)
    return continue_ids(model, tokenizer, prompt, max_new_tokens=max_new_tokens).strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("base_model", type=Path)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    args = parser.parse_args()
    evals = [r for r in read_jsonl(args.run_dir / "metrics.jsonl") if "eval_loss" in r]
    if not evals:
        print(f"{args.run_dir}/metrics.jsonl has no eval record (the run needs data.eval_fraction)", file=sys.stderr)
        return 2
    first, last = evals[0], evals[-1]
    print(
        f"eval loss: {first['eval_loss']:.4f} (perplexity {first['eval_ppl']:.3f}) at step {first['step']} -> "
        f"{last['eval_loss']:.4f} (perplexity {last['eval_ppl']:.3f}) at step {last['step']}, over "
        f"{last['eval_tokens']} held-out tokens"
    )
    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    prompt, reference = held_out_example(args.run_dir, tokenizer)
    print("\nheld-out prompt:\n" + tokenizer.decode(prompt, skip_special_tokens=True).strip())
    print("\nreference answer:\n" + reference[:400])
    print("\nbefore the fine-tune:\n" + answer(args.base_model, prompt, args.max_new_tokens))
    print("\nafter the fine-tune:\n" + answer(args.run_dir / "final", prompt, args.max_new_tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
