"""A thread-safe LRU cache of model outputs, shared by every scoring endpoint.

The value is the model's ``Predictions`` for one (query, candidate texts) list, so ``/classify``
after ``/rerank`` of the same request reads the cache instead of running the model again. The
key is a SHA-256 digest of (model id, query, texts): the same identity as the tuple itself, but
a fixed 32 bytes, so 256 cached 1000-candidate requests do not keep their texts in memory twice.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

from cachetools import LRUCache

from esci_reranker.reranker import Predictions


def cache_key(model_id: str, query: str, texts: Sequence[str]) -> bytes:
    """Digest of ``(model_id, query, tuple(texts))``; each part is length-prefixed so joins cannot collide."""
    digest = hashlib.sha256()
    for part in (model_id, query, *texts):
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    digest.update(len(texts).to_bytes(8, "little"))
    return digest.digest()


class PredictionCache:
    """LRU of ``Predictions`` keyed by ``cache_key``; every method may be called from any thread."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"PredictionCache maxsize={maxsize}; expected >= 1 (use no cache for 0).")
        self.maxsize = maxsize
        self._lru: LRUCache[bytes, Predictions] = LRUCache(maxsize=maxsize)
        self._lock = threading.Lock()

    def get(self, key: bytes) -> Predictions | None:
        """The cached predictions for ``key`` (marking them most recently used), or None."""
        with self._lock:
            return self._lru.get(key)

    def put(self, key: bytes, predictions: Predictions) -> None:
        """Store ``predictions`` under ``key``, evicting the least recently used entry when full."""
        with self._lock:
            self._lru[key] = predictions

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._lru.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)
