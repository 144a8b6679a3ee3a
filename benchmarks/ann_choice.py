"""usearch HNSW against faiss HNSW for the catalogue's dense vectors (a benchmark; needs faiss-cpu).

Reads the product vectors of an index (``dense.usearch``), and builds, for each library, an HNSW
index of the same graph degree (16) and construction depth (128) over (a) those real vectors and
(b) ``--synthetic`` vectors made from them (the mean of two random real vectors plus noise,
renormalised: catalogue-like clusters, at a larger size). Reports build time, index memory, p50
query time for the top 100 at search depth 128, and recall of the top 100 against an exact scan.

    pip install "esci-reranker[ann-bench]"     # faiss-cpu
    python benchmarks/ann_choice.py --index runs/default/index --synthetic 200000 --out runs/ann_choice.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

K, M, EF_ADD, EF_SEARCH = 100, 16, 128, 128


def real_vectors(index_dir: Path) -> np.ndarray:
    from usearch.index import Index

    index = Index.restore(str(index_dir / "dense.usearch"), view=True)
    keys = np.asarray(index.keys, dtype=np.int64)
    return np.asarray(index.get(keys), dtype=np.float32)


def synthetic(base: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        v = base[rng.integers(0, len(base), m)] + base[rng.integers(0, len(base), m)]
        v += rng.normal(0, 0.05, v.shape).astype(np.float32)
        out[start : start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def run_usearch(data: np.ndarray, queries: np.ndarray) -> dict[str, float | np.ndarray]:
    from usearch.index import Index

    index = Index(
        ndim=data.shape[1],
        metric="ip",
        dtype="f16",
        connectivity=M,
        expansion_add=EF_ADD,
        expansion_search=EF_SEARCH,
    )
    t = time.perf_counter()
    index.add(np.arange(len(data)), data)
    build = time.perf_counter() - t
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(np.asarray(index.search(q, K).keys))
        times.append(time.perf_counter() - t)
    return {
        "build_s": build,
        "query_ms_p50": 1000 * float(np.median(times)),
        "memory_mib": index.memory_usage / 2**20,
        "found": found,
    }


def run_faiss(data: np.ndarray, queries: np.ndarray) -> dict[str, float | np.ndarray]:
    import faiss

    index = faiss.IndexHNSWFlat(data.shape[1], M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_ADD
    t = time.perf_counter()
    index.add(data)
    build = time.perf_counter() - t
    index.hnsw.efSearch = EF_SEARCH
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(index.search(q[None, :], K)[1][0])
        times.append(time.perf_counter() - t)
    size = faiss.serialize_index(index).nbytes
    return {
        "build_s": build,
        "query_ms_p50": 1000 * float(np.median(times)),
        "memory_mib": size / 2**20,
        "found": found,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, required=True, help="an index folder whose vectors to use")
    parser.add_argument("--synthetic", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    try:
        import faiss  # noqa: F401  (checked before the minutes of usearch work, not after)
    except ImportError:
        raise SystemExit('ann_choice.py needs faiss-cpu: pip install "esci-reranker[ann-bench]"') from None
    real = real_vectors(args.index)
    results = {}
    for name, data in (("real", real), ("synthetic", synthetic(real, args.synthetic))):
        rng = np.random.default_rng(1)
        queries = data[rng.integers(0, len(data), args.queries)] + rng.normal(
            0, 0.02, (args.queries, data.shape[1])
        ).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exact = [np.argsort(-(data @ q))[:K] for q in queries]
        for library, fn in (("usearch", run_usearch), ("faiss", run_faiss)):
            out = fn(data, queries)
            found = out.pop("found")
            out["recall@100_vs_exact"] = float(
                np.mean([len(set(e) & set(f)) / K for e, f in zip(exact, found, strict=True)])
            )
            results[f"{name} ({len(data):,}) {library}"] = out
            print(
                f"{name:9s} {len(data):>8,} {library:8s} "
                + "  ".join(f"{k} {v:.3f}" for k, v in out.items()),
                flush=True,
            )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
