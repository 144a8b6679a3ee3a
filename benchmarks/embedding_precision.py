"""Product embedding in fp32 against bf16 autocast: speed and what it changes (a benchmark).

``index --precision auto`` embeds a catalogue in bf16 where the CPU (AMX, AVX-512 BF16) or GPU
computes it natively. This measures, in one process and interleaved round by round, products per
second of the retriever in fp32 and in bf16 on the bundled sample's 6,613 real product texts, and
what bf16 does to the vectors and to dense retrieval for the sample's 41 test queries (queries
embedded in fp32, as the index does; exact inner-product search over all products):

- cosine between each product's fp32 and bf16 vector (min, mean);
- overlap of each query's top 100 under fp32 and bf16 product vectors;
- Recall@100 of the query's labelled E products under each.

    python benchmarks/embedding_precision.py --retriever runs/retriever/model \
        --out runs/embedding_precision.json

On a CPU without native bf16 the bf16 rows are emulated and slow; the script says so and still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from esci_reranker.data.sample import sample_path
from esci_reranker.data.text import product_texts
from esci_reranker.hardware import cpu_bf16_support, cpu_model
from esci_reranker.retrieval.encoder import PACKAGED_RETRIEVER, DenseEncoder

TOP = 100


def recall_at(scores: np.ndarray, relevant: list[set[int]], k: int) -> float:
    """Mean over queries of the share of a query's relevant rows among its top ``k`` by score."""
    top = np.argsort(-scores, axis=1)[:, :k]
    shares = [len(rel & set(row.tolist())) / len(rel) for row, rel in zip(top, relevant, strict=True) if rel]
    return float(np.mean(shares))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retriever", default=PACKAGED_RETRIEVER)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or args.batch_size < 1:
        parser.error("--rounds, --threads and --batch-size must be positive integers.")
    torch.set_num_threads(args.threads)

    frame = pd.read_parquet(sample_path())
    products = frame.drop_duplicates("product_id").reset_index(drop=True)
    texts = product_texts(products).tolist()
    row_of = {pid: i for i, pid in enumerate(products["product_id"])}
    test = frame[frame["split"] == "holdout"]
    queries = test["query"].drop_duplicates().tolist()
    relevant = [
        {row_of[p] for p in test.loc[(test["query"] == q) & (test["esci_label"] == "E"), "product_id"]}
        for q in queries
    ]

    encoder = DenseEncoder.load(args.retriever, device="cpu", batch_size=args.batch_size)
    encoder.encode(texts[:128])  # warm-up: first-call allocations and kernel selection
    encoder.encode(texts[:128], precision="bf16")
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for precision in ("fp32", "bf16"):
            start = time.perf_counter()
            vectors[precision] = encoder.encode(texts, precision=precision)
            rates[precision].append(len(texts) / (time.perf_counter() - start))
    query_vectors = encoder.encode(queries, precision="fp32")
    cosine = np.einsum("nd,nd->n", vectors["fp32"], vectors["bf16"])
    scores = {p: query_vectors @ v.T for p, v in vectors.items()}
    tops = {p: np.argsort(-s, axis=1)[:, :TOP] for p, s in scores.items()}
    overlap = [
        len(set(a.tolist()) & set(b.tolist())) / TOP for a, b in zip(tops["fp32"], tops["bf16"], strict=True)
    ]
    native, evidence = cpu_bf16_support()
    result = {
        "benchmark": "embedding_precision",
        "cpu": cpu_model(),
        "bf16_native": native,
        "bf16_evidence": evidence,
        "threads": args.threads,
        "retriever": args.retriever,
        "products": len(texts),
        "queries": len(queries),
        "rounds": args.rounds,
        "products_per_s": {p: [round(r, 1) for r in v] for p, v in rates.items()},
        "median_products_per_s": {p: statistics.median(v) for p, v in rates.items()},
        "bf16_speedup": statistics.median(rates["bf16"]) / statistics.median(rates["fp32"]),
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
        f"top{TOP}_overlap_mean": float(np.mean(overlap)),
        f"top{TOP}_overlap_min": float(np.min(overlap)),
        f"recall_at_{TOP}": {p: recall_at(s, relevant, TOP) for p, s in scores.items()},
    }
    if not native:
        print(f"note: no native bf16 here ({evidence}); the bf16 rows are emulated.")
    med = result["median_products_per_s"]
    print(
        f"{len(texts):,} products, {args.threads} threads: fp32 {med['fp32']:.0f}/s, bf16 {med['bf16']:.0f}/s "
        f"({result['bf16_speedup']:.2f}x); cosine min {result['cosine_min']:.5f}; top-{TOP} overlap "
        f"{result[f'top{TOP}_overlap_mean']:.3f} (min {result[f'top{TOP}_overlap_min']:.2f}); Recall@{TOP} "
        f"fp32 {result[f'recall_at_{TOP}']['fp32']:.4f}, bf16 {result[f'recall_at_{TOP}']['bf16']:.4f}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
