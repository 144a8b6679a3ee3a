"""Load shedding: MAX_QUEUED_REQUESTS bounds the model requests in progress; one more gets 429 with
Retry-After at once (counted in /metrics), for the scoring routes, /search and any loaded model."""

from __future__ import annotations

import asyncio
import gc
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from esci_reranker.reranker import Reranker
from esci_reranker.serve import create_app, load_settings
from esci_reranker.serve import state as state_module
from esci_reranker.serve.admission import MAX_RETRY_AFTER, QueueBound
from esci_reranker.serve.metrics import Metrics
from esci_reranker.serve.settings import DEFAULT_MAX_QUEUED_REQUESTS, SettingsError
from tests.serve.helpers import asgi_client, body, rerank_tasks


class HeldRunner:
    """Wraps ``Reranker.runner`` (the model's forward pass, a dependency of the unit under test) so
    every forward waits for ``release``: requests stay in progress until the test lets them go."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, batch: Any) -> Any:
        self.entered.set()
        self.release.wait(timeout=60)
        return self.fn(batch)


async def _until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for ``condition`` (a state the test needs before its next step, not a timing check)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)


def _metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name}{labels} not in /metrics"
    return float(match.group(1))


@pytest.fixture
def held(wrap_runner) -> Callable[[Reranker], HeldRunner]:
    """``held(reranker)``: its forward passes wait for ``release`` (for this test only)."""
    return lambda reranker: wrap_runner(reranker, HeldRunner)


@pytest.mark.parametrize("batch_wait_ms", [2.0, 0.0], ids=["batched", "direct"])
@pytest.mark.parametrize("model", ["tiny_reranker", "tiny_single_reranker"])
def test_a_full_queue_answers_429_with_retry_after_and_counts_it(request, held, model, batch_wait_ms):
    reranker: Reranker = request.getfixturevalue(model)
    app = create_app(
        load_settings(cache_size=0, max_queued_requests=2, batch_wait_ms=batch_wait_ms), reranker
    )
    queue = app.state.service.queue
    runner = held(reranker)

    async def scenario() -> None:
        async with asgi_client(app) as client:
            admitted = rerank_tasks(client, 2, 3)
            await _until(lambda: queue.admitted == 2 and runner.entered.is_set(), "two requests in progress")

            shed = await client.post("/rerank", json=body(3))
            assert shed.status_code == 429
            assert shed.json()["error"] == "overloaded"
            assert "MAX_QUEUED_REQUESTS=2" in shed.json()["message"]
            assert int(shed.headers["Retry-After"]) >= 1
            assert shed.headers["X-Request-ID"]  # answered inside the request context
            for path, payload in [
                ("/predict", body(2)),
                ("/v1/rerank", {"query": "q", "documents": ["a", "b"]}),
                ("/search", {"query": "q"}),
            ]:
                other = await client.post(path, json=payload)
                assert other.status_code == 429, path
                assert "Retry-After" in other.headers
            # Probes and scrapes are never shed.
            assert (await client.get("/health")).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert _metric(metrics, "esci_requests_shed_total", '{endpoint="/rerank"}') == 1.0
            assert _metric(metrics, "esci_requests_shed_total", '{endpoint="/search"}') == 1.0
            assert _metric(metrics, "esci_queued_requests") == 2.0
            assert _metric(metrics, "esci_max_queued_requests") == 2.0
            assert 'esci_http_requests_total{endpoint="/rerank",method="POST",status="429"} 1.0' in metrics

            runner.release.set()
            assert [(await task).status_code for task in admitted] == [200, 200]
            assert queue.admitted == 0
            assert (await client.post("/rerank", json=body(3))).status_code == 200  # room again

    asyncio.run(scenario())


def test_search_holds_a_slot_through_retrieval_and_rerank(make_client, tiny_reranker, tiny_index: Path, held):
    client = make_client(index_path=str(tiny_index), cache_size=0, max_queued_requests=1)
    deadline = time.monotonic() + 60
    while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    app = client.app
    queue = app.state.service.queue  # type: ignore[attr-defined]
    runner = held(tiny_reranker)

    async def scenario() -> None:
        async with asgi_client(app) as http:
            searching = asyncio.create_task(
                http.post("/search", json={"query": "wireless earbuds", "top_k": 3})
            )
            await _until(lambda: runner.entered.is_set(), "the search's rerank forward")
            assert queue.admitted == 1
            shed = await http.post("/search", json={"query": "earbuds"})
            assert shed.status_code == 429
            assert "Retry-After" in shed.headers
            assert (await http.post("/rerank", json=body(2))).status_code == 429
            runner.release.set()
            response = await searching
            assert response.status_code == 200, response.text
            assert response.json()["stats"]["reranked"] is True
            assert queue.admitted == 0

    asyncio.run(scenario())


def test_no_bound_with_zero(held, tiny_reranker):
    app = create_app(load_settings(cache_size=0, max_queued_requests=0), tiny_reranker)
    queue = app.state.service.queue
    runner = held(tiny_reranker)

    async def scenario() -> None:
        async with asgi_client(app) as client:
            tasks = rerank_tasks(client, 5, 2)
            await _until(lambda: queue.admitted == 5, "five requests in progress")
            runner.release.set()
            assert [(await task).status_code for task in tasks] == [200] * 5
            assert queue.shed == 0

    asyncio.run(scenario())


def test_queue_bound_counts_and_estimates_retry_after():
    metrics = Metrics()
    bound = QueueBound(2, metrics)
    assert bound.retry_after() == 1  # nothing measured yet
    assert bound.try_enter()
    assert bound.try_enter()
    assert not bound.try_enter()
    assert (bound.admitted, bound.shed) == (2, 1)
    bound.leave(4.2)
    assert bound.retry_after() == 5  # rounded up: an admitted request took 4.2 s
    assert bound.try_enter()
    bound.leave(1000.0)
    bound.leave(1000.0)
    assert bound.retry_after() == MAX_RETRY_AFTER
    assert bound.admitted == 0
    with pytest.raises(ValueError, match="limit=-1"):
        QueueBound(-1)


def test_max_queued_requests_setting(monkeypatch):
    assert load_settings().max_queued_requests == DEFAULT_MAX_QUEUED_REQUESTS
    monkeypatch.setenv("MAX_QUEUED_REQUESTS", "7")
    assert load_settings().max_queued_requests == 7
    monkeypatch.setenv("MAX_QUEUED_REQUESTS", "-1")
    with pytest.raises(SettingsError, match="MAX_QUEUED_REQUESTS='-1'"):
        load_settings()


def test_a_full_queue_answers_429_before_reading_the_body(held, tiny_reranker):
    # A refused client's body may still be in flight (or never come): the 429 must not wait for it.
    app = create_app(load_settings(cache_size=0, max_queued_requests=1), tiny_reranker)
    queue = app.state.service.queue
    runner = held(tiny_reranker)
    body_read = asyncio.Event()

    async def never_sent() -> dict[str, Any]:
        body_read.set()
        await asyncio.Event().wait()  # the body never arrives
        raise AssertionError("unreachable")

    async def scenario() -> None:
        async with asgi_client(app) as client:
            admitted = rerank_tasks(client, 1, 3)
            await _until(lambda: queue.admitted == 1 and runner.entered.is_set(), "one request in progress")
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/rerank",
                "raw_path": b"/rerank",
                "query_string": b"",
                "root_path": "",
                "headers": [
                    (b"host", b"test"),
                    (b"content-type", b"application/json"),
                    (b"content-length", b"900"),
                ],
                "client": ("127.0.0.1", 5000),
                "server": ("test", 80),
            }
            sent: list[dict[str, Any]] = []

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            # A hang guard, not a timing check: reading the body would block here for ever.
            await asyncio.wait_for(app(scope, never_sent, send), timeout=60)
            assert not body_read.is_set()
            start = next(m for m in sent if m["type"] == "http.response.start")
            assert start["status"] == 429
            headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
            assert int(headers["retry-after"]) >= 1
            metrics = (await client.get("/metrics")).text
            assert _metric(metrics, "esci_requests_shed_total", '{endpoint="/rerank"}') == 1.0
            runner.release.set()
            assert (await admitted[0]).status_code == 200

    asyncio.run(scenario())


def test_warm_up_freezes_the_loaded_objects_so_full_collections_skip_them(monkeypatch, tiny_reranker):
    # A full garbage collection over everything loaded holds the GIL long enough to stall the event
    # loop (and every 429 it would send); after warm-up those objects are in the permanent generation.
    monkeypatch.setattr(state_module, "_startup_frozen", False)
    loaded = {"stands for": ["what loading created"]}
    assert gc.is_tracked(loaded)
    app = create_app(load_settings(cache_size=0), tiny_reranker)
    try:
        app.state.service.warm_up()
        assert gc.get_freeze_count() > 0
        assert not any(obj is loaded for obj in gc.get_objects())  # collections no longer scan it
        assert state_module.freeze_startup_objects() is False  # once per process
    finally:
        app.state.service.close()
        gc.unfreeze()
