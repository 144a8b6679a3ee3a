"""Dynamic batching: concurrent requests share token-bounded forward passes and each gets its own
results back; a forward that fails fails only its requests; shutdown never leaves a request hanging.

The model's forward pass (``Reranker.runner``, a dependency of the batcher) is wrapped to record
the batch shapes it really receives, or to hold a forward until the test has queued more work.
No timing assertions.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from esci_reranker.reranker import Predictions, Reranker
from esci_reranker.serve import create_app
from esci_reranker.serve.batching import BatcherClosedError, BatchInfo, DynamicBatcher, padded_tokens
from esci_reranker.serve.errors import ApiError
from esci_reranker.serve.metrics import Metrics
from esci_reranker.serve.scoring import Scorer
from esci_reranker.serve.settings import SettingsError, load_settings
from tests.serve.helpers import body

WORDS = [
    "wireless",
    "earbuds",
    "bluetooth",
    "noise",
    "cancelling",
    "black",
    "case",
    "charging",
    "usb",
    "cable",
    "fast",
    "long",
    "battery",
    "life",
    "waterproof",
    "sport",
    "running",
    "shoes",
    "red",
    "trail",
    "mens",
    "womens",
    "size",
    "cotton",
    "hat",
    "summer",
    "kitchen",
    "coffee",
    "mug",
    "ceramic",
    "dishwasher",
    "safe",
    "gift",
    "set",
    "pack",
    "of",
    "two",
    "stainless",
    "steel",
    "bottle",
    "insulated",
]


def texts_for(seed: int, n: int) -> list[str]:
    """``n`` product texts of varied lengths (2 to ~60 words, so some pairs hit max_length 64)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 60)))) for _ in range(n)]


def assert_same(actual: Predictions, expected: Predictions) -> None:
    np.testing.assert_allclose(actual.scores, expected.scores, atol=1e-5)
    np.testing.assert_allclose(actual.regression_scores, expected.regression_scores, atol=1e-5)
    np.testing.assert_allclose(actual.esci_probs, expected.esci_probs, atol=1e-5)
    np.testing.assert_allclose(actual.substitute_probs, expected.substitute_probs, atol=1e-5)
    np.testing.assert_array_equal(actual.truncated, expected.truncated)


class RecordingRunner:
    """Wraps ``reranker.runner``: records (rows, padded tokens) of every forward; can hold one."""

    def __init__(self, runner: Callable[[dict[str, Any]], dict[str, np.ndarray]]) -> None:
        self.runner = runner
        self.shapes: list[tuple[int, int]] = []
        self.hold = threading.Event()
        self.hold.set()  # open unless a test closes it
        self.entered = threading.Event()
        self.fail_calls: set[int] = set()  # 1-based numbers of the forwards that raise

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        rows = len(batch["input_ids"])
        width = sum(v.shape[1] for k, v in batch.items() if k.endswith("input_ids"))  # pair + towers
        self.shapes.append((rows, rows * width))
        self.entered.set()
        assert self.hold.wait(timeout=30), "the test never released the held forward pass"
        if len(self.shapes) in self.fail_calls:
            raise RuntimeError("simulated forward failure")
        return self.runner(batch)


@pytest.fixture
def recorded(tiny_reranker: Reranker, monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingRunner]:
    recorder = RecordingRunner(tiny_reranker.runner)
    monkeypatch.setattr(tiny_reranker, "runner", recorder)
    yield recorder
    recorder.hold.set()  # never leave a worker held after a failed test


@pytest.fixture
def make_batcher() -> Iterator[Callable[..., tuple[DynamicBatcher, list[BatchInfo]]]]:
    """``make_batcher(reranker, max_wait_ms, max_batch_tokens)`` -> (batcher, the BatchInfo of each forward)."""
    made: list[DynamicBatcher] = []

    def make(reranker: Reranker, max_wait_ms: float = 5.0, max_batch_tokens: int = 16384):
        infos: list[BatchInfo] = []
        batcher = DynamicBatcher(reranker, max_wait_ms, max_batch_tokens, on_batch=infos.append)
        made.append(batcher)
        return batcher, infos

    yield make
    for batcher in made:
        batcher.close(timeout=10)


