"""Tokenised pairs kept for the process: the trainings of a cross-validation tokenise each pair once.

A stacked config trains ``stack.folds`` out-of-fold models and a final one in one process, each on
a subset of the same train+val pairs, and each used to tokenise its pairs again. ``encode_pairs``
keeps every pair's token ids (pair, towers, truncation flag, lexical coverage) under the
encoder's identity (tokenizer, its vocabulary size, the model config's lengths and priors), so a
pair already seen is looked up instead. Only the plain ``PairEncoder`` is cached: the other
families' encoders build per-list inputs (candidate-list ids) or prompts.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from cachetools import LRUCache

from esci_reranker.model.features import EncodedPairs, PairEncoder, TokenRows

#: Most pairs kept per encoder identity (least recently used dropped first): ~10x the sample's
#: train+val pairs; a pair's packed ids are ~1 KB, so a few hundred MB at full ESCI scale.
MAX_PAIRS = 500_000

# a pair's packed pair ids, token types, query and product ids, truncation flag, coverage
_Entry = tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None, bool, float | None]
_CACHES: dict[tuple[Any, ...], LRUCache[tuple[str, str], _Entry]] = {}
_LOCK = threading.Lock()
_COLUMNS = ("pair_ids", "pair_type_ids", "query_ids", "product_ids")


def _identity(encoder: PairEncoder) -> tuple[Any, ...]:
    tok, cfg = encoder.tokenizer, encoder.config
    return (
        type(tok).__name__,
        getattr(tok, "name_or_path", ""),
        len(tok),
        getattr(tok, "truncation_side", "right"),
        cfg.max_length,
        cfg.prior,
        cfg.query_max_length,
        cfg.product_max_length,
        cfg.lexical,
    )


def _row(column: TokenRows | None, j: int) -> np.ndarray | None:
    # its own memory: the chunk it came from can go (``PairEncoder.encode`` packs every column)
    return None if column is None else column.row_array(j).copy()


def encode_pairs(encoder: PairEncoder, queries: Sequence[str], texts: Sequence[str]) -> EncodedPairs:
    """``encoder.encode(queries, texts)``, with every (query, text) pair tokenised at most once per
    process for the same encoder identity. Encoders other than ``PairEncoder`` itself are called
    directly."""
    if type(encoder) is not PairEncoder:
        return encoder.encode(queries, texts)
    if len(queries) != len(texts):
        raise ValueError(f"got {len(queries)} queries but {len(texts)} product texts.")
    with _LOCK:
        cache = _CACHES.setdefault(_identity(encoder), LRUCache(maxsize=MAX_PAIRS))
        found = {i: cache.get((q, t)) for i, (q, t) in enumerate(zip(queries, texts, strict=True))}
    missing = [i for i, entry in found.items() if entry is None]
    if missing:
        fresh = encoder.encode([queries[i] for i in missing], [texts[i] for i in missing])
        with _LOCK:
            for j, i in enumerate(missing):
                entry = (
                    *(_row(getattr(fresh, name), j) for name in _COLUMNS),
                    fresh.truncated[j],
                    None if fresh.lexical is None else fresh.lexical[j],
                )
                found[i] = cache[(queries[i], texts[i])] = entry  # type: ignore[assignment]
        del fresh
    entries = [found.pop(i) for i in range(len(queries))]
    if not entries:
        return encoder.encode([], [])

    def packed(k: int) -> TokenRows | None:
        first = entries[0][k]
        if first is None:
            return None
        # the rows keep the type PairEncoder packed them in (int8 token types, int32 ids)
        return TokenRows.from_rows([e[k] for e in entries], first.dtype.type)  # type: ignore[misc,union-attr]

    return EncodedPairs(
        pair_ids=packed(0),  # type: ignore[arg-type]
        pair_type_ids=packed(1),
        query_ids=packed(2),
        product_ids=packed(3),
        truncated=[bool(e[4]) for e in entries],
        lexical=None if entries[0][5] is None else [float(e[5]) for e in entries],  # type: ignore[arg-type]
    )
