"""Helpers shared by the service tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import httpx


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


def asgi_client(app: Any) -> httpx.AsyncClient:
    """An async client calling ``app`` in this process (``async with asgi_client(app) as client``)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def rerank_tasks(client: httpx.AsyncClient, requests: int, candidates: int) -> list[asyncio.Task[Any]]:
    """``requests`` concurrent /rerank calls of ``candidates`` each, queries q0, q1, ... (running tasks)."""
    return [
        asyncio.create_task(client.post("/rerank", json=body(candidates, query=f"q{i}")))
        for i in range(requests)
    ]
