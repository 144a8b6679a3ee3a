"""Prometheus metrics of the service, defined once here, on a registry owned by each app.

A dedicated ``CollectorRegistry`` per app (not the process-global default) keeps apps built in
the same process (tests, several workers' imports) from sharing or double-registering series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

#: Seconds; a 1000-candidate request on a CPU can take several seconds.
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
#: Candidates scored in one model call.
BATCH_BUCKETS: Final[tuple[float, ...]] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
#: Padded tokens (rows × widest row) in one forward pass of the dynamic batcher.
TOKEN_BUCKETS: Final[tuple[float, ...]] = (
    64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072,
)  # fmt: skip
#: Label used for requests that matched no route (404s), so scanners cannot grow the label set.
UNMATCHED: Final[str] = "unmatched"


class _TowerCacheCollector:
    """Reads the model's tower-cache counters at scrape time (the cache counts, not the service)."""

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, int] | None] | None = None

    def collect(self) -> Iterator[Metric]:
        stats = self.source() if self.source is not None else None
        if stats is None:
            return
        yield CounterMetricFamily(
            "esci_tower_cache_hits", "Tower embeddings taken from the tower cache.", value=stats["hits"]
        )
        yield CounterMetricFamily(
            "esci_tower_cache_misses", "Tower embeddings computed (not in the cache).", value=stats["misses"]
        )
        yield GaugeMetricFamily(
            "esci_tower_cache_entries", "Texts whose tower embedding is cached.", value=stats["entries"]
        )


class Metrics:
    """Every series the service exports. ``render()`` is the body of ``GET /metrics``."""

    content_type: Final[str] = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # Every series goes to this app's registry, never prometheus_client's process-wide one.
        counter = partial(Counter, registry=r)
        gauge = partial(Gauge, registry=r)
        histogram = partial(Histogram, registry=r)
        self.requests = counter(
            "esci_http_requests_total",
            "HTTP requests by route template, method and status code.",
            ["endpoint", "method", "status"],
        )
        self.latency = histogram(
            "esci_http_request_duration_seconds",
            "Time from receiving a request to sending its last byte, by route template.",
            ["endpoint", "method"],
            buckets=LATENCY_BUCKETS,
        )
        self.in_flight = gauge("esci_http_requests_in_flight", "Requests being handled now.")
        self.model_forward = histogram(
            "esci_model_forward_seconds",
            "Model time of one request: its forward passes (shared with other requests when "
            "dynamic batching merges them), cache hits excluded.",
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = histogram(
            "esci_model_batch_candidates",
            "Candidates of one request scored by the model (see esci_batch_pairs for forward passes).",
            buckets=BATCH_BUCKETS,
        )
        self.batch_queue = gauge(
            "esci_batch_queue_pairs",
            "Pairs waiting in the dynamic-batching queue for a forward pass (0 when batching is off).",
        )
        self.batch_pairs = histogram(
            "esci_batch_pairs",
            "Pairs in one forward pass of the dynamic batcher (from one or more requests).",
            buckets=BATCH_BUCKETS,
        )
        self.batch_tokens = histogram(
            "esci_batch_padded_tokens",
            "Padded tokens (rows x widest row) in one forward pass of the dynamic batcher; "
            "bounded by MAX_BATCH_TOKENS.",
            buckets=TOKEN_BUCKETS,
        )
        self.retrieval = histogram(
            "esci_retrieval_seconds",
            "Time of one /search retrieval (BM25, query embedding, HNSW search, fusion), by mode.",
            ["mode"],
            buckets=LATENCY_BUCKETS,
        )
        self.cache_hits = counter("esci_cache_hits_total", "Requests answered from the response cache.")
        self.cache_misses = counter(
            "esci_cache_misses_total", "Requests the response cache could not answer."
        )
        self._tower_cache = _TowerCacheCollector()
        r.register(self._tower_cache)  # type: ignore[arg-type]
        self.model_loaded = gauge("esci_model_loaded", "1 once the model is loaded and warmed up, else 0.")
        # process_resident_memory_bytes, process_virtual_memory_bytes, process_cpu_seconds_total,
        # process_open_fds, ...: the standard process series, on this app's registry (Linux /proc).
        ProcessCollector(registry=r)
        self.queue_limit = gauge(
            "esci_max_queued_requests",
            "MAX_QUEUED_REQUESTS: model requests admitted at once before new ones get 429 (0: no bound).",
        )
        self.queue_admitted = gauge(
            "esci_queued_requests",
            "Model requests admitted now (waiting for or running in a forward pass, or being answered).",
        )
        self.queue_shed = counter(
            "esci_requests_shed",
            "Requests answered 429 at once because MAX_QUEUED_REQUESTS requests were in progress, by path.",
            ["endpoint"],
        )
        self.memory_limit = gauge(
            "esci_memory_limit_bytes", "MEMORY_LIMIT_MB in bytes (0: no memory policy)."
        )
        self.memory_trims = counter(
            "esci_memory_trims_total",
            "Times the memory policy handed malloc's free memory back to the OS (RSS over MEMORY_LIMIT_MB).",
        )
        self.memory_trimmed = counter(
            "esci_memory_trimmed_bytes_total", "Resident memory those trims released."
        )

    def watch_tower_cache(self, source: Callable[[], Mapping[str, int] | None]) -> None:
        """Export ``source()`` (``Reranker.tower_cache_stats``) as the tower-cache series."""
        self._tower_cache.source = source

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        """Count one finished request and record its latency."""
        self.requests.labels(endpoint=endpoint, method=method, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint, method=method).observe(seconds)

    def observe_forward(self, seconds: float, candidates: int) -> None:
        """Record one model call over ``candidates`` pairs."""
        self.model_forward.observe(seconds)
        self.batch_size.observe(candidates)

    def observe_retrieval(self, mode: str, seconds: float) -> None:
        """Record one catalogue retrieval."""
        self.retrieval.labels(mode=mode).observe(seconds)

    def observe_batch(self, pairs: int, padded_tokens: int) -> None:
        """Record one forward pass of the dynamic batcher."""
        self.batch_pairs.observe(pairs)
        self.batch_tokens.observe(padded_tokens)

    def render(self) -> bytes:
        """The exposition-format text of every series."""
        return generate_latest(self.registry)
