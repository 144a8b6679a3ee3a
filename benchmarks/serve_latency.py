"""Latency and throughput of the HTTP service (a benchmark that prints numbers, not a test).

Starts ``esci-reranker serve`` on a free loopback port for each setting, sends /rerank requests
of real ESCI queries with 40 candidates each (built from the bundled sample with
``product_texts``), and reports p50/p95/p99 latency and requests/s at each concurrency, with
dynamic batching off (``BATCH_WAIT_MS=0``) and on (the default), and the response cache off
(``CACHE_SIZE=0``) and on. Requests cycle through ``--distinct`` queries, so with the cache on
every query after its first visit is a cache hit.

    python benchmarks/serve_latency.py --model runs/default/model --out runs/default/serve_latency.json

The code is ``esci_reranker.bench.server`` (also run by ``esci-reranker bench --server``). Each
setting gets a fresh server process, so one setting's cache never serves another's requests.
Run it on an otherwise idle machine: the numbers measure the CPU the server gets.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from esci_reranker.bench.server import (
    BATCHING,
    PRECISIONS,
    ServerLatency,
    bench_from_args,
    finish_report,
    format_server_table,
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
    parser.add_argument(
        "--batching",
        nargs="+",
        choices=list(BATCHING),
        default=list(BATCHING),
        help="dynamic batching off (BATCH_WAIT_MS=0) and/or on (the service default)",
    )
    parser.add_argument(
        "--cache", nargs="+", choices=["off", "on"], default=["off", "on"], help="CACHE_SIZE=0 and/or on"
    )
    parser.add_argument("--cache-size", type=int, default=256, help="CACHE_SIZE when the cache is on")
    parser.add_argument("--candidates", type=int, default=40, help="candidates per request (default 40)")
    parser.add_argument(
        "--distinct", type=int, default=20, help="distinct queries cycled through (default 20)"
    )
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    parser.add_argument(
        "--tower-cache",
        type=int,
        default=0,
        help="TOWER_CACHE_SIZE of the server (default 0: every product through its tower, the cold case)",
    )
    parser.add_argument(
        "--precision", choices=list(PRECISIONS), default=None, help="PRECISION of the server (default auto)"
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="MAX_BATCH_TOKENS when batching is on (default: the service's)",
    )
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time budget per setting")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for /ready")
    parser.add_argument("--data", type=Path, default=None, help="ESCI parquet (default: the bundled sample)")
    args = parser.parse_args(argv)
    try:
        bench = bench_from_args(ServerLatency, args, tower_cache_size=args.tower_cache)
    except ValueError as err:
        parser.error(str(err))
    print(
        f"model {args.model}: /rerank with {args.candidates} candidates, {args.requests} requests per setting"
    )
    try:
        block = bench(args.model)
    except ValueError as err:  # e.g. --data has no query with --candidates products
        parser.error(str(err))
    finish_report(format_server_table(block), args.out, "serve_latency", args.model, block)


if __name__ == "__main__":
    main()
