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
    "Mixture",
    "MixtureOrder",
    "load_mixture",
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "alpaca_prompt",
    "ShardedBatches",
    "best_fit_decreasing",
    "cache_key",
    "fill_rate",
    "flatten_packed",
    "data_fingerprint",
    "collate",
    "collate_rows",
    "pack_examples",
    "split_heldout",
    "load_examples",
    "load_examples_with_stats",
    "resolve_sources",
    "use_chat_template",
]
