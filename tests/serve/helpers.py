"""Helpers shared by the service tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from esci_reranker.reranker import Reranker


class CountingRunner:
    """Wraps ``Reranker.runner`` (a dependency of the service: one padded batch through the model)
    to count forward passes; both the direct and the dynamically batched path go through it."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls = 0
        self.pairs = 0
        self.threads: set[str] = set()

    def __call__(self, batch: Any) -> Any:
        self.calls += 1
        self.pairs += len(batch["input_ids"])
        self.threads.add(threading.current_thread().name)
        return self.fn(batch)


def body(n: int = 3, query: str = "red running shoes", **extra: Any) -> dict[str, Any]:
    """A /rerank-style request with ``n`` text candidates p0..p{n-1}."""
    texts = [
        "red running shoes | Nike | red",
        "blue cotton hat | Acme",
        "running shoe laces, red | Generic",
        "coffee mug 300 ml",
        "trail running shoes | Salomon | black",
    ]
    candidates = [{"product_id": f"p{i}", "text": texts[i % len(texts)] + f" #{i}"} for i in range(n)]
    return {"query": query, "candidates": candidates, **extra}


def _split(values: Any) -> float:
    """A cut through the middle third of ``values`` at its widest gap (far from every value, so
    float noise between scoring paths cannot move a product across it)."""
    import numpy as np

    v = np.sort(np.asarray(values, dtype=np.float64))
    lo, hi = len(v) // 3, 2 * len(v) // 3
    k = lo + int(np.argmax(np.diff(v[lo : hi + 1])))
    return float((v[k] + v[k + 1]) / 2)


def stacked_with_mixed_labels(
    checkpoint: Path, index: Path, query: str, size: int, top: int | None = None
) -> Reranker:
    """The tiny stacked model at ``checkpoint``, its decision rules moved so that the best ``top``
    (default: all) of the ``size`` products ``index`` retrieves for ``query`` get both E and I
    labels and both substitute flags (the fitted tiny stacker calls every product E and none a
    substitute)."""
    import numpy as np

    from esci_reranker.retrieval.index import CatalogueIndex

    reranker = Reranker.from_pretrained(checkpoint, device="cpu")
    if reranker.stacker is None:
        raise RuntimeError(f"{checkpoint} has no stacker")
    retrieved = CatalogueIndex.open(index).retrieve(query, size)
    preds = reranker.predict([(query, r.fields) for r in retrieved])
    best = np.argsort(-preds.scores, kind="stable")[:top]  # rules do not move the scores
    log_p = np.log(np.clip(preds.esci_probs[best].astype(np.float64), 1e-12, 1.0))
    rules = reranker.stacker.rules
    rules.class_offsets = [0.0, -50.0, -50.0, _split(log_p[:, 0] - log_p[:, 3])]  # E or I only
    rules.substitute_threshold = _split(preds.substitute_probs[best])
    return reranker


def asgi_client(app: Any) -> httpx.AsyncClient:
    """An async client calling ``app`` in this process (``async with asgi_client(app) as client``)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def rerank_tasks(client: httpx.AsyncClient, requests: int, candidates: int) -> list[asyncio.Task[Any]]:
    """``requests`` concurrent /rerank calls of ``candidates`` each, queries q0, q1, ... (running tasks)."""
    return [
        asyncio.create_task(client.post("/rerank", json=body(candidates, query=f"q{i}")))
        for i in range(requests)
    ]
