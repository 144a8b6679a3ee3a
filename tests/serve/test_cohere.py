"""Cohere compatibility: ``/v1/rerank`` and ``/v2/rerank`` driven by the official ``cohere`` package
against a live server (uvicorn on a loopback port), plus the v2 route's shape and errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from esci_reranker.reranker import Reranker
from esci_reranker.serve import create_app, load_settings

cohere = pytest.importorskip("cohere", reason="the dev extra (cohere) is not installed")

QUERY = "red running shoes"
DOCS = [
    "red running shoes | Nike | red",
    "blue cotton hat | Acme",
    "running shoe laces, red | Generic",
    "coffee mug 300 ml",
    "trail running shoes | Salomon | black",
]
KEY = "k3y"


def _expected(reranker: Reranker, query: str, docs: list[str]) -> tuple[list[int], np.ndarray]:
    """Our Reranker's order (ties keep request order) and scores for plain-text documents."""
    scores = reranker.predict_texts([query] * len(docs), docs).scores
    return [int(i) for i in np.argsort(-scores, kind="stable")], scores


@pytest.fixture
def cohere_url(live_server: Callable[[Any], str], tiny_reranker: Reranker) -> str:
    """A live server with an API key, a rate limit and the cache off (every call runs the model)."""
    settings = load_settings(api_key=KEY, rate_limit="1000/minute", cache_size=0)
    return live_server(create_app(settings, tiny_reranker))


def _v2(url: str, key: str = KEY) -> Any:
    return cohere.ClientV2(api_key=key, base_url=url, timeout=60, max_retries=0)


def _v1(url: str, key: str = KEY) -> Any:
    return cohere.Client(api_key=key, base_url=url, timeout=60, max_retries=0)


@pytest.mark.slow
def test_official_clients_get_our_reranker_order_and_scores(cohere_url, tiny_reranker):
    import httpx

    order, scores = _expected(tiny_reranker, QUERY, DOCS)
    assert len(set(np.round(scores, 4))) == len(DOCS)  # a real order to check, not ties

    v2 = _v2(cohere_url).rerank(model="esci-reranker", query=QUERY, documents=DOCS, top_n=3)
    assert [r.index for r in v2.results] == order[:3]
    for result in v2.results:
        assert result.relevance_score == pytest.approx(float(scores[result.index]), abs=1e-5)
    assert v2.id
    assert v2.meta.api_version.version == "2"
    assert v2.meta.billed_units.search_units == 1

    full = _v2(cohere_url).rerank(model="any-name", query=QUERY, documents=DOCS)
    assert [r.index for r in full.results] == order

    v1 = _v1(cohere_url).rerank(query=QUERY, documents=DOCS, top_n=2, return_documents=True)
    assert [r.index for r in v1.results] == order[:2]
    for result in v1.results:
        assert result.relevance_score == pytest.approx(float(scores[result.index]), abs=1e-5)
        assert result.document.text == DOCS[result.index]

    # Both go through the same metrics as the other routes.
    text = httpx.get(f"{cohere_url}/metrics").text
    assert 'esci_http_requests_total{endpoint="/v2/rerank",method="POST",status="200"} 2.0' in text
    assert 'esci_http_requests_total{endpoint="/v1/rerank",method="POST",status="200"} 1.0' in text


@pytest.mark.slow
def test_official_v2_client_max_tokens_per_doc_cuts_documents(cohere_url, tiny_reranker):
    long_doc = "red running shoes with a breathable mesh upper and a cushioned sole " * 8
    docs = [long_doc, "blue cotton hat"]
    tokenizer = tiny_reranker.pair_encoder.tokenizer
    offsets = tokenizer(long_doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) > 5
    cut = long_doc[: offsets[4][1]]  # the document up to the end of its fifth token

    order, scores = _expected(tiny_reranker, QUERY, [cut, docs[1]])
    uncut = tiny_reranker.predict_texts([QUERY], [long_doc]).scores[0]
    assert abs(uncut - scores[0]) > 1e-4  # the cut changes the score, so the check below means something
    answer = _v2(cohere_url).rerank(model="m", query=QUERY, documents=docs, max_tokens_per_doc=5)
    assert [r.index for r in answer.results] == order
    for result in answer.results:
        assert result.relevance_score == pytest.approx(float(scores[result.index]), abs=1e-5)


@pytest.mark.slow
def test_official_clients_raise_on_auth_validation_and_rate_limit(live_server, cohere_url, tiny_reranker):
    with pytest.raises(cohere.errors.UnauthorizedError) as unauthorized:
        _v2(cohere_url, key="wrong").rerank(model="m", query=QUERY, documents=DOCS)
    assert unauthorized.value.body["error"] == "unauthorized"
    with pytest.raises(cohere.errors.UnauthorizedError):
        _v1(cohere_url, key="wrong").rerank(query=QUERY, documents=DOCS)

    with pytest.raises(cohere.errors.UnprocessableEntityError) as invalid:
        _v2(cohere_url).rerank(model="m", query=QUERY, documents=DOCS, top_n=0)
    assert "top_n" in invalid.value.body["message"]

    limited = live_server(create_app(load_settings(api_key=KEY, rate_limit="2/minute"), tiny_reranker))
    client = _v2(limited)
    client.rerank(model="m", query=QUERY, documents=DOCS[:2])
    _v1(limited).rerank(query=QUERY, documents=DOCS[:2])  # one counter over every limited route
    with pytest.raises(cohere.errors.TooManyRequestsError) as too_many:
        client.rerank(model="m", query=QUERY, documents=DOCS[:2])
    assert too_many.value.body["error"] == "rate_limited"


