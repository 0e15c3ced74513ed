"""Training data: files or a hub dataset read, tokenized and cached (`sources`), and each rank's micro-batches
(`batching`)."""
from lisa_dist.data.batching import ShardedBatches, collate
from lisa_dist.data.sources import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    cache_key,
    load_examples,
    load_examples_with_stats,
    resolve_sources,
)

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "ShardedBatches",
    "cache_key",
    "collate",
    "load_examples",
    "load_examples_with_stats",
    "resolve_sources",
]
