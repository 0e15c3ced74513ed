"""Training data: files or a hub dataset read, tokenized and cached (`sources`; conversations masked by `chat`),
several sources drawn by weight (`mixture`), held out and packed (`packing`), and each rank's micro-batches
(`batching`)."""

from lisa_dist.data.batching import ShardedBatches, collate, collate_rows, flatten_packed
from lisa_dist.data.chat import use_chat_template
from lisa_dist.data.mixture import Mixture, MixtureOrder, load_mixture
from lisa_dist.data.packing import best_fit_decreasing, fill_rate, pack_examples, split_heldout
from lisa_dist.data.sources import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    alpaca_prompt,
    cache_key,
    data_fingerprint,
    load_examples,
    load_examples_with_stats,
    resolve_sources,
)

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "Mixture",
    "MixtureOrder",
    "ShardedBatches",
    "alpaca_prompt",
    "best_fit_decreasing",
    "cache_key",
    "collate",
    "collate_rows",
    "data_fingerprint",
    "fill_rate",
    "flatten_packed",
    "load_examples",
    "load_examples_with_stats",
    "load_mixture",
    "pack_examples",
    "resolve_sources",
    "split_heldout",
    "use_chat_template",
]
