"""Prometheus metrics move with traffic; each app has its own registry."""

from __future__ import annotations

import re
import time

from tests.serve.helpers import body


def _value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_counters_histograms_and_gauges_move(make_client):
    client = make_client()
    before = client.get("/metrics").text
    client.post("/rerank", json=body(4))
    client.post("/classify", json=body(4))  # cache hit
    client.post("/rerank", json={"query": ""})  # 422
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert _value(text, 'esci_http_requests_total{endpoint="/rerank",method="POST",status="200"}') == 1
    assert _value(text, 'esci_http_requests_total{endpoint="/rerank",method="POST",status="422"}') == 1
    assert _value(text, 'esci_http_requests_total{endpoint="/classify",method="POST",status="200"}') == 1
    assert _value(text, 'esci_http_request_duration_seconds_count{endpoint="/rerank",method="POST"}') == 2
    # warm-up + one real forward
    assert (
        _value(text, "esci_model_forward_seconds_count")
        == _value(before, "esci_model_forward_seconds_count") + 1
    )
    assert _value(text, 'esci_model_batch_candidates_bucket{le="5.0"}') >= 1
    assert _value(text, "esci_cache_hits_total") == 1
    assert _value(text, "esci_cache_misses_total") == 1
    assert _value(text, "esci_model_loaded") == 1
    assert _value(text, "esci_http_requests_in_flight") == 1  # this very /metrics request


def test_unknown_paths_share_one_label(client):
    client.get("/wp-admin")
    client.get("/x/../etc")
    text = client.get("/metrics").text
    assert _value(text, 'esci_http_requests_total{endpoint="unmatched",method="GET",status="404"}') == 2
    assert "wp-admin" not in text


def test_apps_do_not_share_metrics(make_client):
    first, second = make_client(), make_client()
    first.post("/rerank", json=body(1))
    assert 'endpoint="/rerank"' not in second.get("/metrics").text


def test_tower_cache_size_reaches_the_model_and_its_counters_are_exported(monkeypatch, tiny_prior_checkpoint):
    from fastapi.testclient import TestClient

    from esci_reranker.serve import create_app_from_env

    monkeypatch.setenv("MODEL_PATH", str(tiny_prior_checkpoint))
    monkeypatch.setenv("CACHE_SIZE", "0")  # every request runs the model
    monkeypatch.setenv("TOWER_CACHE_SIZE", "64")
    with TestClient(create_app_from_env()) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = client.get("/info").json()["model"]["tower_cache"]
        assert before["size"] == 64
        first = client.post("/rerank", json=body(4)).json()
        second = client.post("/rerank", json=body(4)).json()
        after = client.get("/info").json()["model"]["tower_cache"]
        text = client.get("/metrics").text
    assert first["ranked"] == second["ranked"]
    # the first request encoded its query and 4 products; the second found all 5
    assert after["misses"] - before["misses"] == 5
    assert after["hits"] - before["hits"] == 5
    assert _value(text, "esci_tower_cache_hits_total") == after["hits"]
    assert _value(text, "esci_tower_cache_misses_total") == after["misses"]
    assert _value(text, "esci_tower_cache_entries") == after["entries"]


def test_no_tower_series_without_a_tower_cache(client):
    client.post("/rerank", json=body(2))
    assert "esci_tower_cache" not in client.get("/metrics").text
    assert client.get("/info").json()["model"]["tower_cache"] is None
