"""Resident memory of the HTTP service under sustained load: RSS per round and where it levels off.

``ServerMemory(...)(model_dir)`` starts ``esci-reranker serve`` (a fresh process per configuration,
``bench.server.Server``), reads its idle RSS once it is ready, then keeps ``concurrency`` clients
sending ``/rerank`` requests (real ESCI queries, 40 candidates each, the response cache off) for
``rounds`` rounds of ``round_seconds``. The server's RSS (``/proc/PID/status``: ``VmRSS``, and
its anonymous and file-backed parts) is sampled every ``sample_seconds``; each round reports the
RSS at its end and its highest sample, the requests served and their p50/p95 latency. The
**plateau** is the highest RSS sampled in the second half of the rounds (steady state, after the
growth of the first ones). Linux only (``/proc``).

The load's clients share one process, one event loop and one connection pool, so the latency
they measure includes that process's waits: with 64 of them, a ``429`` the server sent within
milliseconds can be read a few hundred milliseconds later. A **separate client** (``probe_interval``) therefore
runs in its own process beside the load, one request at a time as an outside user would, and its
latencies are reported apart (``ProbeOutcome``).

``benchmarks/serve_memory.py`` is the command around it (docs/serving.md, "Memory").
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from esci_reranker.bench.server import Server, build_requests, fixed_width

MIB: Final[int] = 1024 * 1024
#: The service's memory goal: steady-state RSS at or below 1 GB under 16 clients (cache off).
RSS_GOAL_MB: Final[float] = 1024.0


def read_rss(pid: int) -> dict[str, int] | None:
    """``VmRSS``, ``RssAnon`` and ``RssFile`` of process ``pid`` in bytes (None once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024  # kB
    return out if "VmRSS" in out else None


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a daemon thread; ``samples`` holds
    ``(monotonic time, VmRSS, RssAnon, RssFile)`` tuples."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> tuple[float, int, int, int] | None:
        """Take one sample now (also called by the round loop at round ends)."""
        rss = read_rss(self.pid)
        if rss is None:
            return None
        row = (time.monotonic(), rss["VmRSS"], rss.get("RssAnon", 0), rss.get("RssFile", 0))
        with self._lock:
            self.samples.append(row)
        return row

    def between(self, start: float, end: float) -> list[tuple[float, int, int, int]]:
        with self._lock:
            return [s for s in self.samples if start <= s[0] <= end]


@dataclass(frozen=True)
class Round:
    """One round of load (MB are MiB)."""

    round: int
    seconds: float
    requests: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    shed: int
    rss_end_mb: float
    rss_max_mb: float
    anon_end_mb: float
    file_end_mb: float


@dataclass(frozen=True)
class LoadOutcome:
    """How every request of the load was answered, and the health probe during it.

    Attributes:
        statuses: HTTP status -> count (``"error"``: no answer, a transport error or timeout).
        shed: 429 answers; a client then waits ``Retry-After`` seconds before its next request.
        shed_without_retry_after: 429 answers that lacked a usable ``Retry-After``.
        shed_p50_ms / shed_p99_ms / shed_max_ms: how fast the 429s came.
        server_errors: 5xx answers.
        health_checks / health_failures: ``GET /health`` every ``health_seconds`` during the load,
            and how many did not answer 200 within 5 s.
    """

    statuses: dict[str, int]
    shed: int
    shed_without_retry_after: int
    shed_p50_ms: float
    shed_p99_ms: float
    shed_max_ms: float
    server_errors: int
    health_checks: int
    health_failures: int


@dataclass(frozen=True)
class ProbeOutcome:
    """What one client in its own process saw during the load (latencies in ms).

    Attributes:
        requests: requests it sent (one at a time, ``interval`` apart).
        statuses: HTTP status -> count (``"error"``: no answer).
        shed: its 429 answers; shed_p50_ms / shed_p99_ms / shed_max_ms: how fast they came.
        ok_p50_ms / ok_p99_ms: its 200 answers' latency.
    """

    requests: int
    statuses: dict[str, int]
    shed: int
    shed_p50_ms: float
    shed_p99_ms: float
    shed_max_ms: float
    ok_p50_ms: float
    ok_p99_ms: float

    @classmethod
    def of(cls, answers: Sequence[tuple[str, float]]) -> ProbeOutcome:
        """Summarise ``(status, latency ms)`` answers."""
        shed = [ms for status, ms in answers if status == "429"]
        ok = [ms for status, ms in answers if status == "200"]
        return cls(
            requests=len(answers),
            statuses=dict(sorted(Counter(status for status, _ in answers).items())),
            shed=len(shed),
            shed_p50_ms=_pct(shed, 50),
            shed_p99_ms=_pct(shed, 99),
            shed_max_ms=round(max(shed), 2) if shed else float("nan"),
            ok_p50_ms=_pct(ok, 50),
            ok_p99_ms=_pct(ok, 99),
        )


def probe_requests(
    url: str, body: Mapping[str, Any], seconds: float, interval: float, delay: float = 0.0
) -> list[tuple[str, float]]:
    """Send ``body`` to ``url``'s ``/rerank`` one request at a time for ``seconds`` (after ``delay``;
    at least one request), ``interval`` seconds apart; returns each answer's ``(status, latency ms)`` (``"error"``: none).

    Run in a process of its own (``ServerMemory`` does), its clock holds only the server's time
    and the network's, not the waits of other clients sharing its process."""
    import httpx

    time.sleep(delay)
    answers: list[tuple[str, float]] = []
    with httpx.Client(base_url=url, timeout=httpx.Timeout(300.0)) as client:
        stop = time.monotonic() + seconds
        while not answers or time.monotonic() < stop:  # at least one request
            start = time.perf_counter()
            try:
                status = str(client.post("/rerank", json=body).status_code)
            except httpx.HTTPError:
                status = "error"
            answers.append((status, (time.perf_counter() - start) * 1000.0))
            time.sleep(interval)
    return answers


@dataclass(frozen=True)
class MemoryResult:
    """One configuration: its environment, idle RSS, rounds and plateau (MB are MiB)."""

    name: str
    env: dict[str, str]
    idle_rss_mb: float
    idle_anon_mb: float
    rounds: list[Round]
    plateau_rss_mb: float
    peak_rss_mb: float
    requests: int
    errors: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    steady_p50_ms: float
    steady_p95_ms: float
    p99_ms: float
    steady_p99_ms: float
    load: LoadOutcome
    server_memory: dict[str, Any] | None = field(default=None)
    probe: ProbeOutcome | None = field(default=None)
    #: CPU seconds the load generator (this process: clients, sampler) used during the load, and
    #: the share of the host's CPU time over the load that is: on a small host it competes with
    #: the server for the same cores, which a real client elsewhere would not.
    generator_cpu_s: float = float("nan")
    generator_cpu_share: float = float("nan")


def _pct(values: Sequence[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else float("nan")


async def _load_rounds(
    url: str,
    bodies: Sequence[Mapping[str, Any]],
    concurrency: int,
    rounds: int,
    round_seconds: float,
    sampler: RssSampler,
    on_round: Callable[[Round], None],
    health_seconds: float = 0.5,
) -> tuple[list[Round], list[tuple[float, float]], LoadOutcome]:
    """Keep ``concurrency`` clients busy for ``rounds`` × ``round_seconds`` (a client told 429 waits
    its ``Retry-After``, as a well-behaved client does) while probing ``/health``; returns the
    rounds, every 200's ``(finish time, latency ms)`` and how every request was answered."""
    import httpx

    done: list[tuple[float, float]] = []
    errors: list[float] = []
    shed: list[tuple[float, float]] = []  # (finish time, latency ms) of the 429s
    statuses: Counter[str] = Counter()
    no_retry_after = 0
    health = [0, 0]  # checks, failures
    next_index = 0
    stop = time.monotonic() + rounds * round_seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index, no_retry_after
        while time.monotonic() < stop:
            body = bodies[next_index % len(bodies)]
            next_index += 1
            start = time.perf_counter()
            try:
                response = await client.post("/rerank", json=body)
            except httpx.HTTPError:
                statuses["error"] += 1
                errors.append(time.monotonic())
                continue
            ms = (time.perf_counter() - start) * 1000.0
            statuses[str(response.status_code)] += 1
            if response.status_code == 200:
                done.append((time.monotonic(), ms))
                continue
            errors.append(time.monotonic())
            if response.status_code == 429:
                shed.append((time.monotonic(), ms))
                retry = response.headers.get("Retry-After", "")
                if not retry.isdigit():
                    no_retry_after += 1
                await asyncio.sleep(
                    min(float(retry) if retry.isdigit() else 1.0, max(0.0, stop - time.monotonic()))
                )

    async def health_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            health[0] += 1
            try:
                response = await client.get("/health", timeout=5.0)
                health[1] += response.status_code != 200
            except httpx.HTTPError:
                health[1] += 1
            await asyncio.sleep(health_seconds)

    async def rounds_loop(start: float) -> list[Round]:
        out = []
        for index in range(rounds):
            end = start + (index + 1) * round_seconds
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            last = sampler.sample()
            begin = start + index * round_seconds
            lat = [ms for t, ms in done if begin <= t < end]
            samples = sampler.between(begin, end + 0.01)
            row = Round(
                round=index + 1,
                seconds=round_seconds,
                requests=len(lat),
                errors=sum(begin <= t < end for t in errors),
                p50_ms=_pct(lat, 50),
                p95_ms=_pct(lat, 95),
                p99_ms=_pct(lat, 99),
                shed=sum(begin <= t < end for t, _ in shed),
                rss_end_mb=round(last[1] / MIB, 1) if last else float("nan"),
                rss_max_mb=round(max(s[1] for s in samples) / MIB, 1) if samples else float("nan"),
                anon_end_mb=round(last[2] / MIB, 1) if last else float("nan"),
                file_end_mb=round(last[3] / MIB, 1) if last else float("nan"),
            )
            on_round(row)
            out.append(row)
        return out

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with (
        httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits) as client,
        httpx.AsyncClient(base_url=url) as probe,
    ):
        start = time.monotonic()
        stop = start + rounds * round_seconds
        results = await asyncio.gather(
            rounds_loop(start), health_loop(probe), *(client_loop(client) for _ in range(concurrency))
        )
    shed_ms = [ms for _, ms in shed]
    outcome = LoadOutcome(
        statuses=dict(sorted(statuses.items())),
        shed=len(shed),
        shed_without_retry_after=no_retry_after,
        shed_p50_ms=_pct(shed_ms, 50),
        shed_p99_ms=_pct(shed_ms, 99),
        shed_max_ms=round(max(shed_ms), 2) if shed_ms else float("nan"),
        server_errors=sum(n for code, n in statuses.items() if code.startswith("5")),
        health_checks=health[0],
        health_failures=health[1],
    )
    return results[0], done, outcome


@dataclass
class ServerMemory:
    """The memory benchmark: call it with a model folder.

    Attributes:
        configs: name -> the server's extra environment variables, one server per entry, e.g.
            ``{"default": {}, "limit-1024": {"MEMORY_LIMIT_MB": "1024"}}``.
        concurrency: clients sending requests back to back.
        rounds: rounds of load per configuration.
        round_seconds: length of one round.
        candidates: candidates per request.
        distinct: distinct queries cycled through (the response cache is off, so every request runs
            the model).
        idle_seconds: how long the ready server is left idle before its idle RSS is read.
        sample_seconds: RSS sampling interval.
        threads: ``OMP_NUM_THREADS`` of the server (None: inherited).
        startup_timeout: seconds to wait for ``/ready``.
        probe_interval: pause between the separate client's requests, in seconds (0: no separate
            client). It starts after the first round, when the load is steady, and stops with the
            load; it is one client more than ``concurrency``.
        data: parquet with the queries and products (default: the bundled sample).
        echo: progress lines (None: silent).
    """

    configs: Mapping[str, Mapping[str, str]]
    concurrency: int = 16
    rounds: int = 4
    round_seconds: float = 30.0
    candidates: int = 40
    distinct: int = 20
    idle_seconds: float = 3.0
    sample_seconds: float = 0.5
    threads: int | None = None
    startup_timeout: float = 180.0
    probe_interval: float = 0.0
    data: str | Path | None = None
    echo: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if not self.configs:
            raise ValueError("ServerMemory configs is empty; give at least one name -> environment.")
        for name in ("concurrency", "rounds", "candidates", "distinct"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerMemory {name}={getattr(self, name)}; expected a positive integer.")
        for name in ("round_seconds", "sample_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerMemory {name}={getattr(self, name)}; expected > 0.")
        if not self.probe_interval >= 0:
            raise ValueError(
                f"ServerMemory probe_interval={self.probe_interval}; expected >= 0 (0: no separate client)."
            )

    def env(self, extra: Mapping[str, str]) -> dict[str, str]:
        """The server's environment for one configuration: the response cache off, then ``extra``."""
        env = {"CACHE_SIZE": "0"}
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return {**env, **extra}

    def run_one(
        self, model_dir: str | Path, name: str, extra: Mapping[str, str], bodies: Any
    ) -> MemoryResult:
        """Start a server with ``extra``, measure idle then loaded RSS, stop it."""
        import httpx

        say = self.echo or (lambda _line: None)
        env = self.env(extra)
        with Server(model_dir, env, self.startup_timeout) as server:
            if server.proc is None:
                raise RuntimeError("the server process did not start")
            pid = server.proc.pid
            # One request warms every code path (tokeniser, stacker) before the idle reading.
            httpx.post(f"{server.url}/rerank", json=bodies[0], timeout=120).raise_for_status()
            time.sleep(self.idle_seconds)
            idle = read_rss(pid) or {"VmRSS": 0, "RssAnon": 0}
            say(f"[{name}] idle RSS {idle['VmRSS'] / MIB:.0f} MiB (anon {idle.get('RssAnon', 0) / MIB:.0f})")

            def report(row: Round) -> None:
                say(
                    f"[{name}] round {row.round}: RSS end {row.rss_end_mb:.0f} MiB, max {row.rss_max_mb:.0f} "
                    f"(anon {row.anon_end_mb:.0f}, file {row.file_end_mb:.0f}); {row.requests} requests, "
                    f"p50 {row.p50_ms:.0f} ms, p95 {row.p95_ms:.0f} ms, p99 {row.p99_ms:.0f} ms, "
                    f"{row.shed} answered 429, {row.errors} not 200"
                )

            with contextlib.ExitStack() as stack:
                sampler = stack.enter_context(RssSampler(pid, self.sample_seconds))
                probe = None
                if self.probe_interval > 0 and self.rounds > 1:
                    # spawn, not fork: a fork of this process would copy the load's threads' state
                    pool = stack.enter_context(
                        ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
                    )
                    seconds = (self.rounds - 1) * self.round_seconds
                    probe = pool.submit(
                        probe_requests,
                        server.url,
                        bodies[0],
                        seconds,
                        self.probe_interval,
                        self.round_seconds,
                    )
                cpu_start = time.process_time()
                rounds, done, outcome = asyncio.run(
                    _load_rounds(
                        server.url, bodies, self.concurrency, self.rounds, self.round_seconds, sampler, report
                    )
                )
                generator_cpu = time.process_time() - cpu_start
                probe_outcome = ProbeOutcome.of(probe.result()) if probe is not None else None
                say(f"[{name}] load generator: {generator_cpu:.0f} CPU s during the load")
                if probe_outcome is not None:
                    say(
                        f"[{name}] separate client: {probe_outcome.requests} requests {probe_outcome.statuses}; "
                        f"429 p50 {probe_outcome.shed_p50_ms} / p99 {probe_outcome.shed_p99_ms} / "
                        f"max {probe_outcome.shed_max_ms} ms"
                    )
                start = sampler.samples[0][0] if sampler.samples else time.monotonic()
                half = start + (self.rounds // 2) * self.round_seconds
                steady = [s[1] for s in sampler.samples if s[0] >= half] or [s[1] for s in sampler.samples]
                peak = max((s[1] for s in sampler.samples), default=0)
            server_memory = None
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                server_memory = httpx.get(f"{server.url}/info", timeout=30).json()["service"].get("memory")
        latencies = [ms for _, ms in done]
        steady_lat = [ms for t, ms in done if t >= half]
        total_s = self.rounds * self.round_seconds
        return MemoryResult(
            name=name,
            env=dict(env),
            idle_rss_mb=round(idle["VmRSS"] / MIB, 1),
            idle_anon_mb=round(idle.get("RssAnon", 0) / MIB, 1),
            rounds=rounds,
            plateau_rss_mb=round(max(steady) / MIB, 1) if steady else float("nan"),
            peak_rss_mb=round(peak / MIB, 1),
            requests=len(latencies),
            errors=sum(outcome.statuses.values()) - len(latencies),
            requests_per_s=round(len(latencies) / total_s, 2),
            p50_ms=_pct(latencies, 50),
            p95_ms=_pct(latencies, 95),
            steady_p50_ms=_pct(steady_lat, 50),
            steady_p95_ms=_pct(steady_lat, 95),
            p99_ms=_pct(latencies, 99),
            steady_p99_ms=_pct(steady_lat, 99),
            load=outcome,
            server_memory=server_memory,
            probe=probe_outcome,
            generator_cpu_s=round(generator_cpu, 1),
            generator_cpu_share=round(generator_cpu / (total_s * (os.cpu_count() or 1)), 3),
        )

    def __call__(self, model_dir: str | Path) -> dict[str, Any]:
        """Run every configuration on ``model_dir``; returns the JSON-ready report."""
        from esci_reranker.data.sample import sample_path

        if not Path("/proc/self/status").exists():
            return {"status": "skipped", "reason": "needs Linux /proc to read the server's RSS"}
        bodies = build_requests(self.data or sample_path(), self.candidates, self.distinct)
        results: list[dict[str, Any]] = []
        failures: list[dict[str, str]] = []
        for name, extra in self.configs.items():
            try:
                results.append(asdict(self.run_one(model_dir, name, extra, bodies)))
            except RuntimeError as err:
                failures.append({"name": name, "error": str(err)})
                (self.echo or (lambda _line: None))(f"[{name}] server failed: {str(err).splitlines()[0]}")
        block: dict[str, Any] = {
            "status": "ok" if results else "failed",
            "endpoint": "/rerank",
            "concurrency": self.concurrency,
            "rounds": self.rounds,
            "round_seconds": self.round_seconds,
            "candidates_per_request": self.candidates,
            "distinct_queries": len(bodies),
            "response_cache": "off (CACHE_SIZE=0)",
            "plateau": "highest RSS sampled in the second half of the rounds",
            "rss_goal_mb": RSS_GOAL_MB,
            "results": results,
        }
        if failures:
            block["failures"] = failures
        return block


def format_memory_table(block: Mapping[str, Any]) -> str:
    """One line per configuration: idle, plateau and peak RSS, throughput and latency."""
    if block.get("status") != "ok":
        return f"server memory: {block.get('status')} ({block.get('reason') or block.get('failures')})"
    header = (
        "config",
        "idle MiB",
        "plateau MiB",
        "r3 MiB",
        "r4 MiB",
        "req/s",
        "p50 ms",
        "p99 ms",
        "steady p50",
        "steady p99",
        "429s",
        "429 p99 / max ms",
        "own client: 429s, p99 / max ms",
        "5xx",
        "health fails",
        "generator CPU",
    )
    rows = [
        (
            r["name"],
            f"{r['idle_rss_mb']:.0f}",
            f"{r['plateau_rss_mb']:.0f}",
            f"{r['rounds'][2]['rss_end_mb']:.0f}" if len(r["rounds"]) > 2 else "-",
            f"{r['rounds'][3]['rss_end_mb']:.0f}" if len(r["rounds"]) > 3 else "-",
            f"{r['requests_per_s']:.2f}",
            f"{r['p50_ms']:.0f}",
            f"{r['p99_ms']:.0f}",
            f"{r['steady_p50_ms']:.0f}",
            f"{r['steady_p99_ms']:.0f}",
            str(r["load"]["shed"]),
            f"{r['load']['shed_p99_ms']:.0f} / {r['load']['shed_max_ms']:.0f}" if r["load"]["shed"] else "-",
            _probe_cell(r.get("probe")),
            str(r["load"]["server_errors"]),
            f"{r['load']['health_failures']}/{r['load']['health_checks']}",
            f"{r.get('generator_cpu_share', float('nan')):.0%}",
        )
        for r in block["results"]
    ]
    lines = fixed_width(header, rows)
    lines.append(
        f"/rerank, {block['candidates_per_request']} candidates, {block['concurrency']} clients, cache off, "
        f"{block['rounds']} x {block['round_seconds']:.0f} s; plateau = {block['plateau']}; "
        f"goal <= {block['rss_goal_mb']:.0f} MiB; own client: one more client in its own process, "
        "from round 2 on; generator CPU: the load generator's share of the host's CPU time"
    )
    return "\n".join(lines)


def _probe_cell(probe: Mapping[str, Any] | None) -> str:
    if not probe:
        return "-"
    if not probe["shed"]:
        return f"0 of {probe['requests']}"
    return f"{probe['shed']} of {probe['requests']}, {probe['shed_p99_ms']:.0f} / {probe['shed_max_ms']:.0f}"