# --- the route itself (in-process) ----------------------------------------------------------------


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    data = response.json()
    assert set(data) >= {"error", "message", "request_id"}
    return data


def test_v2_shape_matches_v1_and_shares_the_cache(client, tiny_reranker):
    order, scores = _expected(tiny_reranker, QUERY, DOCS)
    v1 = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}).json()
    response = client.post("/v2/rerank", json={"model": "m", "query": QUERY, "documents": DOCS, "top_n": 4})
    assert response.status_code == 200
    data = response.json()
    assert set(data) == {"id", "results", "meta", "request_id", "model", "stats"}
    assert data["id"] == data["request_id"] == response.headers["X-Request-ID"]
    assert data["meta"] == {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}
    assert data["model"] == tiny_reranker.name
    assert [r["index"] for r in data["results"]] == order[:4]
    # Cohere's keys, plus this service's label and substitute flag of each document.
    assert all(set(r) == {"index", "relevance_score", "esci_class", "is_substitute"} for r in data["results"])
    assert [(r["esci_class"], r["is_substitute"]) for r in data["results"]] == [
        (r["esci_class"], r["is_substitute"]) for r in v1["results"][:4]
    ]
    assert [r["relevance_score"] for r in data["results"]] == [
        r["relevance_score"] for r in v1["results"][:4]
    ]
    assert data["stats"]["cache_hit"] is True  # the same query and texts as the /v1 call
    assert data["stats"]["num_candidates"] == 5
    assert data["stats"]["num_results"] == 4
    assert data["results"][0]["relevance_score"] == pytest.approx(float(scores[order[0]]), abs=1e-5)


def test_v2_accepts_cohere_only_keys_and_empty_documents(client):
    accepted = client.post(
        "/v2/rerank",
        json={
            "model": "rerank-v3.5",
            "query": QUERY,
            "documents": DOCS[:2],
            "top_n": 10,  # more than there are documents: all of them
            "max_tokens_per_doc": 4096,
            "priority": 3,
            "relevant_spans": {"mode": "disabled"},
        },
    )
    assert accepted.status_code == 200
    assert len(accepted.json()["results"]) == 2
    empty = client.post("/v2/rerank", json={"model": "m", "query": QUERY, "documents": []})
    assert empty.status_code == 200
    assert empty.json()["results"] == []


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        ({"query": QUERY, "documents": ["a"]}, "model: Field required"),
        ({"model": "m", "documents": ["a"]}, "query: Field required"),
        ({"model": "m", "query": QUERY}, "documents: Field required"),
        ({"model": "m", "query": " ", "documents": ["a"]}, "query: "),
        ({"model": "m", "query": QUERY, "documents": ["a", {"text": "b"}]}, "documents[1]: "),
        ({"model": "m", "query": QUERY, "documents": ["a"], "top_n": 0}, "top_n: "),
        ({"model": "m", "query": QUERY, "documents": ["a"], "top_n": "2"}, "top_n: "),
        ({"model": "m", "query": QUERY, "documents": ["a"], "max_tokens_per_doc": 0}, "max_tokens_per_doc: "),
        ({"model": "m", "query": QUERY, "documents": ["a"], "top_k": 2}, "top_k: Extra inputs"),
        ({"model": "m", "query": QUERY, "documents": ["a"], "return_documents": True}, "return_documents: "),
    ],
)
def test_v2_validation_errors_name_the_field(client, payload, named):
    message = _error(client.post("/v2/rerank", json=payload), 422)["message"]
    assert named in message


def test_v2_limits_auth_and_metrics(make_client):
    limited = make_client(max_candidates=2, max_text_chars=20)
    too_many = limited.post("/v2/rerank", json={"model": "m", "query": "q", "documents": ["a", "b", "c"]})
    assert "MAX_CANDIDATES=2" in _error(too_many, 413)["message"]
    too_long = limited.post("/v2/rerank", json={"model": "m", "query": "q", "documents": ["a", "b" * 30]})
    assert "documents[1]" in _error(too_long, 422)["message"]

    keyed = make_client(api_key="secret")
    request = {"model": "m", "query": "q", "documents": ["a"]}
    assert _error(keyed.post("/v2/rerank", json=request), 401)["error"] == "unauthorized"
    ok = keyed.post("/v2/rerank", json=request, headers={"Authorization": "Bearer secret"})
    assert ok.status_code == 200
    text = keyed.get("/metrics").text
    assert 'esci_http_requests_total{endpoint="/v2/rerank",method="POST",status="401"} 1.0' in text
    assert 'esci_http_requests_total{endpoint="/v2/rerank",method="POST",status="200"} 1.0' in text
    assert "/v2/rerank" in keyed.get("/openapi.json").json()["paths"]


def test_truncate_tokens_cuts_whole_tokens_only_when_longer(tiny_reranker):
    from esci_reranker.serve.scoring import Scorer

    scorer = Scorer(tiny_reranker)
    text = "red running shoes with a mesh upper"
    tokenizer = tiny_reranker.pair_encoder.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = scorer.truncate_tokens([text, "red", ""], 3)
    assert tokenizer(cut[0], add_special_tokens=False)["input_ids"] == ids[:3]
    assert text.startswith(cut[0])
    assert cut[1:] == ["red", ""]
    assert scorer.truncate_tokens([text], len(ids)) == [text]
