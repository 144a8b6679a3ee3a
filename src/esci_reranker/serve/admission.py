"""Load shedding: a bound on the model work the service has accepted (``MAX_QUEUED_REQUESTS``).

Every request to a route that runs the model (the scoring routes, the compatible ``/v1`` and
``/v2`` rerank routes and ``/search``) holds one slot from the moment its headers arrive until
its answer is sent, whatever the model (cross-encoder, stacked, student) and whether the
dynamic batcher or the direct path runs it. When every slot is taken, a new request is answered
at once with ``429`` and ``Retry-After``, before its body is read or parsed, instead of joining a
queue whose wait grows with every client: the requests already admitted keep the latency of a
bounded queue, and a client (or a load balancer) learns at once to retry or go elsewhere, as
text-embeddings-inference does with its concurrency limit.

Slots are taken and given back on the event loop only (the ASGI middleware), so the counter needs
no lock. With ``--workers N`` each worker has its own bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from esci_reranker.serve.errors import error_response
from esci_reranker.serve.metrics import Metrics

#: Weight of the newest admitted request's time in the running mean that ``Retry-After`` is
#: derived from: recent enough to follow a change of load, smooth enough not to jump per request.
LATENCY_SMOOTHING: Final[float] = 0.1
#: ``Retry-After`` bounds (seconds; HTTP wants a whole number).
MIN_RETRY_AFTER: Final[int] = 1
MAX_RETRY_AFTER: Final[int] = 60


class QueueBound:
    """Counts the requests admitted to model work and refuses more than ``limit`` at once.

    Args:
        limit: requests admitted at once (waiting for or running in a forward pass); 0 = no bound.
        metrics: where the admitted gauge, the limit and the shed counter go (None: nowhere).
    """

    def __init__(self, limit: int, metrics: Metrics | None = None) -> None:
        if limit < 0:
            raise ValueError(f"QueueBound limit={limit}; expected >= 0 (0 = no bound).")
        self.limit = limit
        self.metrics = metrics
        self.admitted = 0
        self.shed = 0
        #: Running mean of an admitted request's time in the service (seconds); None until one finished.
        self.mean_seconds: float | None = None
        if metrics is not None:
            metrics.queue_limit.set(limit)

    def try_enter(self) -> bool:
        """Take a slot; False (and nothing taken) when all ``limit`` are in use."""
        if self.limit and self.admitted >= self.limit:
            self.shed += 1
            return False
        self.admitted += 1
        if self.metrics is not None:
            self.metrics.queue_admitted.set(self.admitted)
        return True

    def leave(self, seconds: float) -> None:
        """Give back a slot taken by ``try_enter``; ``seconds`` is how long the request held it."""
        self.admitted -= 1
        if self.metrics is not None:
            self.metrics.queue_admitted.set(self.admitted)
        previous = self.mean_seconds
        self.mean_seconds = (
            seconds if previous is None else previous + LATENCY_SMOOTHING * (seconds - previous)
        )

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about the time the admitted requests take to be
        answered (by then every slot has turned over at least once), within 1-60 s."""
        estimate = self.mean_seconds if self.mean_seconds is not None else 0.0
        return max(MIN_RETRY_AFTER, min(MAX_RETRY_AFTER, math.ceil(estimate)))


class AdmissionMiddleware:
    """ASGI middleware that holds a ``QueueBound`` slot for each request to ``paths`` (any method
    but GET/HEAD/OPTIONS) and answers ``429`` with ``Retry-After`` when none is free."""

    def __init__(self, app: ASGIApp, bound: QueueBound, paths: Collection[str]) -> None:
        self.app = app
        self.bound = bound
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] not in self.paths
            or scope["method"] in ("GET", "HEAD", "OPTIONS")
        ):
            await self.app(scope, receive, send)
            return
        bound = self.bound
        if not bound.try_enter():
            retry = bound.retry_after()
            if bound.metrics is not None:
                bound.metrics.queue_shed.labels(endpoint=scope["path"]).inc()
            response = error_response(
                scope,
                429,
                f"the service is at its bound of MAX_QUEUED_REQUESTS={bound.limit} requests in progress; "
                f"retry after {retry} s (or on another instance)",
                code="overloaded",
                headers={"Retry-After": str(retry)},
            )
            await response(scope, receive, send)
            return
        begin = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            bound.leave(time.perf_counter() - begin)
