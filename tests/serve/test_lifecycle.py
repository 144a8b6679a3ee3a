"""Start-up: /health answers while the model loads, /ready waits for load and warm-up, and
scoring runs off the event loop so probes answer while a big request is scored."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from esci_reranker.serve import create_app, load_settings
from esci_reranker.serve.app import create_app_from_env
from tests.serve.helpers import asgi_client, body


def _wait_for(client, path: str, status: int, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(path)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.02)


def test_ready_is_503_until_the_loader_returns(make_client, tiny_reranker):
    release = threading.Event()
    calls = []

    def blocking_loader(settings):
        calls.append(settings)
        release.wait(timeout=30)
        return tiny_reranker

    client = make_client(loader=blocking_loader)
    ready = client.get("/ready")
    assert ready.status_code == 503
    assert ready.json() == {
        "ready": False,
        "model_status": "loading",
        "error": None,
        "index_status": "not_configured",
        "index_error": None,
    }
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["model_loaded"] is False
    scoring = client.post("/rerank", json=body(1))
    assert scoring.status_code == 503
    assert "still loading" in scoring.json()["message"]
    assert scoring.headers["Retry-After"]
    assert "esci_model_loaded 0.0" in client.get("/metrics").text

    release.set()
    assert _wait_for(client, "/ready", 200).json()["model_status"] == "ready"
    assert client.get("/health").json() == {
        "status": "ok",
        "model_loaded": True,
        "model_status": "ready",
        "error": None,
    }
    assert client.post("/rerank", json=body(1)).status_code == 200
    assert "esci_model_loaded 1.0" in client.get("/metrics").text
    assert len(calls) == 1


def test_a_failed_load_shows_in_ready_and_health(make_client):
    def failing_loader(settings):
        raise FileNotFoundError("no checkpoint at /nowhere")

    client = make_client(loader=failing_loader)
    ready = _wait_for(client, "/ready", 503)
    assert _wait_for(client, "/health", 503).json()["status"] == "failed"
    ready = client.get("/ready").json()
    assert ready["model_status"] == "failed"
    assert "no checkpoint at /nowhere" in ready["error"]
    scoring = client.post("/rerank", json=body(1))
    assert scoring.status_code == 503
    assert "failed to load" in scoring.json()["message"]


def test_default_loader_reads_model_path_from_the_environment(monkeypatch, tiny_checkpoint):
    from fastapi.testclient import TestClient

    monkeypatch.setenv("MODEL_PATH", str(tiny_checkpoint))
    monkeypatch.setenv("CACHE_SIZE", "0")
    monkeypatch.setenv("PRECISION", "bf16")
    with TestClient(create_app_from_env()) as client:
        assert _wait_for(client, "/ready", 200, timeout=60).status_code == 200
        info = client.get("/info").json()
        assert info["model"]["name"] == str(tiny_checkpoint)
        assert info["model"]["precision"] == "bf16"
        assert info["service"]["cache_size"] == 0


def test_health_and_metrics_answer_while_a_request_is_scored(tiny_reranker, monkeypatch):
    started, release = threading.Event(), threading.Event()
    original = tiny_reranker.runner

    def slow_forward(batch):
        started.set()
        release.wait(timeout=30)
        return original(batch)

    app = create_app(load_settings(cache_size=0), tiny_reranker)
    monkeypatch.setattr(tiny_reranker, "runner", slow_forward)

    async def scenario() -> None:
        async with asgi_client(app) as client:
            scoring = asyncio.create_task(client.post("/rerank", json=body(3)))
            assert await asyncio.to_thread(started.wait, 30)
            health = await asyncio.wait_for(client.get("/health"), timeout=5)
            metrics = await asyncio.wait_for(client.get("/metrics"), timeout=5)
            assert health.status_code == 200
            assert "esci_http_requests_in_flight 2.0" in metrics.text  # the scoring request and this one
            release.set()
            assert (await scoring).status_code == 200

    asyncio.run(scenario())


@pytest.mark.parametrize("status", ["ready"])
def test_given_reranker_is_warmed_up_at_start(make_client, tiny_reranker, count_calls, status):
    counter = count_calls(tiny_reranker)
    client = make_client()
    assert client.get("/ready").json()["model_status"] == status
    assert counter.calls == 1  # the warm-up forward pass
