"""Input limits and malformed requests: 413/422 with messages that say what is wrong, never 500."""

from __future__ import annotations

import json

import pytest

from tests.serve.helpers import body


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    data = response.json()
    assert set(data) >= {"error", "message", "request_id"}
    return data


def test_too_many_candidates_is_413(make_client):
    client = make_client(max_candidates=3)
    assert client.post("/rerank", json=body(3)).status_code == 200
    for path in ("/rerank", "/classify", "/substitute", "/predict"):
        data = _error(client.post(path, json=body(4)), 413)
        assert "4 candidates" in data["message"]
        assert "MAX_CANDIDATES=3" in data["message"]
    docs = {"query": "q", "documents": ["a"] * 4}
    assert "MAX_CANDIDATES=3" in _error(client.post("/v1/rerank", json=docs), 413)["message"]


def test_text_over_the_limit_is_422_naming_the_candidate(make_client):
    client = make_client(max_text_chars=50)
    request = body(3)
    request["candidates"][2] = {"product_id": "long-one", "title": "x" * 51}
    data = _error(client.post("/rerank", json=request), 422)
    assert "candidates[2]" in data["message"]
    assert "'long-one'" in data["message"]
    assert "title" in data["message"]
    assert "MAX_TEXT_CHARS=50" in data["message"]

    data = _error(client.post("/classify", json=body(1, query="q" * 51)), 422)
    assert data["message"].startswith("query is 51 characters")

    docs = {"query": "q", "documents": ["ok", {"text": "y" * 60}]}
    assert "documents[1]" in _error(client.post("/v1/rerank", json=docs), 422)["message"]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"query": "", "candidates": []}, "query"),
        ({"query": "   ", "candidates": []}, "query: must contain non-whitespace"),
        ({"candidates": []}, "query: Field required"),
        ({"query": "q"}, "candidates: Field required"),
        ({"query": 3, "candidates": []}, "query: Input should be a valid string"),
        ({"query": "q", "candidates": {"product_id": "a"}}, "candidates: Input should be a valid list"),
        ({"query": "q", "candidates": [{"text": "t"}]}, "candidates[0].product_id: Field required"),
        ({"query": "q", "candidates": [{"product_id": 7, "text": "t"}]}, "candidates[0].product_id"),
        ({"query": "q", "candidates": [{"product_id": "a"}]}, "has no text"),
        (
            {"query": "q", "candidates": [{"product_id": "a", "text": "t", "title": "x"}]},
            "both 'text' and product fields",
        ),
        ({"query": "q", "candidates": [{"product_id": "a", "titel": "x"}]}, "titel"),
        ({"query": "q", "candidates": [], "top_k": 0}, "top_k"),
        ({"query": "q", "candidates": [], "top_k": "3x"}, "top_k"),
        ({"query": "q", "candidates": [], "extra": 1}, "extra"),
        (
            {
                "query": "q",
                "candidates": [{"product_id": "a", "text": "x"}, {"product_id": "a", "text": "y"}],
            },
            "duplicate product_id 'a' at candidates 0 and 1",
        ),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_malformed_requests_are_422_with_a_readable_message(client, payload, fragment):
    data = _error(client.post("/rerank", json=payload), 422)
    assert data["error"] == "validation_error"
    assert fragment in data["message"]
    assert data["details"]


def test_blank_product_text_is_422(client):
    data = _error(
        client.post("/rerank", json={"query": "q", "candidates": [{"product_id": "a", "text": "  "}]}), 422
    )
    assert "candidates[0]" in data["message"]
    assert "no product text" in data["message"]
    # The tiny model reads title, brand, color: a description alone gives it no text.
    only_description = {"query": "q", "candidates": [{"product_id": "a", "description": "long text"}]}
    assert "title, brand, color" in _error(client.post("/rerank", json=only_description), 422)["message"]


@pytest.mark.parametrize(
    ("content", "headers", "fragment"),
    [
        (b"not json", {"content-type": "application/json"}, "not valid JSON"),
        (b'{"query": "q", "candidates": [', {"content-type": "application/json"}, "not valid JSON"),
        (b"", {"content-type": "application/json"}, "missing"),
        (b"query=q", {"content-type": "application/x-www-form-urlencoded"}, "JSON object"),
        (b'{"query": "q", "candidates": []}', {"content-type": "text/plain"}, "JSON object"),
    ],
)
def test_non_json_bodies_are_422(client, content, headers, fragment):
    data = _error(client.post("/rerank", content=content, headers=headers), 422)
    assert fragment in data["message"]


def test_lone_surrogates_are_422_not_500(client):
    for bad in (
        '{"query": "\\ud800", "candidates": []}',
        '{"query": "q", "candidates": [{"product_id": "\\udfff", "text": "t"}]}',
        '{"query": "q", "candidates": [{"product_id": "a", "text": "x\\ud800"}]}',
        '{"query": "q", "documents": ["\\ud83d"]}',
    ):
        path = "/v1/rerank" if "documents" in bad else "/rerank"
        data = _error(
            client.post(path, content=bad.encode(), headers={"content-type": "application/json"}), 422
        )
        assert "valid string" in data["message"] or "surrogate" in data["message"]


def test_body_over_max_body_bytes_is_413(make_client):
    client = make_client(max_body_bytes=2048)
    big = json.dumps(body(1, query="q" * 3000)).encode()
    data = _error(client.post("/rerank", content=big, headers={"content-type": "application/json"}), 413)
    assert "MAX_BODY_BYTES=2048" in data["message"]


def test_v1_rerank_validation(client):
    assert _error(client.post("/v1/rerank", json={"query": "q", "documents": [{"txt": "a"}]}), 422)
    assert _error(client.post("/v1/rerank", json={"query": "q", "documents": ["a"], "top_n": 0}), 422)
    assert _error(client.post("/v1/rerank", json={"query": "", "documents": ["a"]}), 422)
    # Types are strict: no 0 -> False or "2" -> 2 coercion of what the schema says is bool/int.
    assert _error(
        client.post("/v1/rerank", json={"query": "q", "documents": ["a"], "return_documents": 0}), 422
    )
    assert _error(client.post("/v1/rerank", json={"query": "q", "documents": ["a"], "top_n": "2"}), 422)
    assert _error(client.post("/rerank", json={"query": "q", "candidates": [], "top_k": 2.0}), 422)
    empty = client.post("/v1/rerank", json={"query": "q", "documents": []})
    assert empty.status_code == 200
    assert empty.json()["results"] == []


def test_unknown_route_and_method_use_the_error_shape(client):
    assert _error(client.get("/nowhere"), 404)["error"] == "not_found"
    assert _error(client.get("/rerank"), 405)["error"] == "method_not_allowed"


def test_unexpected_exceptions_become_a_json_500(make_client, tiny_reranker, monkeypatch, caplog):
    client = make_client()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(tiny_reranker, "runner", broken)  # the forward pass, batched or not
    response = client.post("/rerank", json=body(2), headers={"X-Request-ID": "bug-1"})
    data = _error(response, 500)
    assert data["error"] == "internal_error"
    assert data["request_id"] == "bug-1"
    assert "simulated bug" not in data["message"]  # no internals leak to clients
    assert any("unhandled error" in r.getMessage() and r.exc_info for r in caplog.records)
    assert client.get("/health").status_code == 200


def test_body_that_is_not_utf8_is_422(client):
    data = _error(
        client.post("/rerank", content=b"\xff\xfe{", headers={"content-type": "application/json"}), 422
    )
    assert "not valid JSON" in data["message"]
