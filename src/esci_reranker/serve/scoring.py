"""The one step every scoring endpoint shares: model outputs for one query and its candidate texts.

``Scorer.score`` (synchronous, thread-safe) and ``Scorer.score_async`` (what the routes await)
look the request up in the cache, then run the model one of two ways:

- **dynamic batching** (``BATCH_WAIT_MS > 0``, the default): the pairs are tokenised in a worker
  thread and handed to the ``DynamicBatcher``, whose single worker thread merges them with other
  requests' pairs into token-bounded forward passes; the route awaits the result without holding
  a thread (see ``serve/batching.py``);
- **direct** (``BATCH_WAIT_MS=0``): ``Reranker.predict_texts`` in a worker thread, one request at
  a time under a lock.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from esci_reranker.model.features import EncodedPairs
from esci_reranker.reranker import Predictions, Reranker
from esci_reranker.serve.batching import BatchedOutput, BatcherClosedError, DynamicBatcher
from esci_reranker.serve.cache import PredictionCache, cache_key
from esci_reranker.serve.errors import ApiError
from esci_reranker.serve.memory import MemoryGuard
from esci_reranker.serve.metrics import Metrics

#: Candidates' field mappings for a stacked model (None: the texts alone).
Records = Sequence[Mapping[str, Any]] | None


@dataclass(frozen=True)
class ScoreResult:
    """Model outputs for one request, in candidate order, and how they were obtained."""

    predictions: Predictions
    forward_ms: float
    cache_hit: bool


class SingleThread:
    """One worker thread, started on first use and again after ``close``; safe to ask from any thread.

    For work whose torch OpenMP pool belongs to the thread that runs it: one thread keeps one pool.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def get(self) -> ThreadPoolExecutor:
        """The thread's executor (started now if there is none)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
            return self._executor

    def close(self) -> None:
        """Let the thread end once its queued work is done, without waiting for it."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)


