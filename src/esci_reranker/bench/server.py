"""Latency of the real HTTP service: ``/rerank`` p50/p99 for 40-candidate queries over loopback.

``ServerLatency(...)(model_dir)`` is the ``server_latency`` hook of ``bench.backends.run_backend_bench``
(``esci-reranker bench --server``); ``benchmarks/serve_latency.py`` is a command around the same
code. For each setting it starts ``esci-reranker serve`` in a fresh subprocess (uvicorn) on a free
127.0.0.1 port, waits for ``/ready``, sends ``/rerank`` requests of real ESCI queries with their
first 40 judged products (the bundled sample, text built with ``product_texts``) from N concurrent
clients, and stops the server (SIGINT, then kill). Each setting is bounded by a request count and
a time limit; the server is always terminated.

The default settings are the ones the service goals are stated for: the response cache off
(``CACHE_SIZE=0``) so every request runs the model, concurrency 1 and 8, dynamic batching off
(``BATCH_WAIT_MS=0``) and on (the service default). Latency is measured by the client, from
sending the request to reading the whole answer.

**Anchor.** Each setting is also timed against the bare library call: sentence-transformers
``CrossEncoder.predict`` in the benchmark's own process, on the same request bodies (one call per
body, its 40 pairs in one batch), with the server's thread count, on the checkpoint's stock export
as ``bench.backends.anchor_variant`` builds it (a checkpoint that is not a stock cross-encoder, such
as a stacked model, gets its encoder with a fresh 1-label head, and the JSON and the table say what
the service computes beyond it). It runs right before the setting's server starts and right after
it stops, so the two share the machine's state; ``p50_vs_anchor = p50_ms / anchor_p50_ms`` (below
1: the whole HTTP path costs less than the bare library call).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import numpy as np

#: The service goal for a 40-candidate ``/rerank`` at concurrency 1 (docs/speed.md).
P50_GOAL_MS: Final[float] = 150.0
#: Dynamic batching settings compared: off (``BATCH_WAIT_MS=0``) and the service default.
BATCHING: Final[tuple[str, ...]] = ("off", "on")
#: Values of the service's ``PRECISION`` setting.
PRECISIONS: Final[tuple[str, ...]] = ("auto", "fp32", "bf16", "int8")


@dataclass(frozen=True)
class LatencyResult:
    """One setting's numbers (milliseconds unless named otherwise)."""

    batching: str
    cache: str
    concurrency: int
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    requests_per_s: float
    cache_hit_rate: float
    server_forward_p50_ms: float
    wall_s: float
    stopped_by_time_limit: bool
    #: Median in-process ``CrossEncoder.predict`` time on the same bodies (None: no anchor).
    anchor_p50_ms: float | None = None
    #: ``p50_ms / anchor_p50_ms`` (None: no anchor).
    p50_vs_anchor: float | None = None


def build_requests(path: str | Path, candidates: int = 40, distinct: int = 20) -> list[dict[str, Any]]:
    """``distinct`` /rerank bodies: real queries, each with its first ``candidates`` judged products.

    Raises:
        ValueError: no query of the file has ``candidates`` products with text.
    """
    import pandas as pd

    from esci_reranker.data.text import product_texts

    frame = pd.read_parquet(path)
    frame = frame.assign(text=product_texts(frame).to_numpy())
    frame = frame[frame["text"].str.strip() != ""].drop_duplicates(["query_id", "product_id"])
    bodies = []
    for _, group in frame.sort_values(["query_id", "product_id"]).groupby("query_id", sort=True):
        if len(group) < candidates:
            continue
        rows = group.head(candidates)
        bodies.append(
            {
                "query": str(rows["query"].iloc[0]),
                "candidates": [
                    {"product_id": str(pid), "text": str(text)}
                    for pid, text in zip(rows["product_id"], rows["text"], strict=True)
                ],
            }
        )
        if len(bodies) == distinct:
            break
    if not bodies:
        raise ValueError(f"{path}: no query has {candidates} products with text; ask for fewer candidates.")
    return bodies


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _service_variables() -> set[str]:
    from esci_reranker.serve.settings import Settings

    return {name.upper() for name in Settings.model_fields}