def test_concurrent_threads_each_get_their_own_results(tiny_reranker, recorded, make_batcher):
    batcher, infos = make_batcher(tiny_reranker, max_wait_ms=20.0, max_batch_tokens=2048)
    scorer = Scorer(tiny_reranker, batcher=batcher)
    requests = [
        (f"query {i}: {' '.join(WORDS[i : i + 1 + i % 4])}", texts_for(i, 1 + 5 * i)) for i in range(8)
    ]
    start = threading.Barrier(len(requests))

    def call(request: tuple[str, list[str]]) -> Predictions:
        start.wait(timeout=30)
        return scorer.score(*request).predictions

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(call, requests))
    assert all(tokens <= 2048 for _, tokens in recorded.shapes)
    assert sum(info.pairs for info in infos) == sum(len(t) for _, t in requests)
    for (query, texts), preds in zip(requests, results, strict=True):
        assert len(preds) == len(texts)
        assert_same(preds, tiny_reranker.predict_texts([query] * len(texts), texts))


def test_concurrent_asyncio_tasks_each_get_their_own_results(tiny_prior_checkpoint, make_batcher):
    # The cosine-prior model also feeds its query and product towers: every input is merged.
    reranker = Reranker.from_pretrained(tiny_prior_checkpoint, device="cpu")
    batcher, infos = make_batcher(reranker, max_wait_ms=20.0)
    scorer = Scorer(reranker, batcher=batcher)
    requests = [(f"prior query {i}", texts_for(100 + i, 3 + 4 * i)) for i in range(8)]

    async def scenario() -> list[Predictions]:
        results = await asyncio.gather(*(scorer.score_async(q, t) for q, t in requests))
        return [r.predictions for r in results]

    for (query, texts), preds in zip(requests, asyncio.run(scenario()), strict=True):
        assert_same(preds, reranker.predict_texts([query] * len(texts), texts))
    assert sum(info.pairs for info in infos) == sum(len(t) for _, t in requests)


def test_forwards_respect_the_token_budget_and_over_long_pairs_go_alone(
    tiny_reranker, recorded, make_batcher
):
    budget = 48  # below the longest pairs (max_length 64): those must run alone
    batcher, infos = make_batcher(tiny_reranker, max_wait_ms=5.0, max_batch_tokens=budget)
    requests = [(f"q{i}", texts_for(200 + i, 6)) for i in range(4)] + [("short", ["a", "b", "c"])]
    futures = [batcher.submit(tiny_reranker.pair_encoder.encode([q] * len(t), t)) for q, t in requests]
    outputs = [f.result(timeout=60) for f in futures]
    shapes = list(recorded.shapes)  # before predict_texts below adds its own forwards

    assert shapes, "no forward pass ran"
    assert len(shapes) == len(infos)
    alone = 0
    for (rows, tokens), info in zip(shapes, infos, strict=True):
        assert info.padded_tokens == tokens  # what the batcher reports is what the model got
        if rows == 1:
            alone += tokens > budget
        else:
            assert tokens <= budget, f"a {rows}-row batch has {tokens} padded tokens > {budget}"
    assert alone >= 1  # the over-long pairs were run on their own
    for (query, texts), output in zip(requests, outputs, strict=True):
        expected = tiny_reranker.predict_texts([query] * len(texts), texts)
        np.testing.assert_allclose(output.outputs["score"], expected.regression_scores, atol=1e-5)


def test_a_big_request_is_split_into_length_sorted_batches(tiny_reranker, recorded, make_batcher):
    budget = 1024
    batcher, infos = make_batcher(tiny_reranker, max_batch_tokens=budget)
    scorer = Scorer(tiny_reranker, batcher=batcher)
    texts = texts_for(7, 120)
    result = scorer.score("wireless earbuds", texts)
    shapes = list(recorded.shapes)  # before predict_texts below adds its own forwards

    assert len(shapes) >= 2
    assert sum(info.pairs for info in infos) == 120
    assert all(info.requests == 1 for info in infos)
    assert all(tokens <= budget for _, tokens in shapes)
    # longest pairs first: each batch is no wider per row than the one before
    widths = [tokens / rows for rows, tokens in shapes]
    assert widths == sorted(widths, reverse=True)
    assert result.forward_ms > 0
    assert_same(result.predictions, tiny_reranker.predict_texts(["wireless earbuds"] * 120, texts))


