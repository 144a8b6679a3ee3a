"""Shapes and ordering of every scoring endpoint, the /v1/rerank compatibility route and request ids."""

from __future__ import annotations

import numpy as np
import pytest

from esci_reranker.reranker import Reranker
from tests.serve.helpers import body

STATS_KEYS = {
    "total_latency_ms",
    "model_forward_time_ms",
    "num_candidates",
    "num_results",
    "num_truncated",
    "device",
    "top_score",
    "avg_score",
    "cache_hit",
    "timestamp",
}


def _expected(reranker: Reranker, request: dict) -> dict[str, dict]:
    """The reranker's own outputs per product id, to compare the HTTP answers with."""
    ids = [c["product_id"] for c in request["candidates"]]
    texts = [
        reranker.text_of({k: v for k, v in c.items() if k != "product_id"}) for c in request["candidates"]
    ]
    preds = reranker.predict_texts([request["query"]] * len(ids), texts)
    return {
        pid: {
            "score": float(preds.scores[i]),
            "esci_class": str(preds.esci_classes[i]),
            "probs": preds.esci_probs[i].tolist(),
            "sub": float(preds.substitute_probs[i]),
        }
        for i, pid in enumerate(ids)
    }


def test_rerank_sorts_by_score_and_cuts_to_top_k(client, tiny_reranker):
    request = body(5, top_k=3)
    response = client.post("/rerank", json=request)
    assert response.status_code == 200
    data = response.json()
    assert set(data) == {"request_id", "ranked", "stats"}
    expected = _expected(tiny_reranker, request)
    best = sorted(expected, key=lambda pid: -expected[pid]["score"])[:3]
    assert [r["product_id"] for r in data["ranked"]] == best
    for item in data["ranked"]:
        assert set(item) == {"product_id", "score", "esci_class", "is_substitute"}
        assert item["score"] == pytest.approx(expected[item["product_id"]]["score"], abs=1e-5)
        assert item["esci_class"] == expected[item["product_id"]]["esci_class"]
        assert item["is_substitute"] == (expected[item["product_id"]]["sub"] >= 0.5)
    stats = data["stats"]
    assert set(stats) == STATS_KEYS
    assert stats["num_candidates"] == 5
    assert stats["num_results"] == 3
    assert stats["device"] == "cpu"
    assert stats["top_score"] == pytest.approx(max(v["score"] for v in expected.values()), abs=1e-5)
    assert stats["avg_score"] == pytest.approx(np.mean([v["score"] for v in expected.values()]), abs=1e-5)
    assert stats["cache_hit"] is False
    assert stats["model_forward_time_ms"] > 0
    assert stats["total_latency_ms"] >= stats["model_forward_time_ms"]
    assert stats["timestamp"].endswith("Z") or "+00:00" in stats["timestamp"]


def test_rerank_without_top_k_returns_all(client):
    data = client.post("/rerank", json=body(4)).json()
    scores = [r["score"] for r in data["ranked"]]
    assert len(scores) == 4
    assert scores == sorted(scores, reverse=True)


def test_classify_answers_in_request_order(client, tiny_reranker):
    request = body(4)
    data = client.post("/classify", json=request).json()
    expected = _expected(tiny_reranker, request)
    assert [r["product_id"] for r in data["results"]] == ["p0", "p1", "p2", "p3"]
    for item in data["results"]:
        assert set(item) == {"product_id", "esci_class", "probabilities"}
        probs = item["probabilities"]
        assert list(probs) == ["E", "S", "C", "I"]
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert list(probs.values()) == pytest.approx(expected[item["product_id"]]["probs"], abs=1e-5)
        assert item["esci_class"] == max(probs, key=probs.get)
        assert item["esci_class"] == expected[item["product_id"]]["esci_class"]


def test_substitute_answers_in_request_order(client, tiny_reranker):
    request = body(4, top_k=1)  # top_k only cuts ranked lists
    data = client.post("/substitute", json=request).json()
    expected = _expected(tiny_reranker, request)
    assert [r["product_id"] for r in data["results"]] == ["p0", "p1", "p2", "p3"]
    for item in data["results"]:
        assert set(item) == {"product_id", "is_substitute", "substitute_prob"}
        assert item["substitute_prob"] == pytest.approx(expected[item["product_id"]]["sub"], abs=1e-5)
        assert item["is_substitute"] is (item["substitute_prob"] >= 0.5)


def test_predict_combines_all_three_tasks(client, tiny_reranker):
    request = body(5, top_k=4)
    data = client.post("/predict", json=request).json()
    expected = _expected(tiny_reranker, request)
    ranked = data["ranked"]
    assert [r["product_id"] for r in ranked] == sorted(expected, key=lambda p: -expected[p]["score"])[:4]
    for item in ranked:
        assert set(item) == {"product_id", "score", "esci_class", "is_substitute", "substitute_prob"}
        want = expected[item["product_id"]]
        assert item["esci_class"] == want["esci_class"]
        assert item["substitute_prob"] == pytest.approx(want["sub"], abs=1e-5)
        assert item["is_substitute"] is (want["sub"] >= 0.5)


