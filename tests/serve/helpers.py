"""Helpers shared by the service tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


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
