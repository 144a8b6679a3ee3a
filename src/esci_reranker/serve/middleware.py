"""The outermost ASGI middleware: request id, body-size guard, metrics, access log, catch-all 500.

Pure ASGI (not ``BaseHTTPMiddleware``) so it adds no task or body copy per request.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Collection
from typing import Final

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from esci_reranker.serve.errors import error_response
from esci_reranker.serve.logs import ACCESS_LOGGER
from esci_reranker.serve.metrics import UNMATCHED, Metrics

REQUEST_ID_HEADER: Final[str] = "X-Request-ID"
#: A client's X-Request-ID is echoed only when it is this tame; anything else gets a fresh id.
_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
#: Probe and scrape routes log at DEBUG so health checks do not flood the INFO log.
QUIET_PATHS: Final[frozenset[str]] = frozenset({"/health", "/ready", "/metrics"})

access_log = logging.getLogger(ACCESS_LOGGER)
error_log = logging.getLogger("esci_reranker.serve")


def new_request_id(given: str | None) -> str:
    """``given`` when it is a sane id (letters, digits, ``._:-``, at most 128), else a random hex id."""
    if given and _REQUEST_ID.match(given):
        return given
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Gives each HTTP request an id and a start time (in ``scope["state"]``), and on the way out
    counts it in the metrics, writes one access-log line and turns any unhandled exception into
    a JSON 500 that carries the request id.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        known_paths: Collection[str] = (),
        mounts: Collection[str] = (),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        # Requests answered before routing (413, 429) are labelled by path only if it is a route.
        self.known_paths = frozenset(known_paths)
        # Requests under a mount (``/static``) are labelled by the mount, one label for all its files.
        self.mount_prefixes = tuple(f"{mount.rstrip('/')}/" for mount in mounts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        request_id = new_request_id(headers.get(REQUEST_ID_HEADER))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started"] = started
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        self.metrics.in_flight.inc()
        try:
            too_large = self._body_too_large(headers)
            if too_large is not None:
                await error_response(scope, 413, too_large)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            error_log.exception(
                "unhandled error", extra={"request_id": request_id, "path": scope.get("path", "")}
            )
            if not response_started:
                response = error_response(
                    scope, 500, f"internal error; quote request id {request_id} when reporting it"
                )
                await response(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            path = scope.get("path", "")
            endpoint = getattr(scope.get("route"), "path", None)
            if endpoint is None and path.startswith(self.mount_prefixes):
                endpoint = next(prefix[:-1] for prefix in self.mount_prefixes if path.startswith(prefix))
            if endpoint is None:
                endpoint = path if path in self.known_paths else UNMATCHED
            method = scope.get("method", "")
            self.metrics.observe_request(endpoint, method, status, elapsed)
            client = scope.get("client")
            access_log.log(
                logging.DEBUG if path in QUIET_PATHS and status < 400 else logging.INFO,
                "%s %s %d %.1fms",
                method,
                path,
                status,
                elapsed * 1000.0,
                extra={
                    "method": method,
                    "path": path,
                    "status": status,
                    "request_id": request_id,
                    "latency_ms": round(elapsed * 1000.0, 2),
                    "num_candidates": state.get("num_candidates"),
                    "client": client[0] if client else None,
                },
            )

    def _body_too_large(self, headers: Headers) -> str | None:
        length = headers.get("content-length")
        if length is None:
            return None
        try:
            size = int(length)
        except ValueError:
            return None  # the server rejects a malformed Content-Length before we see it
        if size > self.max_body_bytes:
            return (
                f"request body is {size} bytes; the limit is MAX_BODY_BYTES={self.max_body_bytes}. "
                "Send fewer or shorter candidates per request."
            )
        return None
