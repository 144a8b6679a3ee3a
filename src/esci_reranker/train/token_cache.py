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

from cachetools import LRUCache

from esci_reranker.model.features import EncodedPairs, PairEncoder

#: Most pairs kept per encoder identity (least recently used dropped first): ~10x the sample's
#: train+val pairs, a few hundred MB at full ESCI scale.
MAX_PAIRS = 500_000

_Entry = tuple[list[int], list[int] | None, list[int] | None, list[int] | None, bool, float | None]
_CACHES: dict[tuple[Any, ...], LRUCache[tuple[str, str], _Entry]] = {}
_LOCK = threading.Lock()


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
                    fresh.pair_ids[j],
                    None if fresh.pair_type_ids is None else fresh.pair_type_ids[j],
                    None if fresh.query_ids is None else fresh.query_ids[j],
                    None if fresh.product_ids is None else fresh.product_ids[j],
                    fresh.truncated[j],
                    None if fresh.lexical is None else fresh.lexical[j],
                )
                found[i] = cache[(queries[i], texts[i])] = entry
    entries = [found[i] for i in range(len(queries))]
    column = list(zip(*entries, strict=True)) if entries else [[] for _ in range(6)]

    def optional(k: int) -> list[Any] | None:
        values = list(column[k])
        return None if values and values[0] is None else values

    return EncodedPairs(
        pair_ids=list(column[0]),
        pair_type_ids=optional(1),
        query_ids=optional(2),
        product_ids=optional(3),
        truncated=list(column[4]),
        lexical=optional(5),
    )
