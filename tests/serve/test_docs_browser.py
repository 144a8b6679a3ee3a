"""/docs and /redoc in a real browser (Chromium) against a live server, with every request that
would leave the server's origin aborted: the pages must render from the service's own files."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

pytest.importorskip("playwright", reason="the dev extra is not installed")

from playwright.sync_api import expect
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

RENDER_TIMEOUT_MS = 120_000  # a cold 1.5 MB bundle on a busy 2-core machine


def _operations(url: str) -> list[tuple[str, str]]:
    """(METHOD, path) of every operation in the served OpenAPI schema."""
    paths = httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    return [(method.upper(), path) for path, item in paths.items() for method in item]


def _leaky_app(other_origin: str) -> Starlette:
    """A page that reaches off its origin directly, through another port and through a redirect."""
    page = (
        '<img src="http://cdn.example.invalid/x.png">'
        f'<img src="{other_origin}/y.png">'
        '<img src="/hop">'
        '<img src="/ok.svg">'
    )
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"/>'
    return Starlette(
        routes=[
            Route("/", lambda _: HTMLResponse(page)),
            Route("/hop", lambda _: RedirectResponse(f"{other_origin}/z.png")),
            Route("/ok.svg", lambda _: Response(svg, media_type="image/svg+xml")),
        ]
    )


@pytest.mark.slow
def test_fence_records_every_request_off_the_server(live_server, open_page):
    # The other origin is a closed port on loopback: even the redirect hop, which routing cannot
    # stop, goes nowhere.
    other = "http://127.0.0.1:9"
    url = live_server(_leaky_app(other))
    guarded = open_page(url)
    guarded.page.goto(f"{url}/", wait_until="load")
    assert sorted(guarded.blocked) == sorted(
        ["http://cdn.example.invalid/x.png", f"{other}/y.png", f"{other}/z.png"]
    )
    # The direct ones were stopped before they were sent (not failed on DNS or a refused connection).
    assert sorted(guarded.aborted) == sorted(["http://cdn.example.invalid/x.png", f"{other}/y.png"])
    assert {f"{url}/", f"{url}/hop", f"{url}/ok.svg"} <= set(guarded.requests)


@pytest.mark.slow
def test_swagger_ui_renders_every_operation_offline(live_url, open_page, tmp_path: Path):
    guarded = open_page(live_url)
    page = guarded.page
    page.goto(f"{live_url}/docs")

    rerank = page.locator(".opblock-post").filter(has=page.locator('[data-path="/rerank"]'))
    expect(rerank).to_be_visible(timeout=RENDER_TIMEOUT_MS)
    expect(page.locator(".opblock")).to_have_count(len(_operations(live_url)))
    page.screenshot(path=tmp_path / "docs.png", full_page=True)

    # "Try it out" runs the example request against this same server.
    rerank.locator(".opblock-summary").click()
    rerank.get_by_role("button", name="Try it out").click()
    rerank.get_by_role("button", name="Execute").click()
    expect(rerank.locator(".live-responses-table tbody .response-col_status")).to_have_text(
        "200", timeout=RENDER_TIMEOUT_MS
    )
    rerank.screenshot(path=tmp_path / "docs-try-it-out.png")

    assert guarded.blocked == []
    assert guarded.failed == []
    for asset in ("swagger/swagger-ui-bundle.js", "swagger/swagger-ui.css"):
        assert f"{live_url}/static/{asset}" in guarded.requests
    assert f"{live_url}/rerank" in guarded.requests


@pytest.mark.slow
def test_redoc_renders_every_operation_offline(live_url, open_page, tmp_path: Path):
    guarded = open_page(live_url)
    page = guarded.page
    page.goto(f"{live_url}/redoc")

    operations = _operations(live_url)
    sections = page.locator('[data-section-id*="/operation/"]')
    expect(sections).to_have_count(len(operations), timeout=RENDER_TIMEOUT_MS)
    expect(page.get_by_text("/rerank", exact=True).first).to_be_attached()
    page.screenshot(path=tmp_path / "redoc.png")

    assert guarded.blocked == []
    assert guarded.failed == []
    assert f"{live_url}/static/redoc/redoc.standalone.js" in guarded.requests
