"""The data path: sources -> formats -> tokens and labels -> packing -> batches, cached.

`prepare_data(cfg, tokenizer)` is the entry point the training loop uses.
"""

from strop.data.prepare import DataStats, PreparedData, prepare_data

__all__ = ["DataStats", "PreparedData", "prepare_data"]
