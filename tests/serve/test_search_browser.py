"""The search page at / in a real browser (Debian's Chromium under Playwright) against a live
server with a tiny model and index; every request off the server's origin is aborted."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

pytest.importorskip("playwright", reason="the dev extra is not installed")

from playwright.sync_api import expect

from esci_reranker.serve import create_app, load_settings

QUERY = "quokkaphone wireless earbuds"
TIMEOUT_MS = 60_000  # a busy 2-core CI machine


def _api(url: str, rerank: bool) -> list[dict]:
    body = {"query": QUERY, "top_k": 10, "candidates": 100, "rerank": rerank}
    return httpx.post(f"{url}/search", json=body, timeout=60).json()["results"]


@pytest.mark.slow
def test_search_page_types_a_query_and_shows_labelled_results(
    live_server, open_page, tiny_reranker, tiny_index: Path, tmp_path: Path
):
    url = live_server(create_app(load_settings(index_path=str(tiny_index)), tiny_reranker))
    guarded = open_page(url)
    page = guarded.page
    page.goto(f"{url}/")

    # Keyboard only: "/" focuses the search box, Enter submits.
    page.locator("h1").click()
    page.keyboard.press("/")
    expect(page.locator("#q")).to_be_focused()
    page.keyboard.type(QUERY)
    page.keyboard.press("Enter")

    hits = page.locator("#results li.hit")
    expect(hits).to_have_count(10, timeout=TIMEOUT_MS)
    expected = _api(url, rerank=True)
    assert hits.evaluate_all("els => els.map(e => e.dataset.productId)") == [
        r["product_id"] for r in expected
    ]
    # One E/S/C/I badge per result, the class the API gives; a substitute badge where it flags one.
    classes = page.locator("#results .badge.esci").evaluate_all("els => els.map(e => e.dataset.esci)")
    assert classes == [r["esci_class"] for r in expected]
    assert set(classes) <= {"E", "S", "C", "I"}
    expect(page.locator("#results .badge.substitute")).to_have_count(
        sum(r["is_substitute"] for r in expected)
    )
    assert page.locator("#results li.hit .title").first.inner_text() == (
        expected[0]["title"] or expected[0]["product_id"]
    )
    expect(page.locator("#status")).to_contain_text("reranked")
    expect(page.locator("#status")).to_contain_text(" ms (server ")
    page.screenshot(path=tmp_path / "search.png", full_page=True)

    # The rerank switch, by keyboard: the retrieval order comes back, without labels.
    page.locator("#rerank").focus()
    page.keyboard.press("Space")
    expect(page.locator("#status")).to_contain_text("retrieval order", timeout=TIMEOUT_MS)
    expect(page.locator("#results .badge.esci")).to_have_count(0)
    plain = _api(url, rerank=False)
    assert hits.evaluate_all("els => els.map(e => e.dataset.productId)") == [r["product_id"] for r in plain]

    # Phone width: nothing runs off the side.
    page.set_viewport_size({"width": 375, "height": 740})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=tmp_path / "search-phone.png", full_page=True)

    assert guarded.blocked == []
    assert guarded.failed == []


@pytest.mark.slow
def test_search_page_says_when_search_is_off(live_server, open_page, tiny_reranker):
    url = live_server(create_app(load_settings(), tiny_reranker))
    guarded = open_page(url)
    page = guarded.page
    page.goto(f"{url}/")
    expect(page.locator("#status")).to_contain_text("Search is off")
    page.locator("#q").fill("earbuds")
    page.locator("#go").click()
    expect(page.locator("#status")).to_contain_text("no catalogue index is configured", timeout=TIMEOUT_MS)
    expect(page.locator("#status")).to_have_class("error")
    assert guarded.blocked == []
