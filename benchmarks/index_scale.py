"""Catalogue index at scale: build time, peak memory, size on disk and /search latency (a benchmark).

For each size it writes a synthetic catalogue (never shipped: titles made of words, brands and
colours drawn from the bundled sample's products, plus a random model number, seeded), builds the
index with ``esci-reranker index`` in a subprocess (wall time, peak RSS of that process) and serves
it with ``esci-reranker serve`` (``INDEX_PATH``, response cache off) to time sequential
``POST /search`` requests of the sample's test queries (p50/p95 of the client-side latency, and
the server's retrieval time). ``sample`` as a size indexes the bundled sample's 6,613 products.

    python benchmarks/index_scale.py --sizes sample 20000 100000 --model runs/default/model \
        --retriever runs/retriever/model --work /tmp/index_scale --out runs/index_scale.json

Run it on an otherwise idle machine; full ESCI-US size is ``--sizes 1200000`` (the embedding of
1.2M products dominates: ~19 min on 2 cores with native bf16, ``--precision auto``; ~2.6 h in
fp32 on 2 AVX2 cores). ``--increment N`` builds a synthetic catalogue the
way a user with a large catalogue can: ``index`` on the first N products, then ``index --update``
with each next N; every increment is committed atomically, its wall time and peak RSS are saved
in ``WORK/index-SIZE.progress.json`` as it finishes, and a run started again with the same
arguments resumes after the last committed increment (a killed 3-hour build loses at most one):

    python benchmarks/index_scale.py --sizes 1200000 --increment 100000 --keep \
        --model runs/default/model --retriever runs/retriever/model --out runs/index_scale_1200k.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from esci_reranker.bench.server import Server
from esci_reranker.data.sample import sample_path
from esci_reranker.hardware import cpu_bf16_support, cpu_model
from esci_reranker.model.lexical import word_tokens

CHUNK = 50_000


def synthetic_catalogue(path: Path, size: int, seed: int = 0, parts: int | None = None) -> list[Path]:
    """``size`` products with sample-like fields, written in chunks (never all in memory).

    With ``parts``, the products go to one file per ``parts`` products (``path`` with
    ``-part-00000`` ... before the suffix) instead of one file (the same products as one file when
    ``parts`` is a multiple of the 50,000-product chunk); the list of files written is returned.
    """
    if parts is not None and parts <= 0:
        raise ValueError(f"--increment {parts}: expected a positive number of products.")
    chunk = CHUNK if parts is None else math.gcd(CHUNK, parts)
    sample = pd.read_parquet(sample_path()).drop_duplicates("product_id")
    words = np.array(sorted({w for t in sample["product_title"] for w in word_tokens(t) if len(w) > 2}))
    brands = sample["product_brand"].replace("", np.nan).dropna().unique()
    colors = sample["product_color"].replace("", np.nan).dropna().unique()
    rng = np.random.default_rng(seed)
    schema = pa.schema(
        [(c, pa.string()) for c in ("product_id", "product_title", "product_brand", "product_color")]
    )
    files: list[Path] = []
    writer: pq.ParquetWriter | None = None
    try:
        for start in range(0, size, chunk):
            if writer is None or (parts is not None and start % parts == 0):
                if writer is not None:
                    writer.close()
                file = path if parts is None else part_path(path, start // parts)
                writer = pq.ParquetWriter(file, schema)
                files.append(file)
            n = min(chunk, size - start)
            lengths = rng.integers(4, 14, n)
            titles = [
                " ".join(words[rng.integers(0, len(words), k)]).title() + f" {rng.integers(100, 99999)}"
                for k in lengths
            ]
            table = pa.table(
                {
                    "product_id": [f"SYN{start + i:09d}" for i in range(n)],
                    "product_title": titles,
                    "product_brand": brands[rng.integers(0, len(brands), n)].tolist(),
                    "product_color": colors[rng.integers(0, len(colors), n)].tolist(),
                },
                schema=schema,
            )
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return files


def part_path(path: Path, part: int) -> Path:
    return path.with_name(f"{path.stem}-part-{part:05d}{path.suffix}")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def build(
    products: Path | None,
    out: Path,
    retriever: str,
    batch_rows: int,
    update: bool = False,
    precision: str = "auto",
) -> dict[str, float]:
    """Build (or, with ``update``, add ``products`` to) an index in a subprocess; its wall time
    and its own peak RSS.

    The peak comes from ``os.wait4`` on that one child: ``getrusage(RUSAGE_CHILDREN)`` would be
    the maximum over every child so far, the previous size's server included.
    """
    script = Path(sys.executable).with_name("esci-reranker")
    if update:
        assert products is not None
        source = ["--update", str(products)]
    else:
        source = ["--products", str(products)] if products is not None else ["--sample"]
    command = [str(script), "index", *source, "--out", str(out)]
    command += ["--batch-rows", str(batch_rows), "--precision", precision]
    if not update:  # an update embeds with the retriever the manifest names
        command += ["--retriever", retriever]
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        seconds = time.perf_counter() - t
        stdout.seek(0)
        stderr.seek(0)
        out_text, err_text = stdout.read(), stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"index build failed:\n{err_text[-3000:]}")
    return {
        "build_seconds": seconds,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "log": out_text.strip().splitlines()[-1],
    }


def build_in_increments(args: argparse.Namespace, size: int, index: Path) -> dict[str, object]:
    """Index ``size`` synthetic products ``args.increment`` at a time, resuming after the last
    increment the index holds; the summed wall time and the largest peak RSS of the increments."""
    progress_file = args.work / f"index-{size}.progress.json"
    catalogue = args.work / f"catalogue-{size}.parquet"
    parts = [part_path(catalogue, i) for i in range(-(-size // args.increment))]
    progress: dict[str, object] = {
        "size": size,
        "increment": args.increment,
        "precision": args.precision,
        "increments": [],
    }
    if progress_file.is_file():
        progress = json.loads(progress_file.read_text())
        saved = (progress["size"], progress["increment"], progress.get("precision", "fp32"))
        if saved != (size, args.increment, args.precision):
            raise SystemExit(
                f"{progress_file} records a build of {saved[0]:,} in increments of {saved[1]:,} "
                f"embedded in {saved[2]}, not {size:,} in {args.increment:,} in {args.precision}; "
                f"remove it and {index} to start again."
            )
    elif index.exists():
        raise SystemExit(f"{index} exists without {progress_file}; remove it to start again.")
    done: list[dict[str, object]] = progress["increments"]  # type: ignore[assignment]
    if not all(p.is_file() for p in parts[len(done) :]):
        t = time.perf_counter()  # deterministic (seeded): the same products on every resume
        synthetic_catalogue(catalogue, size, parts=args.increment)
        progress.setdefault("generate_seconds", time.perf_counter() - t)
    indexed = json.loads((index / "manifest.json").read_text())["counts"]["products"] if index.exists() else 0
    if indexed < len(done) * args.increment and indexed < size:
        raise SystemExit(
            f"{progress_file} records {len(done)} increments but {index} holds {indexed:,} products; "
            "remove both to start again."
        )
    # An increment committed but killed before its timing was written: it is in the index.
    while len(done) * args.increment < min(indexed, size):
        done.append({"part": len(done), "build_seconds": None, "peak_rss_mib": None})
    for part in range(len(done), len(parts)):
        print(f"increment {part + 1}/{len(parts)}: {parts[part].name}", flush=True)
        timing = build(
            parts[part], index, args.retriever, args.batch_rows, update=part > 0, precision=args.precision
        )
        done.append({"part": part, **timing})
        progress_file.write_text(json.dumps(progress, indent=2) + "\n")
        print(f"  {timing['build_seconds']:.0f} s, peak RSS {timing['peak_rss_mib']:.0f} MiB", flush=True)
    timed = [d for d in done if d["build_seconds"] is not None]
    return {
        "increment": args.increment,
        "increments": done,
        "untimed_increments": len(done) - len(timed),
        "generate_seconds": progress.get("generate_seconds"),
        "build_seconds": sum(float(d["build_seconds"]) for d in timed),  # type: ignore[arg-type]
        "peak_rss_mib": max(float(d["peak_rss_mib"]) for d in timed),  # type: ignore[arg-type]
        "log": str(timed[-1]["log"]) if timed else "",
    }


def search_latency(model: str, index: Path, queries: list[str], requests: int) -> dict[str, float]:
    env = {"INDEX_PATH": str(index), "CACHE_SIZE": "0"}
    if "OMP_NUM_THREADS" in os.environ:
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    client_ms, retrieval_ms, forward_ms = [], [], []
    with Server(model, env=env, startup_timeout=900) as server, httpx.Client(timeout=120) as client:
        for i in range(requests + 3):
            body = {"query": queries[i % len(queries)], "top_k": 10, "candidates": 100}
            t = time.perf_counter()
            response = client.post(f"{server.url}/search", json=body)
            elapsed = (time.perf_counter() - t) * 1000
            response.raise_for_status()
            if i < 3:  # warm-up requests
                continue
            stats = response.json()["stats"]
            client_ms.append(elapsed)
            retrieval_ms.append(stats["retrieval_ms"])
            forward_ms.append(stats["model_forward_time_ms"])
    return {
        "search_p50_ms": float(np.percentile(client_ms, 50)),
        "search_p95_ms": float(np.percentile(client_ms, 95)),
        "retrieval_p50_ms": float(np.percentile(retrieval_ms, 50)),
        "rerank_forward_p50_ms": float(np.percentile(forward_ms, 50)),
        "requests": len(client_ms),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["sample", "20000"], help="'sample' or product counts")
    parser.add_argument("--model", default="runs/default/model")
    parser.add_argument("--retriever", default="packaged:all-MiniLM-L6-v2")
    parser.add_argument("--work", type=Path, default=Path("/tmp/index_scale"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--batch-rows", type=int, default=4096)
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="what `index --precision` embeds the products in (auto: bf16 where it is native)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the catalogues and indexes")
    parser.add_argument(
        "--increment",
        type=int,
        help="build synthetic sizes in increments of this many products (index, then index --update "
        "per increment), resumable after a kill",
    )
    args = parser.parse_args(argv)

    frame = pd.read_parquet(sample_path())
    queries = frame.loc[frame["split"] == "holdout", "query"].drop_duplicates().tolist()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        products = None
        row: dict[str, object] = {"size": size}
        index = args.work / f"index-{size}"
        if size != "sample" and args.increment:
            row |= build_in_increments(args, int(size), index)  # part files removed below
        else:
            if size != "sample":
                products = args.work / f"catalogue-{size}.parquet"
                t = time.perf_counter()
                synthetic_catalogue(products, int(size))
                row["generate_seconds"] = time.perf_counter() - t
            row |= build(products, index, args.retriever, args.batch_rows, precision=args.precision)
        manifest = json.loads((index / "manifest.json").read_text())
        row["products"] = manifest["counts"]["products"]
        row["embedding_precisions"] = manifest["retriever"].get("precisions", ["fp32"])
        row["index_mib"] = folder_bytes(index) / 2**20
        row["build_ms_per_product"] = 1000 * float(row["build_seconds"]) / row["products"]  # type: ignore[arg-type]
        row |= search_latency(args.model, index, queries, args.requests)
        rows.append(row)
        print(
            f"{size:>9}: {row['products']:,} products, build {row['build_seconds']:.0f} s "
            f"({row['build_ms_per_product']:.2f} ms/product), peak RSS {row['peak_rss_mib']:.0f} MiB, "
            f"index {row['index_mib']:.0f} MiB; /search p50 {row['search_p50_ms']:.0f} ms "
            f"(retrieval {row['retrieval_p50_ms']:.0f} ms, rerank {row['rerank_forward_p50_ms']:.0f} ms)",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(index, ignore_errors=True)
            if products is not None:
                products.unlink(missing_ok=True)
            for file in args.work.glob(f"catalogue-{size}-part-*.parquet"):
                file.unlink()
            (args.work / f"index-{size}.progress.json").unlink(missing_ok=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "benchmark": "index_scale",
                    "cpus": os.cpu_count(),
                    "cpu": cpu_model(),
                    "bf16_native": cpu_bf16_support()[0],
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