class Server:
    """``esci-reranker serve --model MODEL`` on 127.0.0.1 in a subprocess; a context manager that
    waits for ``/ready`` on entry and always stops the process on exit.

    The service's own variables (API_KEY, RATE_LIMIT, ...) are removed from the inherited
    environment; ``env`` sets the ones the setting needs.
    """

    def __init__(
        self, model: str | Path, env: Mapping[str, str] | None = None, startup_timeout: float = 180.0
    ) -> None:
        self.model = str(model)
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the process and wait until ``/ready`` answers 200.

        Raises:
            RuntimeError: the server exited, or was not ready within ``startup_timeout`` seconds
                (the message has the end of its log).
        """

        script = Path(sys.executable).with_name("esci-reranker")
        command = [str(script)] if script.exists() else [sys.executable, "-m", "esci_reranker.cli"]
        drop = _service_variables()
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update({"LOG_LEVEL": "WARNING", **self.env})
        self.port = free_port()
        # The log goes to a file, not a pipe nobody reads, so a chatty server can never block on it.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*command, "serve", "--model", self.model, "--host", "127.0.0.1", "--port", str(self.port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with status {self.proc.returncode}:\n{self.log_tail()}"
                )
            if answers_ready(self.url):
                return
            time.sleep(0.25)
        raise RuntimeError(
            f"the server was not ready within {self.startup_timeout:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGINT (uvicorn's graceful shutdown), then kill if it takes longer than 20 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's output."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-chars:]


async def send_load(
    url: str, bodies: Sequence[Mapping[str, Any]], concurrency: int, total: int, max_seconds: float
) -> dict[str, Any]:
    """Send up to ``total`` /rerank requests (cycling through ``bodies``) from ``concurrency``
    clients, stopping early at ``max_seconds``; one untimed warm-up request per client first."""
    import httpx

    latencies: list[float] = []
    hits: list[bool] = []
    forward: list[float] = []
    errors = 0
    next_index = 0
    deadline = time.monotonic() + max_seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index, errors
        while next_index < total and time.monotonic() < deadline:
            index = next_index
            next_index += 1
            start = time.perf_counter()
            try:
                response = await client.post("/rerank", json=bodies[index % len(bodies)])
            except httpx.HTTPError:
                errors += 1
                continue
            elapsed = (time.perf_counter() - start) * 1000.0
            if response.status_code != 200:
                errors += 1
                continue
            latencies.append(elapsed)
            stats = response.json()["stats"]
            hits.append(bool(stats["cache_hit"]))
            if not stats["cache_hit"]:
                forward.append(float(stats["model_forward_time_ms"]))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(max(max_seconds, 10.0))
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        warm = [{"query": f"warm up {i}", "candidates": bodies[0]["candidates"]} for i in range(concurrency)]
        await asyncio.gather(*(client.post("/rerank", json=w) for w in warm))  # connections, first calls
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "latencies": latencies,
        "errors": errors,
        "hits": hits,
        "forward": forward,
        "wall": wall,
        "timed_out": next_index < total,
    }


def summarize(
    batching: str,
    cache: str,
    concurrency: int,
    load: Mapping[str, Any],
    anchor_ms: Sequence[float] = (),
) -> LatencyResult:
    """Percentiles and rates of one ``send_load`` run, and its ratio to the anchor's median
    (``anchor_ms``: the setting's in-process ``CrossEncoder.predict`` times; empty: no anchor)."""
    latencies = load["latencies"]
    lat = np.asarray(latencies, dtype=np.float64) if latencies else np.full(1, np.nan)
    wall = float(load["wall"])
    p50 = round(float(np.percentile(lat, 50)), 2)
    anchor_p50 = round(float(np.median(anchor_ms)), 2) if len(anchor_ms) else None
    # The ratio of the two rounded numbers the JSON shows, so a reader can check it.
    ratio = round(p50 / anchor_p50, 3) if anchor_p50 and latencies else None
    return LatencyResult(
        batching=batching,
        cache=cache,
        concurrency=concurrency,
        requests=len(latencies),
        errors=int(load["errors"]),
        p50_ms=p50,
        p95_ms=round(float(np.percentile(lat, 95)), 2),
        p99_ms=round(float(np.percentile(lat, 99)), 2),
        mean_ms=round(float(lat.mean()), 2),
        requests_per_s=round(len(latencies) / wall, 2) if wall > 0 else 0.0,
        cache_hit_rate=round(float(np.mean(load["hits"])), 3) if load["hits"] else 0.0,
        server_forward_p50_ms=round(float(np.median(load["forward"])), 2) if load["forward"] else 0.0,
        wall_s=round(wall, 2),
        stopped_by_time_limit=bool(load["timed_out"]),
        anchor_p50_ms=anchor_p50,
        p50_vs_anchor=ratio,
    )


def _sample_path() -> Path:
    from esci_reranker.data.sample import sample_path

    return Path(sample_path())


#: The scoring call of the anchor: ``predict(queries, texts)`` on one request's pairs.
AnchorPredict = Callable[[list[str], list[str]], Any]


def service_extras(model_dir: str | Path) -> list[str]:
    """What the service computes for a pair beyond a plain cross-encoder's one encoder pass.

    Empty for a checkpoint whose st-cross-encoder export is the whole model; otherwise the parts a
    ``CrossEncoder`` anchor on its encoder lacks (bi-encoder prior towers, the lexical feature,
    the list transformer, the stacker), so the anchor can be labelled for what it is.
    """
    from esci_reranker.model.config import LISTWISE
    from esci_reranker.model.io import checkpoint_files

    files = checkpoint_files(model_dir)
    config = files.config
    extras = []
    if config.prior != "none":
        extras.append(f"the {config.prior} prior's query and product towers")
    if config.lexical:
        extras.append("the lexical feature")
    if config.model_type == LISTWISE:
        extras.append("the list transformer over the candidates")
    if files.stacked:
        extras.append("the stacker (trees and decision rules)")
    return extras


def load_anchor(
    model_dir: str | Path, workdir: Path, batch_size: int
) -> tuple[AnchorPredict | None, dict[str, Any]]:
    """The bare library call each setting is compared with: ``CrossEncoder.predict`` in this process.

    Built by ``bench.backends.anchor_variant`` (the backend benchmark's anchor): the checkpoint's
    st-cross-encoder export when there is one, else its encoder with a fresh 1-label head.

    Args:
        model_dir: the served checkpoint folder.
        workdir: where the export is written (CrossEncoder holds the weights once loaded).
        batch_size: pairs per forward pass (the benchmark passes a request's candidate count).

    Returns:
        ``predict`` (None when the anchor cannot run) and the JSON ``anchor`` block: ``status``
        (``ok``, ``skipped`` or ``failed``, with a ``reason``), and when ok ``kind``, ``note``,
        ``detail``, ``service_extras`` and ``label`` (the table's one-line description).
    """
    from esci_reranker.bench.backends import anchor_variant
    from esci_reranker.model.io import checkpoint_files

    path = Path(model_dir)
    if not path.is_dir():
        return None, {
            "status": "skipped",
            "reason": f"{model_dir}: the anchor needs a local checkpoint folder",
        }
    try:
        max_length = checkpoint_files(path).config.max_length
        variant, info = anchor_variant(path, workdir, max_length, batch_size)
        extras = service_extras(path) if variant is not None else []
    except Exception as err:  # e.g. an ONNX folder or the llm family: the server numbers still count
        return None, {"status": "failed", "reason": f"{type(err).__name__}: {err}"}
    if variant is None:
        return None, info
    info = {"status": "ok", **info, "service_extras": extras}
    if info["kind"] == "export":
        info["label"] = "the st-cross-encoder export of the checkpoint (the same weights)"
    else:
        info["label"] = (
            "the checkpoint's encoder with a fresh 1-label head (the model has no stock "
            "cross-encoder export: anchor.export_error in the JSON)"
        )
    if extras:
        info["label"] += (
            f"; the service also runs {', '.join(extras)}, which the anchor does not, so "
            "p50/anchor includes their cost, not only the HTTP path's"
        )
    return variant.predict, info


@dataclass
class ServerLatency:
    """The server part of the benchmark (a ``bench.backends.ServerLatencyBench``): call it with a model folder.

    Attributes:
        concurrency: client concurrency levels.
        batching: ``"off"`` (``BATCH_WAIT_MS=0``) and/or ``"on"`` (``batch_wait_ms``).
        cache: ``"off"`` (``CACHE_SIZE=0``, every request runs the model) and/or ``"on"``.
        requests: timed requests per setting.
        max_seconds: time limit per setting (the load stops early; the JSON says so).
        candidates: candidates per request.
        distinct: distinct queries cycled through.
        threads: ``OMP_NUM_THREADS`` of the server (None: inherited).
        precision: ``PRECISION`` of the server (``auto``, ``fp32``, ``bf16``, ``int8``; None: the default).
        tower_cache_size: ``TOWER_CACHE_SIZE`` of the server. 0 (the default here, unlike the
            service's) makes every request encode its products' towers: the cold case.
        batch_wait_ms: ``BATCH_WAIT_MS`` when batching is on (None: the service default).
        max_batch_tokens: ``MAX_BATCH_TOKENS`` when batching is on (None: the service default).
        cache_size: ``CACHE_SIZE`` when the cache is on.
        startup_timeout: seconds to wait for ``/ready``.
        data: parquet with the queries and products (default: the bundled sample).
        anchor: also time ``CrossEncoder.predict`` in this process on the same bodies (see the
            module docstring); needs sentence-transformers and a local checkpoint folder.
        anchor_calls: anchor calls right before each setting's server starts and as many right
            after it stops (cycling through the bodies: the default 10 + 10 covers the 20 distinct
            queries once).
        echo: progress lines (None: silent).
    """

    concurrency: Sequence[int] = (1, 8)
    batching: Sequence[str] = BATCHING
    cache: Sequence[str] = ("off",)
    requests: int = 60
    max_seconds: float = 120.0
    candidates: int = 40
    distinct: int = 20
    threads: int | None = None
    precision: str | None = None
    tower_cache_size: int = 0
    batch_wait_ms: float | None = None
    max_batch_tokens: int | None = None
    cache_size: int = 256
    startup_timeout: float = 180.0
    data: str | Path | None = None
    anchor: bool = True
    anchor_calls: int = 10
    echo: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.tower_cache_size, bool)
            or not isinstance(self.tower_cache_size, int)
            or self.tower_cache_size < 0
        ):
            raise ValueError(
                f"ServerLatency tower_cache_size={self.tower_cache_size!r}; expected an integer >= 0."
            )
        for name in ("requests", "candidates", "distinct", "anchor_calls"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerLatency {name}={getattr(self, name)}; expected a positive integer.")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(
                f"ServerLatency concurrency={list(self.concurrency)}; expected positive integers."
            )
        if not self.max_seconds > 0:
            raise ValueError(f"ServerLatency max_seconds={self.max_seconds}; expected > 0.")
        if self.precision not in (None, *PRECISIONS):
            raise ValueError(
                f"ServerLatency precision={self.precision!r}; expected one of {list(PRECISIONS)}."
            )
        for name, values in (("batching", self.batching), ("cache", self.cache)):
            bad = [v for v in values if v not in ("off", "on")]
            if bad or not values:
                raise ValueError(f"ServerLatency {name}={list(values)}; expected a subset of ['off', 'on'].")

    def env(self, batching: str, cache: str) -> dict[str, str]:
        """The server's environment variables for one setting."""
        env = {"CACHE_SIZE": "0" if cache == "off" else str(self.cache_size)}
        if batching == "off":
            env["BATCH_WAIT_MS"] = "0"
        else:
            if self.batch_wait_ms is not None:
                env["BATCH_WAIT_MS"] = str(self.batch_wait_ms)
            if self.max_batch_tokens is not None:
                env["MAX_BATCH_TOKENS"] = str(self.max_batch_tokens)
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        if self.precision is not None:
            env["PRECISION"] = self.precision
        env["TOWER_CACHE_SIZE"] = str(self.tower_cache_size)
        return env

    def __call__(self, model_dir: str | Path) -> dict[str, Any]:
        """Run every setting on ``model_dir``; returns the JSON-ready ``server_latency`` block.

        It has ``status``, the run settings, ``anchor`` (what the in-process anchor is, or why it
        is missing), ``results`` (one ``LatencyResult`` per setting, with ``anchor_p50_ms`` and
        ``p50_vs_anchor``) and, for the cache-off settings,
        ``concurrency_N -> batching_off/on -> {p50_ms, p99_ms, anchor_p50_ms, p50_vs_anchor, ...}``.
        A setting whose server fails to start is recorded with its error; the others still run.
        """
        try:
            import httpx  # noqa: F401  (the client)
            import uvicorn  # noqa: F401  (the server)
        except ImportError as err:
            return {"status": "skipped", "reason": f"needs the 'serve' extra ({err})"}
        from esci_reranker.serve.settings import Settings

        say = self.echo or (lambda _line: None)
        defaults = Settings.model_fields
        bodies = build_requests(self.data or _sample_path(), self.candidates, self.distinct)
        results: list[LatencyResult] = []
        failures: list[dict[str, Any]] = []
        with _AnchorClock(self, model_dir, bodies) as anchor:
            for cache in self.cache:
                for batching in self.batching:
                    for concurrency in self.concurrency:
                        env = self.env(batching, cache)
                        anchor_ms = anchor.time(0)  # right before this setting's server starts
                        try:
                            with Server(model_dir, env, self.startup_timeout) as server:
                                load = asyncio.run(
                                    send_load(
                                        server.url, bodies, concurrency, self.requests, self.max_seconds
                                    )
                                )
                        except RuntimeError as err:
                            failures.append(
                                {
                                    "batching": batching,
                                    "cache": cache,
                                    "concurrency": concurrency,
                                    "error": str(err),
                                }
                            )
                            say(
                                f"  server failed (batching {batching}, cache {cache}, "
                                f"concurrency {concurrency})"
                            )
                            continue
                        anchor_ms += anchor.time(self.anchor_calls)  # right after it stopped
                        result = summarize(batching, cache, concurrency, load, anchor_ms)
                        results.append(result)
                        versus = (
                            f" (anchor {result.anchor_p50_ms:.1f} ms, {result.p50_vs_anchor:.2f}x)"
                            if result.p50_vs_anchor is not None
                            else ""
                        )
                        say(
                            f"  batching {batching}, cache {cache}, concurrency {concurrency}: "
                            f"p50 {result.p50_ms:.1f} ms{versus}, p99 {result.p99_ms:.1f} ms, "
                            f"{result.requests_per_s:.1f} req/s ({result.requests} requests, "
                            f"{result.errors} errors)"
                        )
        block: dict[str, Any] = {
            "status": "ok" if results else "failed",
            "endpoint": "/rerank",
            "candidates_per_request": self.candidates,
            "distinct_queries": len(bodies),
            "requests_per_setting": self.requests,
            "max_seconds_per_setting": self.max_seconds,
            "server_threads": self.threads if self.threads is not None else os.environ.get("OMP_NUM_THREADS"),
            "precision": self.precision or defaults["precision"].default,
            "tower_cache_size": self.tower_cache_size,
            "batch_wait_ms_on": self.batch_wait_ms
            if self.batch_wait_ms is not None
            else defaults["batch_wait_ms"].default,
            "max_batch_tokens": self.max_batch_tokens
            if self.max_batch_tokens is not None
            else "service default (CPU 4096, GPU 16384)",
            "latency": "client-side, request sent to answer read, over 127.0.0.1; cache off = every "
            "request runs the model; tower_cache_size 0 = every product goes through its tower",
            "p50_goal_ms": P50_GOAL_MS,
            "anchor": anchor.info,
            "results": [asdict(r) for r in results],
        }
        if failures:
            block["failures"] = failures
        for r in results:
            if r.cache == "off":
                block.setdefault(f"concurrency_{r.concurrency}", {})[f"batching_{r.batching}"] = {
                    "p50_ms": r.p50_ms,
                    "p99_ms": r.p99_ms,
                    "requests_per_s": r.requests_per_s,
                    "requests": r.requests,
                    "errors": r.errors,
                    "anchor_p50_ms": r.anchor_p50_ms,
                    "p50_vs_anchor": r.p50_vs_anchor,
                }
        return block


