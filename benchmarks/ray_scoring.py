"""Throughput of batch scoring: one process (`esci-reranker score`) against Ray Data actors.

    python benchmarks/ray_scoring.py --model runs/default/model --pairs 200000 --out ray_scoring.json

The input is a synthetic table of ``--pairs`` (query, product) pairs recombined from the bundled
sample's real queries and product texts (train and dev rows only), written to a temporary folder
and deleted afterwards (never shipped). Each setting runs as a fresh ``esci-reranker score``
process on that table:

- ``single``: ``--engine single`` (one process, torch on all ``--cores`` threads);
- ``ray-1x{cores}``: ``--engine ray --num-actors 1 --num-cpus-per-actor {cores}``;
- ``ray-{cores}x1``: ``--engine ray --num-actors {cores} --num-cpus-per-actor 1``.

For each it records wall time (from launch to exit, so model loading and Ray's start are in),
pairs/s over that time, the output row count (must equal the input's), and the peak resident
memory of every process of the run (sampled every 0.2 s with psutil), reported for the driver and
per Ray actor. Ray's fixed cost (cluster start, actor start, the rejects pass, the output checks)
is measured by the same Ray run on a ``--small`` table; the per-actor rate is then
``(pairs - small) / (wall - wall_small) / actors``, the number to multiply by the actors of a
bigger cluster. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq

from esci_reranker.data.sample import sample_path

PRODUCT_COLUMNS = ["product_title", "product_brand", "product_color"]


def synthetic_pairs(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` pairs: a real query of the sample with a real product of the sample, drawn at random.

    Holdout (test) rows are left out, so nothing of the test split is read.
    """
    frame = pd.read_parquet(sample_path())
    frame = frame[frame["split"] != "holdout"]
    queries = frame["query"].drop_duplicates().to_numpy()
    products = frame.drop_duplicates("product_id")[PRODUCT_COLUMNS].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    q = rng.integers(0, len(queries), n)
    p = rng.integers(0, len(products), n)
    out = products.iloc[p].reset_index(drop=True)
    out.insert(0, "example_id", np.arange(n, dtype=np.int64))
    out.insert(1, "query_id", q.astype(np.int64))
    out.insert(2, "query", queries[q])
    out.insert(3, "product_id", [f"P{i:06d}" for i in p])
    return out


class PeakMemory:
    """Samples the RSS of a process and all its descendants; keeps each process's peak."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.root = psutil.Process(pid)
        self.every = every
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                    name = " ".join(proc.cmdline())[:120] or proc.name()
                except psutil.Error:
                    continue
                old = self.peaks.get(proc.pid, ("", 0))
                self.peaks[proc.pid] = (name, max(old[1], rss))
            self._stop.wait(self.every)

    def stop(self) -> dict[int, tuple[str, int]]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def run_setting(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one ``esci-reranker score`` and measure wall time and memory."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = PeakMemory(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    peaks = memory.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{err[-3000:]}")
    actors = [rss for name, rss in peaks.values() if "MapWorker" in name or "BatchScorer" in name]
    return {
        "wall_seconds": wall,
        "driver_peak_mib": peaks.get(proc.pid, ("", 0))[1] / 2**20,
        "actor_peak_mib": [round(r / 2**20, 1) for r in sorted(actors, reverse=True)],
        "stdout": out.strip().splitlines()[-1] if out.strip() else "",
    }


def output_rows(path: Path) -> int:
    """Rows in a parquet file or in every parquet file under a folder."""
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Checkpoint folder to score with.")
    parser.add_argument("--pairs", type=int, default=200_000, help="Pairs in the synthetic table.")
    parser.add_argument("--small", type=int, default=2_000, help="Pairs of the fixed-cost Ray run.")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="Cores to use.")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", type=Path, default=Path("ray_scoring.json"))
    args = parser.parse_args(argv)

    exe = Path(sys.executable).with_name("esci-reranker")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "esci_reranker.cli"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    settings = {
        "single": ["--engine", "single"],
        f"ray-1x{args.cores}": [
            "--engine",
            "ray",
            "--num-actors",
            "1",
            "--num-cpus-per-actor",
            str(args.cores),
        ],
        f"ray-{args.cores}x1": [
            "--engine",
            "ray",
            "--num-actors",
            str(args.cores),
            "--num-cpus-per-actor",
            "1",
        ],
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ray-scoring-bench-") as tmp:
        work = Path(tmp)
        tables = {}
        for name, n in (("big", args.pairs), ("small", args.small)):
            tables[name] = work / f"{name}.parquet"
            synthetic_pairs(n, seed=0 if name == "big" else 1).to_parquet(
                tables[name], index=False, row_group_size=10_000
            )
        for name, options in settings.items():
            row: dict[str, Any] = {}
            for size in ("big", "small") if name != "single" else ("big",):
                out = work / f"out-{name}-{size}" / ("scores.parquet" if name == "single" else "")
                command = [
                    *cli, "score", "--model", str(args.model), "--input", str(tables[size]), "--output", str(out),
                    "--batch-size", str(args.batch_size), "--precision", args.precision, "--device", "cpu",
                    "--no-progress", *options,
                ]  # fmt: skip
                print(f"{name} on {size}: {' '.join(command[len(cli) :])}", flush=True)
                measured = run_setting(command, env)
                rows = output_rows(out if name == "single" else out / "scores")
                expected = args.pairs if size == "big" else args.small
                if rows != expected:
                    raise RuntimeError(f"{name}: {rows} output rows for {expected} input rows")
                if name != "single":
                    summary = json.loads((out / "summary.json").read_text())
                    measured["ray_start_seconds"] = summary["ray_start_seconds"]
                    measured["rejected_rows"] = summary["rejected_rows"]
                measured["output_rows"] = rows
                row[size] = measured
            big = row["big"]
            row["pairs_per_second"] = args.pairs / big["wall_seconds"]
            if "small" in row:
                actors = int(options[options.index("--num-actors") + 1])
                steady = (args.pairs - args.small) / (big["wall_seconds"] - row["small"]["wall_seconds"])
                row["fixed_cost_seconds"] = row["small"]["wall_seconds"] - args.small / steady
                row["steady_pairs_per_second"] = steady
                row["per_actor_pairs_per_second"] = steady / actors
            results[name] = row

    report = {
        "model": str(args.model),
        "pairs": args.pairs,
        "small": args.small,
        "cores": args.cores,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "settings": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{args.pairs:,} pairs, {args.cores} cores, batch {args.batch_size}, {args.precision}")
    print(f"{'setting':12s} {'wall s':>8s} {'pairs/s':>8s} {'steady':>8s} {'/actor':>8s} {'fixed s':>8s} "
          f"{'ray.init s':>10s} {'driver MiB':>10s}  actor peak MiB")  # fmt: skip
    for name, row in results.items():
        big = row["big"]
        print(
            f"{name:12s} {big['wall_seconds']:8.1f} {row['pairs_per_second']:8.1f} "
            f"{row.get('steady_pairs_per_second', float('nan')):8.1f} "
            f"{row.get('per_actor_pairs_per_second', float('nan')):8.1f} "
            f"{row.get('fixed_cost_seconds', float('nan')):8.1f} {big.get('ray_start_seconds', float('nan')):10.1f} "
            f"{big['driver_peak_mib']:10.0f}  {big['actor_peak_mib']}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
