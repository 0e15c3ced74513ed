"""Training data: files or a hub dataset read, tokenized and cached (`sources`), held out and packed (`packing`),
and each rank's micro-batches (`batching`)."""
from lisa_dist.data.batching import ShardedBatches, collate, collate_rows
from lisa_dist.data.packing import pack_examples, split_heldout
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
    "alpaca_prompt",
    "ShardedBatches",
    "cache_key",
    "data_fingerprint",
    "collate",
    "collate_rows",
    "pack_examples",
    "split_heldout",
    "load_examples",
    "load_examples_with_stats",
    "resolve_sources",
]
