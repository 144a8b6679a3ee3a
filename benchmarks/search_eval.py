"""Search quality on the test split's queries against the whole bundled catalogue (a benchmark).

For each of the sample's 41 test (holdout) queries, against an index of all 6,613 sample products:

- Recall@100 and Recall@500 of the query's labelled E products for BM25, the zero-shot dense
  retriever, the fine-tuned dense retriever, and the hybrids (each retriever fused with BM25 by
  the index's fusion, each list ``k`` deep);
- how much of the exact top 100 the HNSW graph returns (its recall against a brute-force scan);
- end-to-end nDCG@10 of search (hybrid top 100, reranked by the model, top 10), with ESCI gains.
  **Unjudged products count as irrelevant** (gain 0): the catalogue holds every sample product,
  and only the query's own candidates were judged. The ideal DCG is that of the query's judged
  products. Beside it, the same retrieval without reranking.

The retriever is fine-tuned on train+val queries only (``train-retriever``); the index holds every
product, test products included, as a deployed index would.

    python benchmarks/search_eval.py --retriever runs/retriever/model --model runs/default/model \
        --work runs/search_eval --out runs/search_eval/search_eval.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from esci_reranker.data.sample import sample_path
from esci_reranker.eval.ranking import dcg
from esci_reranker.labels import ESCI_GAINS
from esci_reranker.retrieval.encoder import PACKAGED_RETRIEVER
from esci_reranker.retrieval.index import CatalogueIndex
from esci_reranker.retrieval.search import Searcher

KS = (100, 500)


def recall(keys: list[str], relevant: set[str], k: int) -> float:
    return len(relevant & set(keys[:k])) / len(relevant) if relevant else 0.0


def ndcg10(ids: list[str], gains: dict[str, float]) -> float:
    ideal = dcg(np.sort(np.array(list(gains.values())))[::-1], 10)
    got = dcg(np.array([gains.get(pid, 0.0) for pid in ids]), 10)
    return got / ideal if ideal > 0 else 0.0


def ids_of(index: CatalogueIndex, keys: np.ndarray) -> list[str]:
    return [p["product_id"] for p in index.products(keys)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retriever", help="the fine-tuned retriever folder (none: zero-shot only)")
    parser.add_argument("--model", default="runs/default/model", help="the reranker checkpoint")
    parser.add_argument("--work", type=Path, default=Path("runs/search_eval"), help="index folders go here")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--reuse", action="store_true", help="reuse index folders already in --work")
    args = parser.parse_args(argv)

    frame = pd.read_parquet(sample_path())
    test = frame[frame["split"] == "holdout"]
    queries = test.drop_duplicates("query_id")[["query_id", "query"]].itertuples(index=False)
    queries = list(queries)
    timings: dict[str, float] = {}
    indexes = {}
    retrievers = [("zero-shot", PACKAGED_RETRIEVER)]
    if args.retriever:
        retrievers.append(("fine-tuned", args.retriever))
    for name, spec in retrievers:
        folder = args.work / f"index-{name}"
        if not (args.reuse and (folder / "manifest.json").is_file()):
            t = time.perf_counter()
            CatalogueIndex.build(sample_path(), folder, retriever=spec, source="bundled ESCI sample")
            timings[f"build_{name}"] = time.perf_counter() - t
        indexes[name] = CatalogueIndex.open(folder)
    ft = indexes["fine-tuned" if args.retriever else "zero-shot"]
    depth = max(KS)
    table: dict[str, dict[str, list[float]]] = {}

    def add(method: str, ids: list[str], relevant: set[str]) -> None:
        row = table.setdefault(method, {f"recall@{k}": [] for k in KS})
        for k in KS:
            row[f"recall@{k}"].append(recall(ids, relevant, k))

    hnsw_overlap = []
    for qid, query in queries:
        rows = test[test["query_id"] == qid]
        relevant = set(rows.loc[rows["esci_label"] == "E", "product_id"])
        add("BM25", ids_of(ft, ft.bm25_search(query, depth)[0]), relevant)
        for name, index in indexes.items():
            add(f"{name} dense", ids_of(index, index.dense_search(query, depth)[0]), relevant)
            for k in KS:  # hybrids: each list k deep, fused, cut to k
                fused = [r.product_id for r in index.retrieve(query, k)]
                table.setdefault(f"hybrid ({name} + BM25, {index.fusion['method']})", {}).setdefault(
                    f"recall@{k}", []
                ).append(recall(fused, relevant, k))
        # HNSW against a brute-force scan of the same vectors (fine-tuned index).
        q = ft.encoder.encode([query])[0]
        exact = ft.ann.search(q, 100, exact=True)
        approx = ft.ann.search(q, 100)
        hnsw_overlap.append(len(set(exact.keys.tolist()) & set(approx.keys.tolist())) / 100)

    from esci_reranker.reranker import Reranker

    e2e, plain, latency = [], [], []
    searcher = Searcher(ft, Reranker.from_pretrained(args.model)) if Path(args.model).exists() else None
    for qid, query in queries if searcher is not None else []:
        rows = test[test["query_id"] == qid]
        gains = dict(zip(rows["product_id"], rows["esci_label"].map(ESCI_GAINS), strict=True))
        t = time.perf_counter()
        result = searcher.search(query, top_k=10, candidates=args.candidates)
        latency.append(time.perf_counter() - t)
        e2e.append(ndcg10([h.product_id for h in result.hits], gains))
        retrieved = searcher.search(query, top_k=10, candidates=args.candidates, rerank=False)
        plain.append(ndcg10([h.product_id for h in retrieved.hits], gains))

    summary = {
        "queries": len(queries),
        "catalogue_products": len(ft),
        "recall": {m: {k: float(np.mean(v)) for k, v in row.items()} for m, row in table.items()},
        "hnsw_recall_vs_exact@100": float(np.mean(hnsw_overlap)),
        "ndcg@10_search_reranked": float(np.mean(e2e)) if e2e else None,
        "ndcg@10_hybrid_retrieval_only": float(np.mean(plain)) if plain else None,
        "search_seconds_p50": float(np.median(latency)) if latency else None,
        "model": args.model if searcher is not None else None,
        "retriever": args.retriever,
        "fusion": ft.fusion,
        "timings": timings,
        "note": "unjudged products count as irrelevant (gain 0); ideal DCG from the judged products",
    }
    print(f"{'method':45s} " + " ".join(f"R@{k:<6}" for k in KS))
    for method, row in summary["recall"].items():
        print(f"{method:45s} " + " ".join(f"{row[f'recall@{k}']:.4f} " for k in KS))
    print(f"HNSW top-100 overlap with exact search: {summary['hnsw_recall_vs_exact@100']:.4f}")
    if searcher is not None:
        print(
            f"nDCG@10 (unjudged = irrelevant): search {summary['ndcg@10_search_reranked']:.4f}, "
            f"retrieval only {summary['ndcg@10_hybrid_retrieval_only']:.4f}; in-process search p50 "
            f"{summary['search_seconds_p50'] * 1000:.0f} ms"
        )
    print(f"index build: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