def _busy_worker(batcher, recorded, encode, query: str, text: str):
    """Submit one pair and wait until its forward has started and is held (``recorded.hold``):
    what is submitted next queues up. Returns the held request's future."""
    recorded.hold.clear()
    future = batcher.submit(encode([query], [text]))
    assert recorded.entered.wait(timeout=30)
    return future


def test_concurrent_requests_share_a_forward_pass(tiny_reranker, recorded, make_batcher):
    batcher, infos = make_batcher(tiny_reranker, max_wait_ms=20.0)
    encode = tiny_reranker.pair_encoder.encode
    first = _busy_worker(batcher, recorded, encode, "held", "the worker is busy with this one")
    # While the worker is busy, three requests queue up; the next forward takes all of them.
    queued = [(f"query {i}", texts_for(300 + i, 4)) for i in range(3)]
    futures = [batcher.submit(encode([q] * len(t), t)) for q, t in queued]
    assert batcher.queued_pairs() == 12
    recorded.hold.set()

    first.result(timeout=30)
    outputs = [f.result(timeout=30) for f in futures]
    assert [info.requests for info in infos] == [1, 3]
    assert [info.pairs for info in infos] == [1, 12]
    assert all(output.batches == 1 for output in outputs)
    for (query, texts), output in zip(queued, outputs, strict=True):
        expected = tiny_reranker.predict_texts([query] * len(texts), texts)
        np.testing.assert_allclose(output.outputs["score"], expected.regression_scores, atol=1e-5)


def test_a_failed_forward_fails_only_its_requests_and_the_worker_survives(
    tiny_reranker, recorded, make_batcher
):
    batcher, infos = make_batcher(tiny_reranker, max_wait_ms=20.0)
    encode = tiny_reranker.pair_encoder.encode
    ok = _busy_worker(batcher, recorded, encode, "held", "first batch")
    doomed = [batcher.submit(encode([f"q{i}"] * 2, ["x", "y"])) for i in range(2)]
    recorded.fail_calls = {2}  # the next forward (the two queued requests) raises
    recorded.hold.set()
    ok.result(timeout=30)
    for future in doomed:
        with pytest.raises(RuntimeError, match="simulated forward failure"):
            future.result(timeout=30)
    assert infos[-1].error is not None
    assert infos[-1].requests == 2
    after = batcher.submit(encode(["after"], ["still served"])).result(timeout=30)
    assert after.outputs["score"].shape == (1,)


def test_close_fails_waiting_requests_and_finishes_the_running_forward(tiny_reranker, recorded, make_batcher):
    batcher, _ = make_batcher(tiny_reranker, max_wait_ms=20.0)
    encode = tiny_reranker.pair_encoder.encode
    running = _busy_worker(batcher, recorded, encode, "running", "in the forward pass at shutdown")
    waiting = [batcher.submit(encode([f"w{i}"] * 3, ["a", "b", "c"])) for i in range(3)]

    closer = threading.Thread(target=batcher.close, kwargs={"timeout": 30})
    closer.start()
    for future in waiting:  # failed at once, while the forward is still held
        assert isinstance(future.exception(timeout=30), BatcherClosedError)
    recorded.hold.set()
    closer.join(timeout=30)
    assert not closer.is_alive()
    assert running.result(timeout=30).outputs["score"].shape == (1,)
    with pytest.raises(BatcherClosedError):
        batcher.submit(encode(["late"], ["too late"]))
    batcher.close()  # idempotent


def test_scorer_turns_shutdown_into_a_503(tiny_reranker, recorded, make_batcher):
    batcher, _ = make_batcher(tiny_reranker, max_wait_ms=20.0)
    scorer = Scorer(tiny_reranker, batcher=batcher)
    recorded.hold.clear()

    async def scenario() -> None:
        held = asyncio.create_task(scorer.score_async("held", ["busy"]))
        assert await asyncio.to_thread(recorded.entered.wait, 30)
        queued = asyncio.create_task(scorer.score_async("queued", ["never scored"]))
        while batcher.queued_pairs() == 0:  # wait until it is in the queue
            await asyncio.sleep(0.005)
        closing = asyncio.create_task(asyncio.to_thread(scorer.close))
        with pytest.raises(ApiError) as error:
            await asyncio.wait_for(queued, timeout=30)
        assert error.value.status == 503
        assert "shutting down" in error.value.message
        recorded.hold.set()
        await asyncio.wait_for(closing, timeout=30)
        assert len((await held).predictions) == 1

    asyncio.run(scenario())