def test_fields_candidates_use_the_training_text(client, tiny_reranker):
    fields = {"title": "Trail Running Shoe", "brand": "Salomon", "color": "black"}
    as_fields = {"query": "trail shoes", "candidates": [{"product_id": "a", **fields}]}
    as_esci_columns = {
        "query": "trail shoes",
        "candidates": [{"product_id": "a", **{f"product_{k}": v for k, v in fields.items()}}],
    }
    as_text = {
        "query": "trail shoes",
        "candidates": [{"product_id": "a", "text": tiny_reranker.text_of(fields)}],
    }
    scores = [
        client.post("/rerank", json=b).json()["ranked"][0]["score"]
        for b in (as_fields, as_esci_columns, as_text)
    ]
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)
    assert scores[0] == pytest.approx(scores[2], abs=1e-6)


def test_empty_candidate_list_gives_empty_results(client):
    for path, key in [
        ("/rerank", "ranked"),
        ("/classify", "results"),
        ("/substitute", "results"),
        ("/predict", "ranked"),
    ]:
        response = client.post(path, json={"query": "anything", "candidates": []})
        assert response.status_code == 200, path
        data = response.json()
        assert data[key] == []
        assert data["stats"]["num_candidates"] == 0
        assert data["stats"]["top_score"] is None
        assert data["stats"]["avg_score"] is None


def test_single_task_model_answers_409_for_task_2_and_3(make_client, tiny_single_reranker):
    client = make_client(tiny_single_reranker)
    for path in ("/classify", "/substitute"):
        response = client.post(path, json=body(2))
        assert response.status_code == 409
        assert response.json()["error"] == "task_not_supported"
        assert "single-task" in response.json()["message"]
    reranked = client.post("/rerank", json=body(2))
    assert reranked.status_code == 200
    assert all(r["esci_class"] is None and r["is_substitute"] is None for r in reranked.json()["ranked"])
    ranked = client.post("/predict", json=body(2)).json()["ranked"]
    assert all(
        r["esci_class"] is None and r["is_substitute"] is None and r["substitute_prob"] is None
        for r in ranked
    )


def test_v1_rerank_indices_top_n_and_documents(client, tiny_reranker):
    docs = ["red running shoes | Nike", {"text": "blue hat"}, "running shoe laces", "coffee mug"]
    texts = [d if isinstance(d, str) else d["text"] for d in docs]
    preds = tiny_reranker.predict_texts(["running shoes"] * 4, texts)
    scores = preds.scores
    response = client.post(
        "/v1/rerank", json={"query": "running shoes", "documents": docs, "top_n": 2, "model": "rerank-v3"}
    )
    assert response.status_code == 200
    data = response.json()
    assert {"results", "model", "usage", "request_id", "id", "stats"} <= set(data)
    assert data["usage"]["search_units"] == 1
    assert data["model"] == tiny_reranker.name
    assert [r["index"] for r in data["results"]] == list(np.argsort(-scores, kind="stable")[:2])
    for r in data["results"]:
        assert set(r) == {"index", "relevance_score", "esci_class", "is_substitute"}
        assert r["relevance_score"] == pytest.approx(float(scores[r["index"]]), abs=1e-5)
        assert r["esci_class"] == preds.esci_classes[r["index"]]
        assert r["is_substitute"] == bool(preds.is_substitute[r["index"]])

    with_docs = client.post(
        "/v1/rerank", json={"query": "running shoes", "documents": docs, "return_documents": True}
    )
    results = with_docs.json()["results"]
    assert len(results) == 4
    assert all(r["document"] == {"text": texts[r["index"]]} for r in results)


def test_request_id_is_echoed_or_generated(client):
    response = client.post("/rerank", json=body(1), headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    assert response.json()["request_id"] == "abc-123"

    fresh = client.post("/rerank", json=body(1))
    rid = fresh.headers["X-Request-ID"]
    assert len(rid) == 32
    assert rid == fresh.json()["request_id"]

    unsafe = client.post("/rerank", json=body(1), headers={"X-Request-ID": "x" * 500})
    assert unsafe.headers["X-Request-ID"] != "x" * 500

    error = client.post("/rerank", json={"query": ""}, headers={"X-Request-ID": "err-1"})
    assert error.status_code == 422
    assert error.headers["X-Request-ID"] == "err-1"
    assert error.json()["request_id"] == "err-1"
    assert client.get("/health").headers["X-Request-ID"]


def test_info_and_openapi(client, tiny_reranker):
    info = client.get("/info").json()
    assert info["model"] == tiny_reranker.info()
    assert info["service"]["max_candidates"] == 1000
    assert info["service"]["auth_required"] is False
    assert info["service"]["batch_wait_ms"] >= 0
    assert info["service"]["max_batch_tokens"] > 0
    assert info["model"]["precision"] in ("fp32", "bf16", "int8")
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/rerank",
        "/classify",
        "/substitute",
        "/predict",
        "/v1/rerank",
        "/v2/rerank",
        "/health",
        "/ready",
        "/metrics",
        "/info",
    } <= set(paths)
    assert client.get("/docs").status_code == 200


def test_substitute_threshold_matches_evaluation(client, tiny_reranker):
    from esci_reranker.eval.classification import DEFAULT_THRESHOLD

    # a model without a stacker decides at evaluation's default; /substitute applies the model's
    assert tiny_reranker.substitute_threshold == DEFAULT_THRESHOLD
    results = client.post("/substitute", json=body(5)).json()["results"]
    assert [r["is_substitute"] for r in results] == [
        r["substitute_prob"] >= DEFAULT_THRESHOLD for r in results
    ]
