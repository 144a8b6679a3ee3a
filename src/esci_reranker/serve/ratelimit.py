"""Per-client-IP rate limit (``RATE_LIMIT``, e.g. ``100/minute``) with slowapi.

One counter per client address covers every limited route together. ``/health``, ``/ready``
and ``/metrics`` are exempt so probes and scrapers never see 429, and so are the static files
under ``/static/`` (a docs page loads several; serving them costs no model time).

slowapi's own ``SlowAPIMiddleware`` finds the route by scanning ``app.routes`` for an
``endpoint`` attribute; FastAPI >= 0.13x wraps included routers so that scan finds nothing and
silently exempts every route. This middleware therefore selects routes by path itself and only
uses slowapi's limiter and its ``async_check_limits`` (application-wide limits, keyed by
client address) to count and decide.

Counters live in process memory: with ``--workers N`` each worker counts on its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection

from fastapi import Request
from fastapi.responses import JSONResponse
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.middleware import async_check_limits
from slowapi.util import get_remote_address
from starlette.types import ASGIApp, Receive, Scope, Send

from esci_reranker.serve.errors import error_response
from esci_reranker.serve.web import STATIC_URL

#: Routes that never count against or fail the limit.
EXEMPT_PATHS: frozenset[str] = frozenset({"/health", "/ready", "/metrics"})
#: Path prefixes that never count against or fail the limit.
EXEMPT_PREFIXES: tuple[str, ...] = (f"{STATIC_URL}/",)


def build_limiter(rate: str) -> Limiter:
    """A slowapi limiter with one application-wide limit ``rate`` per client address."""
    return Limiter(
        key_func=get_remote_address,
        application_limits=[rate],
        headers_enabled=True,
        storage_uri="memory://",
        strategy="fixed-window",
    )


class RateLimitMiddleware:
    """ASGI middleware that answers 429 (with ``Retry-After``) once a client exceeds the limit."""

    def __init__(
        self,
        app: ASGIApp,
        limiter: Limiter,
        exempt_paths: Collection[str] = EXEMPT_PATHS,
        exempt_prefixes: tuple[str, ...] = EXEMPT_PREFIXES,
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.exempt_paths = frozenset(exempt_paths)
        self.exempt_prefixes = exempt_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in self.exempt_paths
            or scope["path"].startswith(self.exempt_prefixes)
        ):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        response, _ = await async_check_limits(self.limiter, request, None, scope["app"])
        if response is not None:
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def rate_limit_exceeded(request: Request, exc: Exception) -> JSONResponse:
    """The 429 response: which limit, and ``Retry-After`` seconds until the window resets."""
    limiter: Limiter = request.app.state.limiter
    detail = getattr(exc, "detail", "")
    retry_after = 1
    current = getattr(request.state, "view_rate_limit", None)
    if current is not None:
        item, args = current
        reset_at, _remaining = limiter.limiter.get_window_stats(item, *args)
        retry_after = max(1, math.ceil(reset_at - time.time()))
    elif isinstance(exc, RateLimitExceeded) and exc.limit is not None:
        retry_after = max(1, exc.limit.limit.get_expiry())
    return error_response(
        request.scope,
        429,
        f"rate limit exceeded ({detail}) for client {get_remote_address(request)}; retry after {retry_after} s",
        headers={"Retry-After": str(retry_after)},
    )