def test_the_service_batches_by_default_and_reports_batch_metrics(make_client, recorded):
    client = make_client(cache_size=0)
    state = client.app.state.service
    assert state.scorer.batcher is not None
    assert state.scorer.batcher.max_batch_tokens == 2048  # the CPU default under the memory policy
    assert client.get("/info").json()["service"]["max_batch_tokens"] == 2048
    for n in (3, 5):
        assert client.post("/rerank", json=body(n)).status_code == 200
    text = client.get("/metrics").text
    assert "esci_batch_pairs_count 3.0" in text  # warm-up + two requests
    assert "esci_batch_padded_tokens_count 3.0" in text
    assert "esci_batch_queue_pairs 0.0" in text

    recorded.fail_calls = {len(recorded.shapes) + 1}
    failed = client.post("/rerank", json=body(2), headers={"X-Request-ID": "boom-1"})
    assert failed.status_code == 500
    assert failed.json()["error"] == "internal_error"
    assert failed.json()["request_id"] == "boom-1"
    assert client.post("/rerank", json=body(2)).status_code == 200  # the worker lives on


def test_batch_wait_zero_is_the_direct_path(make_client, tiny_reranker):
    batched = make_client(cache_size=0).post("/predict", json=body(5)).json()["ranked"]
    client = make_client(cache_size=0, batch_wait_ms=0)
    assert client.app.state.service.scorer.batcher is None
    direct = client.post("/predict", json=body(5)).json()["ranked"]
    assert [r["product_id"] for r in direct] == [r["product_id"] for r in batched]
    for a, b in zip(direct, batched, strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_every_forward_pass_runs_on_one_model_thread(make_client, tiny_reranker, count_calls):
    """torch's OpenMP pool is per calling thread: model calls must not wander over threads."""
    import concurrent.futures

    runner = count_calls(tiny_reranker)
    for settings in ({"batch_wait_ms": 0}, {}):
        runner.threads.clear()
        client = make_client(cache_size=0, **settings)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            posts = [pool.submit(client.post, "/rerank", json=body(3, query=f"q{i}")) for i in range(8)]
            answers = [f.result() for f in posts]
        assert all(a.status_code == 200 for a in answers)
        assert len(runner.threads) == 1, (settings, runner.threads)
        name = next(iter(runner.threads))
        assert name.startswith("esci-model" if settings else "esci-batcher")


def test_app_shutdown_stops_the_worker_and_a_restart_gets_a_new_one(tiny_reranker):
    app = create_app(load_settings(), tiny_reranker)
    state = app.state.service
    with TestClient(app) as client:
        assert client.post("/rerank", json=body(2)).status_code == 200
        first = state.scorer.batcher
    assert first.closed  # lifespan shutdown closed it
    with TestClient(app) as client:  # the same app started again serves with a fresh batcher
        assert client.post("/rerank", json=body(3)).status_code == 200
        assert state.scorer.batcher is not first
        assert not state.scorer.batcher.closed
    assert state.scorer.batcher.closed


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"batch_wait_ms": "-1"}, "BATCH_WAIT_MS='-1'"),
        ({"batch_wait_ms": "nan"}, "BATCH_WAIT_MS='nan'"),
        ({"max_batch_tokens": "0"}, "MAX_BATCH_TOKENS='0'"),
    ],
)
def test_invalid_batching_settings_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(**env)


def test_padded_tokens_is_rows_times_the_widest_row_per_input():
    assert padded_tokens(np.array([[3], [5], [4]])) == 15
    assert padded_tokens(np.array([[3, 2, 9], [5, 1, 1]])) == 2 * (5 + 2 + 9)
    assert padded_tokens(np.zeros((0, 1), np.int64)) == 0


def test_batcher_rejects_bad_arguments(tiny_reranker):
    with pytest.raises(ValueError, match="BATCH_WAIT_MS=0 means no batcher"):
        DynamicBatcher(tiny_reranker, 0, 100)
    with pytest.raises(ValueError, match="max_batch_tokens=0"):
        DynamicBatcher(tiny_reranker, 1.0, 0)


def test_metrics_are_defined_once_per_app():
    metrics = Metrics()
    metrics.observe_batch(pairs=12, padded_tokens=480)
    text = metrics.render().decode()
    assert "esci_batch_pairs_sum 12.0" in text
    assert "esci_batch_padded_tokens_sum 480.0" in text