class Scorer:
    """Scores candidates with a ``Reranker``: cache lookup, then the model (batched or direct).

    Without a batcher, one lock serialises forward passes: on a CPU the model already uses every
    core for one request, and it keeps the GPU memory bound at one request's batch. With one, the
    batcher's worker thread is the only one running the model.
    """

    def __init__(
        self,
        reranker: Reranker,
        cache: PredictionCache | None = None,
        metrics: Metrics | None = None,
        batcher: DynamicBatcher | None = None,
        memory: MemoryGuard | None = None,
    ) -> None:
        self.reranker = reranker
        self.cache = cache
        self.metrics = metrics
        self.batcher = batcher
        # With a batcher the memory check is its after_batch hook; the direct path runs it here.
        self.memory = memory
        self._lock = threading.Lock()
        # A fast tokenizer is not thread-safe (its truncation setting is shared state; concurrent
        # calls can skip truncation or fail with "Already borrowed"): one tokenisation at a time.
        self._encode_lock = threading.Lock()
        # Its own lock, not self._lock: that one is held for a whole forward pass, and the event
        # loop asks for the thread.
        self._model_thread = SingleThread("esci-model")

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

    @property
    def stacked(self) -> bool:
        """Whether the model reads product fields beyond its text (a stacker's features)."""
        return self.reranker.stacker is not None

    def score(self, query: str, texts: Sequence[str], records: Records = None) -> ScoreResult:
        """Predictions for ``(query, text)`` for every text, from the cache or the model (blocks).

        ``records`` are the candidates' field mappings, which a stacked model's features read
        (``Reranker.predict_texts``); ignored by a model without a stacker.

        Raises:
            ApiError: 503 when the service shut down before the request was scored.
        """
        records = records if self.stacked else None
        if self.batcher is None:
            key, answer = self._lookup(query, texts, records)
            if answer is not None:
                return answer
            return self._submit_direct(key, query, texts, records).result()
        prepared = self._prepare(query, texts, records)
        if isinstance(prepared, ScoreResult):
            return prepared
        with _shutdown_is_503():
            output = self._submit(prepared[1]).result()
        return self._finish(*prepared, output, query, texts, records)

    async def score_async(self, query: str, texts: Sequence[str], records: Records = None) -> ScoreResult:
        """``score`` for the event loop: hashing, tokenising and the direct path run in a worker
        thread; a batched request awaits the batcher's future without holding a thread."""
        records = records if self.stacked else None
        if self.batcher is None:
            # Cache lookups stay off the model thread, so a hit never queues behind a forward.
            key, answer = await run_in_threadpool(self._lookup, query, texts, records)
            if answer is not None:
                return answer
            return await asyncio.wrap_future(self._submit_direct(key, query, texts, records))
        prepared = await run_in_threadpool(self._prepare, query, texts, records)
        if isinstance(prepared, ScoreResult):
            return prepared
        with _shutdown_is_503():
            output = await asyncio.wrap_future(self._submit(prepared[1]))
        # The heads' post-processing (a stacker's features and trees) runs in a worker thread too:
        # on the event loop it would hold up every other answer, a load-shedding 429 included.
        return await run_in_threadpool(self._finish, *prepared, output, query, texts, records)

    def truncate_tokens(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        """Each text cut to its first ``max_tokens`` tokens of the model's tokenizer (whole tokens,
        cut at the end of the last kept token's characters); shorter texts are returned as they are.

        Blocks on the tokenizer lock: call it from a worker thread.
        """
        out = list(texts)
        # A token covers at least one UTF-8 byte (WordPiece and byte-level BPE alike), so a text of
        # at most max_tokens bytes cannot be longer: only the others need the tokenizer.
        long = [i for i, text in enumerate(out) if len(text.encode("utf-8")) > max_tokens]
        if not long:
            return out
        tokenizer = self.reranker.pair_encoder.tokenizer
        with self._encode_lock:
            if not getattr(tokenizer, "is_fast", False):
                # A slow (Python) tokenizer has no character offsets: decode the kept tokens instead.
                ids = tokenizer([out[i] for i in long], add_special_tokens=False)["input_ids"]
                for i, row in zip(long, ids, strict=True):
                    if len(row) > max_tokens:
                        out[i] = tokenizer.decode(row[:max_tokens])
                return out
            encoded = tokenizer([out[i] for i in long], add_special_tokens=False, return_offsets_mapping=True)
        for i, offsets in zip(long, encoded["offset_mapping"], strict=True):
            if len(offsets) > max_tokens:
                out[i] = out[i][: offsets[max_tokens - 1][1]]
        return out

    def warm_up(self) -> None:
        """One dummy forward pass (through the batcher's thread when batching), so the first real
        request does not pay for lazy initialisation."""
        queries, texts = ["warm up"], ["warm up | example product"]
        if self.batcher is None:
            self._direct_thread().submit(self.reranker.predict_texts, queries, texts).result()
        else:
            self._submit(self._encode(queries, texts)).result()

    def close(self) -> None:
        """Stop the batcher (requests still waiting get a 503) and the direct path's thread."""
        if self.batcher is not None:
            self.batcher.close()
        self._model_thread.close()

    def _submit_direct(
        self, key: bytes, query: str, texts: Sequence[str], records: Records
    ) -> Future[ScoreResult]:
        """Queue a direct-path forward on the model thread, then the memory check behind it (so the
        check never delays this request's answer, and never overlaps a forward)."""
        thread = self._direct_thread()
        future = thread.submit(self._direct, key, query, texts, records)
        if self.memory is not None:
            thread.submit(self.memory.check)
        return future

    def _direct(self, key: bytes, query: str, texts: Sequence[str], records: Records) -> ScoreResult:
        """The direct path's forward pass (on the model thread), stored in the cache."""
        with self._lock:
            start = time.perf_counter()
            predictions = self.reranker.predict_texts([query] * len(texts), list(texts), records=records)
            seconds = time.perf_counter() - start
        return self._store(key, predictions, seconds)

    def _direct_thread(self) -> ThreadPoolExecutor:
        """The one thread that runs direct-path requests (created on first use, again after close).

        Every forward pass runs on the same thread because torch's OpenMP pool belongs to the
        thread that starts it: model calls spread over the event loop's worker threads each
        bring up a pool of their own, and idle pools fight the busy one for the cores (a
        40-candidate request measured ~1.35x slower on 2 cores).
        """
        return self._model_thread.get()

    # ------------------------------------------------------------------------------------------
    def _lookup(
        self, query: str, texts: Sequence[str], records: Records = None
    ) -> tuple[bytes, ScoreResult | None]:
        """The cache key and, when no model call is needed (a cache hit, no texts), the answer."""
        if not texts:
            return b"", ScoreResult(Predictions.empty(), 0.0, False)
        if self.cache is None:
            return b"", None
        key = cache_key(self.model_id, query, self.reranker.input_key(texts, records))
        cached = self.cache.get(key)
        if self.metrics is not None:
            (self.metrics.cache_hits if cached is not None else self.metrics.cache_misses).inc()
        return key, ScoreResult(cached, 0.0, True) if cached is not None else None

    def _prepare(
        self, query: str, texts: Sequence[str], records: Records = None
    ) -> ScoreResult | tuple[bytes, EncodedPairs]:
        """Batched path, before queueing: the answer without the model, or the cache key and the pairs."""
        key, answer = self._lookup(query, texts, records)
        if answer is not None:
            return answer
        return key, self._encode([query] * len(texts), list(texts))

    def _encode(self, queries: list[str], texts: list[str]) -> EncodedPairs:
        with self._encode_lock:
            return self.reranker.pair_encoder.encode(queries, texts)

    def _submit(self, encoded: EncodedPairs) -> Future[BatchedOutput]:
        if self.batcher is None:
            raise RuntimeError("Scorer._submit: no dynamic batcher (BATCH_WAIT_MS=0); use the direct path.")
        return self.batcher.submit(encoded)

    def _finish(
        self,
        key: bytes,
        encoded: EncodedPairs,
        output: BatchedOutput,
        query: str,
        texts: Sequence[str],
        records: Records,
    ) -> ScoreResult:
        truncated = np.asarray(encoded.truncated, dtype=bool)
        predictions = self.reranker.finish(output.outputs, truncated, [query] * len(texts), texts, records)
        return self._store(key, predictions, output.forward_seconds)

    def _store(self, key: bytes, predictions: Predictions, seconds: float) -> ScoreResult:
        _freeze(predictions)
        if self.metrics is not None:
            self.metrics.observe_forward(seconds, len(predictions))
        if self.cache is not None:
            self.cache.put(key, predictions)
        return ScoreResult(predictions, seconds * 1000.0, False)


@contextmanager
def _shutdown_is_503() -> Iterator[None]:
    """Turn ``BatcherClosedError`` (the service stopped before scoring the request) into a JSON 503."""
    try:
        yield
    except BatcherClosedError:
        raise ApiError(
            503,
            "the service is shutting down and did not score this request; retry it (on another instance).",
            headers={"Retry-After": "1"},
        ) from None


def _freeze(predictions: Predictions) -> None:
    # Cached arrays are shared between requests: make accidental in-place edits fail loudly.
    for value in vars(predictions).values():
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
