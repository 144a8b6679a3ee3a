"""Dynamic batching: pairs of concurrent requests share forward passes (as in text-embeddings-inference).

Each request hands its encoded (query, product) pairs to ``DynamicBatcher.submit`` and gets a
``concurrent.futures.Future`` back (``asyncio.wrap_future`` makes it awaitable). One worker thread
owns the model, so forward passes never overlap. When work is waiting, the worker gathers pairs for
up to ``max_wait_ms`` after the oldest waiting request arrived (or until a full batch is waiting),
then packs one forward pass:

- **bounded by ``max_batch_tokens`` padded tokens**: rows × the widest row (summed over the
  model's inputs: the pair, plus the query and product towers of a ``prior: cosine`` model), the
  size of the tensors the model really computes on. A single pair wider than the budget on its own
  goes alone;
- **oldest request first**, each request's pairs **longest first**: the oldest request's pairs
  open the batch, later requests fill the room left with whichever of their pairs still fit. So a
  request with many candidates is split into several length-sorted forwards, and short requests
  arriving meanwhile ride along;
- results are **scattered back** to each request in its own pair order; a request's future
  completes when its last pair has been scored.

A forward that raises fails only the requests with pairs in that batch (their futures get the
exception; the worker carries on). ``close()`` fails every waiting request with ``BatcherClosedError``
and stops the worker once the forward in progress has finished, so no caller waits forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from esci_reranker.model.features import EncodedPairs

if TYPE_CHECKING:
    from esci_reranker.reranker import Reranker
    from esci_reranker.serve.metrics import Metrics

log = logging.getLogger("esci_reranker.serve")


class BatcherClosedError(RuntimeError):
    """The batcher was closed (the service is shutting down) before the request was scored."""


@dataclass(frozen=True)
class BatchInfo:
    """One forward pass the worker ran, as reported to ``on_batch``.

    Attributes:
        requests: how many requests had pairs in it.
        pairs: rows of the batch.
        padded_tokens: rows × widest row, summed over the model inputs (what ``max_batch_tokens`` bounds).
        seconds: time of the forward pass (padding, model, copying outputs).
        error: the exception's ``repr`` when the forward failed, else None.
    """

    requests: int
    pairs: int
    padded_tokens: int
    seconds: float
    error: str | None = None


@dataclass(frozen=True)
class BatchedOutput:
    """A request's raw head outputs (as ``Reranker.run_encoded`` returns them), in its pair order.

    Attributes:
        outputs: ``score`` (N,), and ``esci_logits`` (N, 4), ``substitute_logit`` (N,) for a
            multi-task model.
        forward_seconds: summed time of the forward passes that scored its pairs (shared with the
            other requests in them).
        batches: how many forward passes its pairs were spread over.
    """

    outputs: dict[str, np.ndarray]
    forward_seconds: float
    batches: int


def pair_widths(encoded: EncodedPairs) -> np.ndarray:
    """(N, K) token counts of each pair per model input: the pair, then the query and product towers."""
    columns = [encoded.pair_ids]
    if encoded.query_ids is not None and encoded.product_ids is not None:
        columns += [encoded.query_ids, encoded.product_ids]
    widths = np.zeros((len(encoded), len(columns)), dtype=np.int64)
    for k, seqs in enumerate(columns):
        widths[:, k] = [len(s) for s in seqs]
    return widths


def padded_tokens(widths: np.ndarray) -> int:
    """Padded tokens of a batch of rows with these (N, K) widths: rows × Σ_k max width of input k."""
    return int(len(widths) * widths.max(axis=0).sum()) if len(widths) else 0


@dataclass(eq=False)
class _Request:
    encoded: EncodedPairs
    widths: np.ndarray  # (N, K)
    remaining: list[int]  # pair indices not yet scheduled, longest first
    future: Future[BatchedOutput]
    submitted: float
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    scored: int = 0
    forward_seconds: float = 0.0
    batches: int = 0


@dataclass
class _Batch:
    parts: list[tuple[_Request, list[int]]]
    widths: np.ndarray  # (rows, K) in row order
    full: bool  # pairs were left waiting for lack of room

    @property
    def pairs(self) -> int:
        return len(self.widths)


class DynamicBatcher:
    """Gathers the pairs of concurrent requests into token-bounded forward passes on one worker thread.

    Args:
        reranker: the model; the worker calls ``reranker.runner`` on batches made by
            ``reranker.pair_encoder.collate``.
        max_wait_ms: how long the oldest waiting request may wait for company (> 0).
        max_batch_tokens: padded-token budget of one forward (rows × widest row).
        metrics: where the queue gauge and the per-forward histograms go (None: nowhere).
        on_batch: called by the worker after every forward pass (tests, logging).
        after_batch: called by the worker once a forward pass's requests have their results
            (the memory policy's check, ``MemoryGuard.check``), so it never delays those answers.
    """

    def __init__(
        self,
        reranker: Reranker,
        max_wait_ms: float,
        max_batch_tokens: int,
        metrics: Metrics | None = None,
        on_batch: Callable[[BatchInfo], None] | None = None,
        after_batch: Callable[[], object] | None = None,
    ) -> None:
        if not max_wait_ms > 0:
            raise ValueError(
                f"DynamicBatcher max_wait_ms={max_wait_ms}; expected > 0 (BATCH_WAIT_MS=0 means no batcher)."
            )
        if max_batch_tokens < 1:
            raise ValueError(f"DynamicBatcher max_batch_tokens={max_batch_tokens}; expected >= 1.")
        self.reranker = reranker
        self.max_wait = max_wait_ms / 1000.0
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics
        self.on_batch = on_batch
        self.after_batch = after_batch
        self._pending: list[_Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- callers ---------------------------------------------------------------------------------

    def submit(self, encoded: EncodedPairs) -> Future[BatchedOutput]:
        """Queue ``encoded`` for scoring; the future resolves to its ``BatchedOutput``.

        Thread-safe; never blocks on the model. Cancelling the future drops the pairs not yet run.

        Raises:
            BatcherClosedError: after ``close()``.
        """
        future: Future[BatchedOutput] = Future()
        n = len(encoded)
        if n == 0:
            future.set_result(BatchedOutput({"score": np.zeros(0, np.float32)}, 0.0, 0))
            return future
        widths = pair_widths(encoded)
        order = np.argsort(-widths.sum(axis=1), kind="stable").tolist()  # longest first
        request = _Request(encoded, widths, order, future, time.monotonic())
        with self._cond:
            if self._closed:
                raise BatcherClosedError("the dynamic batcher is closed: the service is shutting down.")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="esci-batcher", daemon=True)
                self._thread.start()
            self._pending.append(request)
            self._queue_changed()
            self._cond.notify()
        return future

    def close(self, timeout: float | None = 30.0) -> None:
        """Fail waiting requests with ``BatcherClosedError``, let the forward in progress finish, stop the worker.

        Idempotent. ``timeout`` bounds the wait for the worker (it is a daemon thread either way).
        """
        with self._cond:
            self._closed = True
            waiting, self._pending = self._pending, []
            self._queue_changed()
            self._cond.notify_all()
            thread = self._thread
        error = BatcherClosedError("the service shut down before this request was scored; retry it.")
        for request in waiting:
            _fail(request, error)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def queued_pairs(self) -> int:
        """Pairs waiting for a forward pass (not counting the one running)."""
        with self._cond:
            return sum(len(r.remaining) for r in self._pending)

    # -- the worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        batch: _Batch | None = None
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run(batch)
        except BaseException as err:  # never leave callers waiting on a dead worker
            log.exception("dynamic batcher worker stopped unexpectedly")
            with self._cond:
                self._closed = True
                waiting, self._pending = self._pending, []
                self._queue_changed()
            running = [request for request, _ in batch.parts] if batch is not None else []
            for request in [*running, *waiting]:
                _fail(request, BatcherClosedError(f"the dynamic batcher stopped ({err!r})"))
            raise

    def _next_batch(self) -> _Batch | None:
        """Block until a batch is due (full, or the oldest request waited ``max_wait``); None once closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                live = [r for r in self._pending if not r.future.done()]  # drop cancelled requests
                if len(live) != len(self._pending):
                    self._pending = live
                    self._queue_changed()
                if not self._pending:
                    self._cond.wait()
                    continue
                batch = self._pack()
                wait = self._pending[0].submitted + self.max_wait - time.monotonic()
                if batch.full or wait <= 0:
                    self._take(batch)
                    return batch
                self._cond.wait(wait)

    def _pack(self) -> _Batch:
        """The next batch: the oldest request's pairs first, then whatever of later ones still fits."""
        parts: list[tuple[_Request, list[int]]] = []
        rows: list[np.ndarray] = []
        widest: np.ndarray | None = None
        left_out = False
        for request in self._pending:
            chosen: list[int] = []
            for index in request.remaining:
                width = request.widths[index]
                grown = width if widest is None else np.maximum(widest, width)
                if widest is None or (len(rows) + 1) * int(grown.sum()) <= self.max_batch_tokens:
                    chosen.append(index)
                    rows.append(width)
                    widest = grown
                else:
                    left_out = True
            if chosen:
                parts.append((request, chosen))
        widths = np.stack(rows) if rows else np.zeros((0, 1), np.int64)
        return _Batch(parts, widths, full=left_out)

    def _take(self, batch: _Batch) -> None:
        for request, chosen in batch.parts:
            taken = set(chosen)
            request.remaining = [i for i in request.remaining if i not in taken]
        self._pending = [r for r in self._pending if r.remaining]
        self._queue_changed()

    def _run(self, batch: _Batch) -> None:
        start = time.perf_counter()
        error: Exception | None = None
        try:
            merged = _merge(batch.parts)
            encoder = self.reranker.pair_encoder
            out = self.reranker.runner(encoder.collate(merged, range(len(merged))))
        except Exception as err:  # fail this batch's requests only; the worker keeps serving
            error = err
        seconds = time.perf_counter() - start
        info = BatchInfo(
            requests=len(batch.parts),
            pairs=batch.pairs,
            padded_tokens=padded_tokens(batch.widths),
            seconds=seconds,
            error=repr(error) if error is not None else None,
        )
        # Report before resolving futures, so a caller that wakes up sees its batch in the metrics.
        if self.metrics is not None:
            self.metrics.observe_batch(info.pairs, info.padded_tokens)
        if self.on_batch is not None:
            try:
                self.on_batch(info)
            except Exception:
                log.exception("dynamic batcher on_batch hook failed")
        if error is not None:
            log.error(
                "forward pass of %d pairs from %d requests failed; failing those requests",
                info.pairs,
                info.requests,
                exc_info=error,
            )
            with self._cond:
                failed = {id(request) for request, _ in batch.parts}
                self._pending = [r for r in self._pending if id(r) not in failed]
                self._queue_changed()
            for request, _ in batch.parts:
                _fail(request, error)
        else:
            self._scatter(batch, out, seconds)
        if self.after_batch is not None:
            try:
                self.after_batch()
            except Exception:
                log.exception("dynamic batcher after_batch hook failed")

    def _scatter(self, batch: _Batch, out: dict[str, np.ndarray], seconds: float) -> None:
        row = 0
        for request, chosen in batch.parts:
            rows = slice(row, row + len(chosen))
            row += len(chosen)
            n = len(request.encoded)
            for name, value in out.items():
                value = np.asarray(value)
                if name not in request.outputs:
                    request.outputs[name] = np.zeros((n, *value.shape[1:]), dtype=value.dtype)
                request.outputs[name][chosen] = value[rows]
            request.scored += len(chosen)
            request.forward_seconds += seconds
            request.batches += 1
            if request.scored == n:
                with suppress(InvalidStateError):  # cancelled, or failed by close() meanwhile
                    request.future.set_result(
                        BatchedOutput(request.outputs, request.forward_seconds, request.batches)
                    )

    def _queue_changed(self) -> None:
        # Called with the lock held.
        if self.metrics is not None:
            self.metrics.batch_queue.set(sum(len(r.remaining) for r in self._pending))


def _merge(parts: list[tuple[_Request, list[int]]]) -> EncodedPairs:
    """One ``EncodedPairs`` holding the chosen pairs of every request, in batch row order."""

    def gather(column: str) -> list[Any] | None:
        if getattr(parts[0][0].encoded, column) is None:
            return None
        return [getattr(r.encoded, column)[i] for r, chosen in parts for i in chosen]

    return EncodedPairs(
        pair_ids=gather("pair_ids") or [],
        pair_type_ids=gather("pair_type_ids"),
        query_ids=gather("query_ids"),
        product_ids=gather("product_ids"),
        truncated=[r.encoded.truncated[i] for r, chosen in parts for i in chosen],
        lexical=gather("lexical"),
    )


def _fail(request: _Request, error: BaseException) -> None:
    with suppress(InvalidStateError):  # already resolved or cancelled
        request.future.set_exception(error)
