"""The response cache: shared by all scoring endpoints, keyed by model, query and candidate texts."""

from __future__ import annotations

import numpy as np
import pytest

from esci_reranker.reranker import Predictions
from esci_reranker.serve.cache import PredictionCache, cache_key
from tests.serve.helpers import body


def test_second_endpoint_on_the_same_request_runs_no_model(make_client, tiny_reranker, count_calls):
    client = make_client()
    counter = count_calls(tiny_reranker)  # after start-up, so the warm-up call is not counted
    request = body(4, top_k=2)
    first = client.post("/rerank", json=request).json()
    assert counter.calls == 1
    assert first["stats"]["cache_hit"] is False
    for path in ("/classify", "/substitute", "/predict", "/rerank"):
        data = client.post(path, json=request).json()
        assert data["stats"]["cache_hit"] is True, path
        assert data["stats"]["model_forward_time_ms"] == 0.0
    assert counter.calls == 1

    # /v1/rerank with the same texts shares the entry too.
    docs = [c["text"] for c in request["candidates"]]
    v1 = client.post("/v1/rerank", json={"query": request["query"], "documents": docs}).json()
    assert v1["stats"]["cache_hit"] is True
    assert counter.calls == 1

    # Another query, or other texts, miss.
    client.post("/rerank", json=body(4, query="blue hat"))
    assert counter.calls == 2


def test_fields_and_equivalent_text_share_an_entry(make_client, tiny_reranker, count_calls):
    client = make_client()
    counter = count_calls(tiny_reranker)
    fields = {"title": "Trail Shoe", "brand": "Salomon"}
    client.post("/rerank", json={"query": "q", "candidates": [{"product_id": "a", **fields}]})
    text = tiny_reranker.text_of(fields)
    hit = client.post(
        "/classify", json={"query": "q", "candidates": [{"product_id": "b", "text": text}]}
    ).json()
    assert hit["stats"]["cache_hit"] is True
    assert counter.calls == 1


def test_cache_size_zero_turns_the_cache_off(make_client, tiny_reranker, count_calls):
    client = make_client(cache_size=0)
    counter = count_calls(tiny_reranker)
    for _ in range(3):
        assert client.post("/rerank", json=body(3)).json()["stats"]["cache_hit"] is False
    assert counter.calls == 3


def test_cached_results_equal_fresh_results(make_client):
    client = make_client()
    fresh = client.post("/predict", json=body(5)).json()["ranked"]
    cached = client.post("/predict", json=body(5)).json()["ranked"]
    assert cached == fresh


def _preds(value: float) -> Predictions:
    a = np.full(1, value, np.float32)
    return Predictions(a, a, a, np.array(["E"]), np.full((1, 4), 0.25, np.float32), a, np.zeros(1, bool))


def test_lru_evicts_the_least_recently_used():
    cache = PredictionCache(2)
    a, b, c = (cache_key("m", "q", [t]) for t in "abc")
    cache.put(a, _preds(1))
    cache.put(b, _preds(2))
    assert cache.get(a) is not None  # a is now the most recent
    cache.put(c, _preds(3))
    assert cache.get(b) is None
    assert cache.get(a) is not None
    assert cache.get(c) is not None
    assert len(cache) == 2
    with pytest.raises(ValueError, match="maxsize=0"):
        PredictionCache(0)


def test_cache_key_separates_model_query_and_texts():
    base = cache_key("m", "q", ["a", "b"])
    assert base == cache_key("m", "q", ["a", "b"])
    assert len(base) == 32
    others = [
        cache_key("m2", "q", ["a", "b"]),
        cache_key("m", "q2", ["a", "b"]),
        cache_key("m", "q", ["b", "a"]),
        cache_key("m", "q", ["ab"]),
        cache_key("m", "q", ["a", "b", ""]),
        cache_key("m", "qa", ["b"]),
    ]
    assert len({base, *others}) == len(others) + 1


def test_a_direct_path_cache_hit_does_not_queue_behind_a_running_forward(
    make_client, tiny_reranker, monkeypatch
):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    client = make_client(batch_wait_ms=0)
    first = client.post("/rerank", json=body(3)).json()  # now cached
    started, release = threading.Event(), threading.Event()
    inner = tiny_reranker.runner

    def slow(batch):
        started.set()
        release.wait(30)
        return inner(batch)

    monkeypatch.setattr(tiny_reranker, "runner", slow)
    with ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(client.post, "/rerank", json=body(4, query="not cached"))
        assert started.wait(30)
        hit = client.post("/rerank", json=body(3))
        assert not blocked.done()  # the hit was answered while the model thread was busy
        release.set()
        assert blocked.result().status_code == 200
    assert hit.status_code == 200
    assert hit.json()["ranked"] == first["ranked"]
