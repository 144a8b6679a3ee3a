"""Worker threads run below the event loop: the model's batcher, the tokenising and stacker
threads, and the OpenMP pools they start (a thread inherits its creator's nice value)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from esci_reranker.serve.batching import BatchInfo, DynamicBatcher
from esci_reranker.serve.priority import lower_this_thread, thread_niceness
from esci_reranker.serve.scoring import Scorer
from esci_reranker.serve.settings import SettingsError, load_settings


def in_new_thread(fn):
    """``fn()`` called on a fresh thread; its result."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(timeout=30)
    return out[0]


def test_a_thread_lowers_itself_once_and_its_children_inherit():
    base = thread_niceness()

    def lowered() -> tuple[bool, bool, int, int]:
        first, again = lower_this_thread(3), lower_this_thread(3)
        return first, again, thread_niceness(), in_new_thread(thread_niceness)

    first, again, own, child = in_new_thread(lowered)
    assert first is True
    assert again is False  # once per thread, not 3 more each call
    assert own == child == min(19, base + 3)
    assert thread_niceness() == base  # the caller's thread keeps its priority
    assert in_new_thread(lambda: lower_this_thread(0)) is False


def test_the_scorer_runs_the_model_and_its_post_processing_below_the_caller(tiny_reranker):
    base = thread_niceness()
    seen: list[int] = []

    def record(_: BatchInfo) -> None:
        seen.append(thread_niceness())

    batcher = DynamicBatcher(tiny_reranker, 5.0, 2048, on_batch=record, niceness=4)
    scorer = Scorer(tiny_reranker, batcher=batcher, niceness=4)
    try:
        result = asyncio.run(scorer.score_async("usb lunch box", ["lunch box | blue", "tv stick"]))
        assert len(result.predictions) == 2
        assert seen
        assert set(seen) == {min(19, base + 4)}
        post = scorer._cpu_threads.get().submit(thread_niceness).result(timeout=30)
        assert post == min(19, base + 4)
        assert thread_niceness() == base
    finally:
        scorer.close()


@pytest.mark.parametrize(("value", "ok"), [("0", True), ("19", True), ("-1", False), ("20", False)])
def test_worker_niceness_setting(monkeypatch, value, ok):
    monkeypatch.setenv("WORKER_NICENESS", value)
    if ok:
        assert load_settings().worker_niceness == int(value)
    else:
        with pytest.raises(SettingsError, match=f"WORKER_NICENESS='{value}'"):
            load_settings()