class _AnchorClock:
    """The anchor of one ``ServerLatency`` run: loaded on entry (with the server's thread count set
    on this process's torch, restored on exit), then ``time(start)`` per half-setting."""

    def __init__(self, bench: ServerLatency, model_dir: str | Path, bodies: Sequence[Mapping[str, Any]]):
        self.bench = bench
        self.model_dir = model_dir
        self.bodies = bodies
        self.predict: AnchorPredict | None = None
        self.info: dict[str, Any] = {"status": "skipped", "reason": "ServerLatency(anchor=False)"}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._threads: int | None = None

    def __enter__(self) -> _AnchorClock:
        if not self.bench.anchor:
            return self
        import torch

        self._threads = torch.get_num_threads()
        # The server's thread count: OMP_NUM_THREADS=threads when set, else it inherits this
        # process's environment and so picks the same torch default as this process.
        threads = self.bench.threads or self._threads
        torch.set_num_threads(threads)
        self._tmp = tempfile.TemporaryDirectory(prefix="esci-bench-anchor-")
        self.predict, self.info = load_anchor(self.model_dir, Path(self._tmp.name), self.bench.candidates)
        if self.predict is not None:
            self.info |= {
                "what": "sentence-transformers CrossEncoder.predict in the benchmark's process, fp32, "
                "on the same request bodies: one call per body, its pairs in one batch",
                "threads": threads,
                "batch_size": self.bench.candidates,
                "calls_per_setting": 2 * self.bench.anchor_calls,
                "timing": "half right before the setting's server starts, half right after it stops; "
                "anchor_p50_ms is their median, after one untimed warm-up call",
            }
            self.time(0, 1)  # warm-up: thread pool, first-call allocations
        return self

    def __exit__(self, *exc: object) -> None:
        if self._threads is not None:
            import torch

            torch.set_num_threads(self._threads)
        if self._tmp is not None:
            self._tmp.cleanup()

    def time(self, start: int, calls: int | None = None) -> list[float]:
        """Milliseconds of ``calls`` (default ``anchor_calls``) predict calls, one per body,
        cycling from body ``start``; empty without an anchor."""
        if self.predict is None:
            return []
        times = []
        for i in range(self.bench.anchor_calls if calls is None else calls):
            body = self.bodies[(start + i) % len(self.bodies)]
            texts = [str(c["text"]) for c in body["candidates"]]
            queries = [str(body["query"])] * len(texts)
            began = time.perf_counter()
            self.predict(queries, texts)
            times.append((time.perf_counter() - began) * 1000.0)
        return times


