"""POST /search, the index in /ready and /info, and the search page's HTML (tiny model and index)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

QUERY = {"query": "quokkaphone wireless earbuds", "top_k": 5}


def _ready(client, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/ready")
        if response.json()["index_status"] != "loading" or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


@pytest.fixture
def search_client(make_client, tiny_index: Path):
    client = make_client(index_path=str(tiny_index))
    assert _ready(client).status_code == 200
    return client


def test_without_index_search_is_503_and_the_rest_works(client):
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["index_status"] == "not_configured"
    assert client.get("/info").json()["index"] is None
    response = client.post("/search", json=QUERY)
    assert response.status_code == 503
    assert "no catalogue index is configured" in response.json()["message"]
    assert "INDEX_PATH" in response.json()["message"]


def test_search_retrieves_reranks_and_labels(search_client, tiny_index: Path):
    ready = search_client.get("/ready").json()
    assert ready["ready"] is True
    assert ready["index_status"] == "ready"
    info = search_client.get("/info").json()["index"]
    assert info["status"] == "ready"
    assert info["products"] == 82
    assert info["path"] == str(tiny_index)

    response = search_client.post("/search", json=QUERY)
    assert response.status_code == 200, response.text
    data = response.json()
    results = data["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5]
    assert all(r["esci_class"] in {"E", "S", "C", "I"} for r in results)
    assert all(r["is_substitute"] == (r["substitute_prob"] >= 0.5) for r in results)
    for r in results:  # the four probabilities the (unstacked) class is the most likely of
        probs = r["probabilities"]
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
        assert r["esci_class"] == max(probs, key=probs.get)
    assert all(r["sources"] and set(r["sources"]) <= {"bm25", "dense"} for r in results)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)  # ordered by the reranker's score
    stats = data["stats"]
    assert stats["reranked"] is True
    assert stats["num_candidates"] == 82  # the dense list alone holds every product
    assert stats["num_results"] == 5
    assert stats["index_products"] == 82

    # Without reranking: the retrieval order, no labels; BM25 alone puts the one matching product first.
    plain = search_client.post("/search", json=QUERY | {"rerank": False, "mode": "bm25"}).json()
    assert plain["results"][0]["product_id"] == "ZZ-1"
    assert plain["results"][0]["sources"] == ["bm25"]
    assert plain["results"][0]["bm25_rank"] == 1
    assert all(r["esci_class"] is None and r["is_substitute"] is None for r in plain["results"])
    assert plain["stats"]["reranked"] is False


def test_search_uses_the_shared_cache_and_metrics(search_client):
    first = search_client.post("/search", json=QUERY).json()
    second = search_client.post("/search", json=QUERY).json()
    assert first["stats"]["cache_hit"] is False
    assert second["stats"]["cache_hit"] is True
    assert [r["product_id"] for r in first["results"]] == [r["product_id"] for r in second["results"]]
    metrics = search_client.get("/metrics").text
    assert 'esci_retrieval_seconds_count{mode="hybrid"} 2.0' in metrics
    assert 'esci_http_requests_total{endpoint="/search",method="POST",status="200"} 2.0' in metrics


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"query": ""}, "query: String should have at least 1 character"),
        ({"query": "   "}, "query: must contain non-whitespace characters"),
        ({"query": "earbuds", "top_k": 0}, "top_k: Input should be greater than or equal to 1"),
        ({"query": "earbuds", "top_k": 20, "candidates": 10}, "top_k=20; expected at most candidates (10)"),
        ({"query": "earbuds", "top_k": 101}, "SEARCH_MAX_TOP_K=100"),
        ({"query": "earbuds", "candidates": 5000}, "MAX_CANDIDATES=1000"),
        ({"query": "earbuds", "mode": "sparse"}, "mode: Input should be 'hybrid', 'bm25' or 'dense'"),
        ({"query": "earbuds", "k": 3}, "k: Extra inputs are not permitted"),
    ],
)
def test_search_rejects_bad_requests_with_422(search_client, body, message):
    response = search_client.post("/search", json=body)
    assert response.status_code == 422
    assert message in response.json()["message"]


def test_search_needs_the_api_key_but_the_page_does_not(make_client, tiny_index: Path):
    client = make_client(index_path=str(tiny_index), api_key="s3cret")
    _ready(client)
    assert client.post("/search", json=QUERY).status_code == 401
    assert client.post("/search", json=QUERY, headers={"X-API-Key": "s3cret"}).status_code == 200
    page = client.get("/")
    assert page.status_code == 200
    assert "API key" in page.text


def test_a_bad_index_fails_readiness_and_search(make_client, tmp_path: Path):
    client = make_client(index_path=str(tmp_path))
    ready = _ready(client)
    assert ready.status_code == 503
    assert ready.json()["index_status"] == "failed"
    assert "no catalogue index here" in ready.json()["index_error"]
    response = client.post("/search", json=QUERY)
    assert response.status_code == 503
    assert "failed to load" in response.json()["message"]
    assert client.post("/rerank", json={"query": "q", "candidates": []}).status_code == 200


def test_a_mismatched_retriever_is_refused_at_start_up(
    make_client, tiny_index: Path, other_tiny_retriever: Path
):
    client = make_client(index_path=str(tiny_index), retriever_path=str(other_tiny_retriever))
    ready = _ready(client).json()
    assert ready["index_status"] == "failed"
    assert "IndexMismatchError" in ready["index_error"]
    assert "embeds text differently" in ready["index_error"]


def test_page_is_served_with_its_own_assets(search_client):
    page = search_client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    for asset in ("/static/search.css", "/static/search.js", "/static/favicon.svg"):
        assert f'"{asset}"' in html
        assert search_client.get(asset).status_code == 200
    assert 'data-endpoint="/search"' in html
    assert 'role="switch"' in html
    assert "http://" not in html
    assert "https://" not in html
