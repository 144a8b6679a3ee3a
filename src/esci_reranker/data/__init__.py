"""ESCI data: read the raw parquets (or a joined file), clean product text, split by query.

``prepare`` returns train / val / test frames and their stats; ``write_splits`` writes them
atomically; ``sample_path()`` is the bundled real-data sample. Product text building lives in
``esci_reranker.data.text`` and is shared with inference.
"""

from __future__ import annotations

from esci_reranker.data.io import (
    ALL_LOCALES,
    EXAMPLES_FILE_NAME,
    LOCALES,
    PRODUCTS_FILE_NAME,
    DataError,
    LoadedTable,
    load_examples,
    load_joined,
    load_products,
)
from esci_reranker.data.prepare import (
    OUTPUT_TYPES,
    PrepareOptions,
    PrepareResult,
    prepare,
    write_splits,
)
from esci_reranker.data.sample import sample_holdout_query_ids, sample_path
from esci_reranker.data.splits import SPLITS, assign_splits

__all__ = [
    "ALL_LOCALES",
    "EXAMPLES_FILE_NAME",
    "LOCALES",
    "OUTPUT_TYPES",
    "PRODUCTS_FILE_NAME",
    "SPLITS",
    "DataError",
    "LoadedTable",
    "PrepareOptions",
    "PrepareResult",
    "assign_splits",
    "load_examples",
    "load_joined",
    "load_products",
    "prepare",
    "sample_holdout_query_ids",
    "sample_path",
    "write_splits",
]