def format_server_table(block: Mapping[str, Any]) -> str:
    """The ``server_latency`` block as a fixed-width text table."""
    if block.get("status") != "ok":
        reason = block.get("reason") or "; ".join(
            f["error"].splitlines()[0] for f in block.get("failures", [])
        )
        return f"server latency: {block.get('status', 'not measured')}" + (f" ({reason})" if reason else "")
    header = (
        "batching", "cache", "conc", "n", "err", "p50 ms", "p95 ms", "p99 ms", "req/s", "fwd p50",
        "anchor ms", "p50/anchor",
    )  # fmt: skip
    rows = [
        (
            r["batching"],
            r["cache"],
            str(r["concurrency"]),
            str(r["requests"]),
            str(r["errors"]),
            f"{r['p50_ms']:.1f}",
            f"{r['p95_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['requests_per_s']:.1f}",
            f"{r['server_forward_p50_ms']:.1f}",
            f"{r['anchor_p50_ms']:.1f}" if r.get("anchor_p50_ms") is not None else "-",
            f"{r['p50_vs_anchor']:.2f}" if r.get("p50_vs_anchor") is not None else "-",
        )
        for r in block["results"]
    ]
    lines = fixed_width(header, rows)
    lines.append(
        f"/rerank, {block['candidates_per_request']} candidates, over loopback; goal: p50 <= "
        f"{block['p50_goal_ms']:.0f} ms at concurrency 1 (cache off)"
    )
    lines.append(_anchor_footer(block.get("anchor", {})))
    return "\n".join(lines)


