"""Resident memory (RSS) of the HTTP service under sustained load, per 30 s round, or where it goes
part by part (a benchmark, not a test).

For each configuration, starts ``esci-reranker serve`` on a free loopback port (a fresh process),
reads its idle RSS, then keeps 16 clients (``--concurrency``) sending /rerank requests of real ESCI
queries with 40 candidates each (the response cache off, so every request runs the model) for 4
rounds of 30 s, printing the server's RSS at the end of each round (and its highest sample), the
requests served and their p50/p95/p99 latency, how many were answered 429 (a client then waits the
``Retry-After`` it was given) and how fast, any 5xx, and ``/health`` probed twice a second. The
plateau is the highest RSS of the second half of the rounds. With ``--probe-interval 0.05``, one
more client in a process of its own sends a request every 50 ms from round 2 on: the load's clients
share one process, whose waits add to the latency they read, so the separate client's 429
latency is what a user elsewhere sees. The load generator's own CPU time is reported too.

    python benchmarks/serve_memory.py --model runs/default/model --out runs/serve_memory/default16.json
    python benchmarks/serve_memory.py --model runs/default/model --config default --concurrency 64 \
        --probe-interval 0.05
    python benchmarks/serve_memory.py --model runs/default/model \\
        --config default --config limit768=MEMORY_LIMIT_MB=768 --config off=MEMORY_LIMIT_MB=0
    python benchmarks/serve_memory.py --breakdown --model runs/default/model --out breakdown.json

``--config NAME[=VAR=VALUE[,VAR=VALUE...]]`` adds a configuration with those server environment
variables (default: ``default`` and ``no-policy`` = ``MEMORY_LIMIT_MB=0``). ``--breakdown``
accounts for the memory part by part in this process instead (``esci_reranker.bench.memory_breakdown``;
the settings from the environment). The load code is ``esci_reranker.bench.server_memory``. Both
keep the cores busy: run them on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _bare_rss() -> int:
    """This process's RSS in bytes, read before the benchmark imports anything heavy."""
    import os

    with open("/proc/self/statm", "rb") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# The breakdown's baseline: the interpreter alone (the imports below are lazy, for that reason).
BARE_RSS = _bare_rss()

#: ``--breakdown`` splits the libraries' memory by import, in this order, before the package
#: (whose ``bench`` imports torch) is imported: a module that another one imports counts where it
#: comes first. scipy.stats and scikit-learn come with torch's ``_dynamo`` and sympy with
#: ``torch.distributed.tensor`` when transformers loads them; imported on their own here, their
#: memory is told apart from torch's and transformers'.
LIBRARY_ORDER = (
    "numpy",
    "torch",
    "pandas",
    "scipy.stats",
    "sklearn",
    "sympy",
    "transformers",
    "lightgbm",
    "fastapi",
)


def import_account(modules: tuple[str, ...] = LIBRARY_ORDER) -> list[dict[str, object]]:
    """Import ``modules`` one at a time; the RSS each adds, in MiB (a missing one is left out)."""
    import importlib

    account: list[dict[str, object]] = []
    before = _bare_rss()
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        now = _bare_rss()
        account.append({"module": module, "rss_delta_mb": round((now - before) / 2**20, 1)})
        before = now
    return account


DEFAULT_CONFIGS = {"default": {}, "no-policy": {"MEMORY_LIMIT_MB": "0"}}


def parse_config(text: str) -> tuple[str, dict[str, str]]:
    """``NAME`` or ``NAME=VAR=VALUE,VAR=VALUE`` -> (name, environment)."""
    name, _, rest = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"--config {text!r}: expected NAME or NAME=VAR=VALUE[,VAR=VALUE]")
    env: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--config {text!r}: {item!r} is not VAR=VALUE")
        env[key] = value
    return name, env


def run_breakdown(args: argparse.Namespace) -> None:
    """``--breakdown``: ``esci_reranker.bench.memory_breakdown`` on ``--model``, table and JSON."""
    by_import = import_account()
    from esci_reranker.bench.memory_breakdown import format_breakdown, memory_breakdown
    from esci_reranker.bench.server import build_requests, finish_report
    from esci_reranker.data.sample import sample_path

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    block = memory_breakdown(
        args.model,
        lambda: build_requests(args.data or sample_path(), args.candidates, args.distinct),
        baseline_rss=BARE_RSS,
        by_import=by_import,
        echo=lambda line: print(line, flush=True),
    )
    finish_report(format_breakdown(block), args.out, "serve_memory_breakdown", args.model, block)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint folder (or Hub repo id) to serve")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--config",
        type=parse_config,
        action="append",
        default=None,
        help="NAME[=VAR=VALUE,...]: a server configuration (repeatable)",
    )
    parser.add_argument("--concurrency", type=int, default=16, help="clients (default 16)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per configuration (default 4)")
    parser.add_argument("--round-seconds", type=float, default=30.0, help="seconds per round (default 30)")
    parser.add_argument("--candidates", type=int, default=40, help="candidates per request (default 40)")
    parser.add_argument("--distinct", type=int, default=20, help="distinct queries cycled through")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=0.0,
        help="seconds between the requests of one more client in its own process, from round 2 on "
        "(its latencies are free of the load's own event loop; default 0: none)",
    )
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for /ready")
    parser.add_argument("--data", type=Path, default=None, help="ESCI parquet (default: the bundled sample)")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="account for the memory part by part in this process (the settings from the environment, "
        "as the service reads them) instead of running servers under load",
    )
    args = parser.parse_args(argv)
    if args.breakdown:
        run_breakdown(args)
        return
    from esci_reranker.bench.server import bench_from_args, finish_report
    from esci_reranker.bench.server_memory import ServerMemory, format_memory_table

    configs = dict(args.config) if args.config else DEFAULT_CONFIGS
    try:
        bench = bench_from_args(ServerMemory, args, configs=configs)
        block = bench(args.model)
    except ValueError as err:
        parser.error(str(err))
    finish_report(format_memory_table(block), args.out, "serve_memory", args.model, block)


if __name__ == "__main__":
    main()
