"""Latency and throughput of the HTTP service (a benchmark that prints numbers, not a test).

Starts ``esci-reranker serve`` on a free loopback port for each setting, sends /rerank requests
of real ESCI queries with 40 candidates each (built from the bundled sample with
``product_texts``), and reports p50/p95/p99 latency and requests/s at each concurrency, with the
response cache off (``CACHE_SIZE=0``) and on (the default). Requests cycle through
``--distinct`` queries, so with the cache on every query after its first visit is a cache hit.

    python benchmarks/serve_latency.py --model runs/default/model --out runs/default/serve_latency.json

Each setting gets a fresh server process, so one setting's cache never serves another's requests.
Run it on an otherwise idle machine: the numbers measure the CPU the server gets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from esci_reranker.data.text import product_texts

SAMPLE = Path(__file__).resolve().parents[1] / "src/esci_reranker/data/sample/esci_us_sample.parquet"
SERVICE_ENV = ("API_KEY", "RATE_LIMIT", "CACHE_SIZE", "MAX_CANDIDATES", "MODEL_PATH", "HF_MODEL_REPO_ID")


@dataclass
class Result:
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


def build_requests(path: Path, candidates: int, distinct: int) -> list[dict[str, Any]]:
    """``distinct`` /rerank bodies: real queries, each with its first ``candidates`` judged products."""
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
        raise SystemExit(f"{path}: no query has {candidates} products; lower --candidates.")
    return bodies


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, env_extra: dict[str, str], timeout: float) -> subprocess.Popen:
    """``esci-reranker serve`` in a subprocess, returned once ``/ready`` answers 200."""
    script = Path(sys.executable).with_name("esci-reranker")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "esci_reranker.cli"]
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
    env.update({"LOG_LEVEL": "WARNING", **env_extra})
    proc = subprocess.Popen(
        [*command, "serve", "--model", model, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"server exited with {proc.returncode}:\n{proc.stderr.read() if proc.stderr else ''}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    stop_server(proc)
    raise SystemExit(f"server not ready within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def load(
    url: str, bodies: list[dict[str, Any]], concurrency: int, total: int, max_seconds: float
) -> tuple[list[float], int, list[bool], list[float], float]:
    """Send ``total`` requests (cycling through ``bodies``) from ``concurrency`` workers."""
    latencies: list[float] = []
    hits: list[bool] = []
    forward: list[float] = []
    errors = 0
    next_index = 0
    deadline = time.monotonic() + max_seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index, errors
        while next_index < total and time.monotonic() < deadline:
            index = next_index
            next_index += 1
            start = time.perf_counter()
            response = await client.post("/rerank", json=bodies[index % len(bodies)])
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
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        warm = {"query": "warm up", "candidates": bodies[0]["candidates"]}
        await client.post("/rerank", json=warm)  # first HTTP round trip, outside the numbers
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, errors, hits, forward, wall


def run_setting(
    args: argparse.Namespace, bodies: list[dict[str, Any]], cache: str, concurrency: int
) -> Result:
    port = args.port or _free_port()
    env = {"CACHE_SIZE": "0" if cache == "off" else str(args.cache_size)}
    proc = start_server(args.model, port, env, args.startup_timeout)
    try:
        latencies, errors, hits, forward, wall = asyncio.run(
            load(f"http://127.0.0.1:{port}", bodies, concurrency, args.requests, args.max_seconds)
        )
    finally:
        stop_server(proc)
    lat = np.asarray(latencies) if latencies else np.full(1, np.nan)
    return Result(
        cache=cache,
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        p50_ms=round(float(np.percentile(lat, 50)), 2),
        p95_ms=round(float(np.percentile(lat, 95)), 2),
        p99_ms=round(float(np.percentile(lat, 99)), 2),
        mean_ms=round(float(lat.mean()), 2),
        requests_per_s=round(len(latencies) / wall, 2) if wall > 0 else 0.0,
        cache_hit_rate=round(float(np.mean(hits)), 3) if hits else 0.0,
        server_forward_p50_ms=round(float(np.median(forward)), 2) if forward else 0.0,
        wall_s=round(wall, 2),
    )


def print_table(results: list[Result]) -> None:
    header = f"{'cache':>5} {'conc':>4} {'n':>4} {'err':>3} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>7} {'hits':>5} {'fwd p50':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.cache:>5} {r.concurrency:>4} {r.requests:>4} {r.errors:>3} {r.p50_ms:>8.1f} {r.p95_ms:>8.1f} "
            f"{r.p99_ms:>8.1f} {r.requests_per_s:>7.1f} {r.cache_hit_rate:>5.2f} {r.server_forward_p50_ms:>8.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint folder (or Hub repo id) to serve")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--requests", type=int, default=60, help="requests per setting (default 60)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8], help="client concurrency levels"
    )
    parser.add_argument("--cache", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--cache-size", type=int, default=256, help="CACHE_SIZE when the cache is on")
    parser.add_argument("--candidates", type=int, default=40, help="candidates per request (default 40)")
    parser.add_argument(
        "--distinct", type=int, default=20, help="distinct queries cycled through (default 20)"
    )
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time budget per setting")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for /ready")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--data", type=Path, default=SAMPLE, help="ESCI parquet with queries and products")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.candidates < 1 or args.distinct < 1 or min(args.concurrency) < 1:
        parser.error("--requests, --candidates, --distinct and --concurrency must be positive")

    bodies = build_requests(args.data, args.candidates, args.distinct)
    print(
        f"model {args.model}: {len(bodies)} queries x {args.candidates} candidates, "
        f"{args.requests} requests per setting",
        flush=True,
    )
    results = []
    for cache in args.cache:
        for concurrency in args.concurrency:
            results.append(run_setting(args, bodies, cache, concurrency))
            print(f"  done: cache {cache}, concurrency {concurrency}", flush=True)
    print_table(results)
    if args.out:
        report = {
            "benchmark": "serve_latency",
            "model": args.model,
            "endpoint": "/rerank",
            "candidates_per_request": args.candidates,
            "distinct_queries": len(bodies),
            "requests_per_setting": args.requests,
            "machine": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            },
            "results": [asdict(r) for r in results],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
