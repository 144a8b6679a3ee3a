"""The one step every scoring endpoint shares: model outputs for one query and its candidate texts.

``Scorer.score`` is synchronous and thread-safe; routes call it through a worker thread so the
event loop keeps answering ``/health`` and ``/metrics`` while a large request is scored. It is the
seam where a dynamic-batching queue (issue #7) will replace the lock around the forward pass.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from esci_reranker.reranker import Predictions, Reranker
from esci_reranker.serve.cache import PredictionCache, cache_key
from esci_reranker.serve.metrics import Metrics


@dataclass(frozen=True)
class ScoreResult:
    """Model outputs for one request, in candidate order, and how they were obtained."""

    predictions: Predictions
    forward_ms: float
    cache_hit: bool


class Scorer:
    """Scores candidates with a ``Reranker``: cache lookup, then one model call under a lock.

    One lock serialises forward passes: on a CPU the model already uses every core for one
    request, and it keeps the GPU memory bound at one request's batch.
    """

    def __init__(
        self, reranker: Reranker, cache: PredictionCache | None = None, metrics: Metrics | None = None
    ) -> None:
        self.reranker = reranker
        self.cache = cache
        self.metrics = metrics
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        """The loaded model's name (its path or Hub id), part of every cache key."""
        return self.reranker.name

    @property
    def multi_task(self) -> bool:
        """Whether the model has the Task 2 (E/S/C/I) and Task 3 (substitute) heads."""
        return bool(self.reranker.config.multi_task)

    @property
    def device(self) -> str:
        return str(self.reranker.device)

    def text_of(self, product: str | Mapping[str, Any]) -> str:
        """The text the model reads for a product (built from fields exactly as in training)."""
        return self.reranker.text_of(product)

    def score(self, query: str, texts: Sequence[str]) -> ScoreResult:
        """Predictions for ``(query, text)`` for every text, from the cache or one model call."""
        if not texts:
            return ScoreResult(Predictions.empty(), 0.0, False)
        key = cache_key(self.model_id, query, texts) if self.cache is not None else b""
        if self.cache is not None:
            cached = self.cache.get(key)
            if self.metrics is not None:
                (self.metrics.cache_hits if cached is not None else self.metrics.cache_misses).inc()
            if cached is not None:
                return ScoreResult(cached, 0.0, True)
        with self._lock:
            start = time.perf_counter()
            predictions = self.reranker.predict_texts([query] * len(texts), list(texts))
            seconds = time.perf_counter() - start
        _freeze(predictions)
        if self.metrics is not None:
            self.metrics.observe_forward(seconds, len(texts))
        if self.cache is not None:
            self.cache.put(key, predictions)
        return ScoreResult(predictions, seconds * 1000.0, False)

    def warm_up(self) -> None:
        """One dummy forward pass, so the first real request does not pay for lazy initialisation."""
        with self._lock:
            self.reranker.predict_texts(["warm up"], ["warm up | example product"])


def _freeze(predictions: Predictions) -> None:
    # Cached arrays are shared between requests: make accidental in-place edits fail loudly.
    for value in vars(predictions).values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
