"""Real-browser test helpers: a live uvicorn server in a thread, and Chromium pages whose requests
are fenced to that server (see the ``live_server``, ``chromium`` and ``open_page`` fixtures in
tests/serve/conftest.py).

The browser is Debian's Chromium (``apt-get install chromium``; .ci/run installs it) driven by
Playwright's Python API: ``playwright install`` downloads its own browser builds, which this
project never needs. Without it the browser tests are skipped, or fail under ``CI=true``.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import uvicorn

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page, Request, Response, Route, WebSocketRoute
    from starlette.types import ASGIApp

#: The Chromium binary; ``CHROMIUM`` overrides it (e.g. a developer's macOS or another distro).
CHROMIUM_PATH = os.environ.get("CHROMIUM", "/usr/bin/chromium")
#: Headless, sandbox-less (CI runs as root) and with none of Chromium's own background traffic
#: (updates, sync, field trials, QUIC probing), so the only requests are the pages'.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
)
SERVER_START_TIMEOUT = 60.0
#: Default timeout of every navigation, action and wait in an ``open_page`` context.
BROWSER_TIMEOUT_MS = 120_000


class LiveServer:
    """Serves an ASGI app with uvicorn on a free loopback port, in a background thread.

    The listening socket is bound here (port 0), so there is no window in which another process
    can take the port between choosing and binding it. Use as a context manager; ``url`` is the
    base URL (``http://127.0.0.1:PORT``).
    """

    def __init__(self, app: ASGIApp) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        # log_config=None: leave the process's logging (and pytest's caplog) as it is.
        config = uvicorn.Config(app, lifespan="on", log_config=None, access_log=False, ws="none")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="live-uvicorn", daemon=True
        )

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"uvicorn exited before it started serving on {self.url}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"uvicorn did not start serving on {self.url} within {SERVER_START_TIMEOUT} s"
                )
            time.sleep(0.05)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()


def origin(url: str) -> str:
    """``scheme://host:port`` of ``url`` (the port made explicit), for comparing request targets."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(parts.scheme, 0)
    return f"{parts.scheme.replace('ws', 'http', 1)}://{parts.hostname}:{port}"


class GuardedPage:
    """A Playwright page in ``context``, whose requests may reach ``server`` only.

    Every request (page loads, scripts, styles, images, fonts, fetch/XHR, WebSocket) to any other
    origin — another host, or another port on this one — is recorded in ``blocked`` and aborted
    before it is sent; a test asserts ``blocked == []``. Routing does not see the later hops of a
    redirect, so those are caught by the context's ``request`` event instead: recorded, though no
    longer stoppable. ``aborted`` lists the requests the route stopped, ``requests`` the URLs that
    went to the server, ``failed`` the answers with a status >= 400 as ``(status, url)``.
    """

    def __init__(self, context: BrowserContext, server: str) -> None:
        self.server = server
        self.blocked: list[str] = []
        self.aborted: list[str] = []
        self.requests: list[str] = []
        self.failed: list[tuple[int, str]] = []
        # Routes before the page exists, so not even its first request escapes them.
        context.on("request", self._on_request)
        context.route(re.compile(r".*"), self._on_route)
        context.route_web_socket(re.compile(r".*"), self._on_web_socket)
        self.page: Page = context.new_page()
        self.page.on("response", self._on_response)

    def _on_request(self, request: Request) -> None:
        # Every request, redirect hops included; the route below stops the off-origin ones.
        if origin(request.url) == origin(self.server):
            self.requests.append(request.url)
        else:
            self.blocked.append(request.url)

    def _on_route(self, route: Route, request: Request) -> None:
        if origin(request.url) == origin(self.server):
            route.continue_()
        else:
            self.aborted.append(request.url)
            route.abort("blockedbyclient")

    def _on_web_socket(self, ws: WebSocketRoute) -> None:
        if origin(ws.url) == origin(self.server):
            self.requests.append(ws.url)
            ws.connect_to_server()
        else:
            self.blocked.append(ws.url)
            ws.close()

    def _on_response(self, response: Response) -> None:
        if response.status >= 400:
            self.failed.append((response.status, response.url))