def _anchor_footer(anchor: Mapping[str, Any]) -> str:
    """What the anchor columns mean, or why they are empty."""
    if anchor.get("status") != "ok":
        return f"anchor: not measured ({anchor.get('reason', 'no anchor in this result')})"
    return (
        f"anchor: sentence-transformers CrossEncoder.predict in the benchmark's process (fp32, "
        f"threads {anchor['threads']}, one request's {anchor['batch_size']} pairs in one batch, "
        f"{anchor['calls_per_setting']} calls around each setting) on {anchor['label']}\n"
        "p50/anchor = p50 / anchor p50 (below 1.00: the whole HTTP path costs less than the bare library call)"
    )


def fixed_width(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a right-aligned text table: the header, then one line per row."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]


def write_report(path: str | Path, benchmark: str, model: str, block: Mapping[str, Any]) -> None:
    """Write a server benchmark's ``block`` as JSON with the benchmark's name, the model and the machine."""
    import json
    import platform

    report = {
        "benchmark": benchmark,
        "model": model,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        **block,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def finish_report(
    table: str, path: str | Path | None, benchmark: str, model: str, block: Mapping[str, Any]
) -> None:
    """Print a server benchmark's ``table`` and, with a ``path``, write its ``block`` there (``write_report``)."""
    print(table)
    if path:
        write_report(path, benchmark, model, block)
        print(f"wrote {path}")


_Bench = TypeVar("_Bench")


def bench_from_args(cls: type[_Bench], args: Any, **given: Any) -> _Bench:
    """A benchmark dataclass ``cls`` from a command's parsed ``args``: each field named like an
    argument takes its value, ``given`` the rest (and any whose name differs); progress lines print.
    """
    values = vars(args)
    settings = {f.name: values[f.name] for f in fields(cls) if f.init and f.name in values}  # type: ignore[arg-type]
    return cls(**{**settings, "echo": lambda line: print(line, flush=True), **given})


def answers_ready(url: str) -> bool:
    """Whether the service at ``url`` answers ``/ready`` with 200 now (False while it cannot be reached)."""
    import httpx  # the client: part of the serve extra

    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
