"""The search page at / in a real browser (Debian's Chromium under Playwright) against a live
server with a tiny model and index; every request off the server's origin is aborted."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest

pytest.importorskip("playwright", reason="the dev extra is not installed")

from playwright.sync_api import expect

from esci_reranker.serve import create_app, load_settings
from tests.serve.helpers import stacked_with_mixed_labels

QUERY = "quokkaphone wireless earbuds"
TIMEOUT_MS = 60_000  # a busy 2-core CI machine


def _api(url: str, rerank: bool, query: str = QUERY, top_k: int = 10) -> list[dict]:
    body = {"query": query, "top_k": top_k, "candidates": 100, "rerank": rerank}
    return httpx.post(f"{url}/search", json=body, timeout=60).json()["results"]


def _hover_text(hit: dict) -> str:
    """What a result's E/S/C/I badge says on hover, written out here from the API's numbers."""
    names = {"E": "Exact", "S": "Substitute", "C": "Complement", "I": "Irrelevant"}
    cls, probs = hit["esci_class"], hit["probabilities"]
    others = ", ".join(f"{c} {probs[c]:.2f}" for c in "ESCI" if c != cls)
    return f"{names[cls]}: P = {probs[cls]:.2f} ({others})"


def _params(page_url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(page_url).query)


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


@pytest.mark.slow
def test_a_search_url_runs_on_load_labels_explain_themselves_and_irrelevant_hides(
    live_server, open_page, tiny_stacked_checkpoint: Path, tiny_index: Path
):
    # A stacked model whose labels for this query are E and I both, so there is something to hide.
    reranker = stacked_with_mixed_labels(tiny_stacked_checkpoint, tiny_index, QUERY, 100, top=20)
    url = live_server(create_app(load_settings(index_path=str(tiny_index)), reranker))
    guarded = open_page(url)
    page = guarded.page
    page.goto(f"{url}/?q={quote(QUERY)}&k=20")

    # The URL's search runs on load, with the URL's options.
    hits = page.locator("#results li.hit")
    expect(hits).to_have_count(20, timeout=TIMEOUT_MS)
    expect(page.locator("#q")).to_have_value(QUERY)
    expect(page.locator("#top-k")).to_have_value("20")
    expected = _api(url, rerank=True, top_k=20)
    assert hits.evaluate_all("els => els.map(e => e.dataset.productId)") == [
        r["product_id"] for r in expected
    ]
    irrelevant = [r["product_id"] for r in expected if r["esci_class"] == "I"]
    assert 0 < len(irrelevant) < 20

    # Each badge's hover text gives its class probability and the other three.
    badge = page.locator("#results .badge.esci").first
    badge.hover()
    expect(badge).to_have_attribute("title", _hover_text(expected[0]))
    titles = page.locator("#results .badge.esci").evaluate_all("els => els.map(e => e.title)")
    assert titles == [_hover_text(r) for r in expected]
    # Keyboard users reach a badge with Tab and see the same text (and a screen reader reads it).
    badge.focus()
    shown = badge.evaluate("e => getComputedStyle(e, '::after').content")
    assert shown == f'"{_hover_text(expected[0])}"'
    expect(badge).to_contain_text(_hover_text(expected[0]))

    # One switch hides the irrelevant results, and the URL keeps it.
    toggle = page.get_by_role("switch", name="Hide irrelevant")
    toggle.focus()
    page.keyboard.press("Space")
    expect(toggle).to_be_checked()
    visible = page.locator("#results li.hit:visible")
    expect(visible).to_have_count(20 - len(irrelevant))
    assert set(visible.evaluate_all("els => els.map(e => e.dataset.productId)")).isdisjoint(irrelevant)
    expect(page.locator("#status")).to_contain_text(f"{len(irrelevant)} irrelevant hidden")
    assert _params(page.url) == {"q": [QUERY], "k": ["20"], "hide": ["I"]}

    # The URL, opened afresh (shared), shows the same page: hidden irrelevant results included.
    other = open_page(url).page
    other.goto(page.url)
    expect(other.locator("#results li.hit")).to_have_count(20, timeout=TIMEOUT_MS)
    expect(other.locator("#hide-i")).to_be_checked()
    expect(other.locator("#results li.hit:visible")).to_have_count(20 - len(irrelevant))

    # A new query becomes the URL (a new history entry); Back returns to the first search.
    page.locator("#q").fill("zebrawood cutting board")
    page.keyboard.press("Enter")
    expect(page.locator("#results li.hit").first).to_have_attribute(
        "data-product-id",
        _api(url, rerank=True, query="zebrawood cutting board", top_k=20)[0]["product_id"],
        timeout=TIMEOUT_MS,
    )
    assert _params(page.url)["q"] == ["zebrawood cutting board"]
    page.go_back()
    expect(page.locator("#q")).to_have_value(QUERY)
    expect(page.locator("#results li.hit").first).to_have_attribute(
        "data-product-id", expected[0]["product_id"], timeout=TIMEOUT_MS
    )

    assert guarded.blocked == []
    assert guarded.failed == []
