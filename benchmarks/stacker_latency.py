"""What the stacker adds to a 40-candidate rerank: the same model with and without its stacker.

Loads a stacked checkpoint twice (``stacked=True`` / ``stacked=False``), reranks the same
40-candidate lists of the bundled sample's train/val queries with both, interleaved, and prints
the median milliseconds per request of each and of the stacker's own part (features + trees),
with the product/query tokenisation caches cleared before every request (cold: every product is
new) and kept (warm: products seen before). Writes JSON.

    python benchmarks/stacker_latency.py --model runs/default/model --out runs/default/stacker_latency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from esci_reranker.data import sample_path
from esci_reranker.reranker import Reranker
from esci_reranker.stack.features import feature_arrays, product_side, query_side, record_fields
from esci_reranker.stack.outputs import cross_encoder_columns


def requests(n: int, size: int, seed: int) -> list[tuple[str, list[dict]]]:
    """``n`` (query, candidates) requests of ``size`` products from the sample's train/val queries."""
    frame = pd.read_parquet(sample_path())
    frame = frame[frame["split"] != "holdout"]
    rng = np.random.default_rng(seed)
    out = []
    queries = frame["query_id"].unique()
    for qid in rng.choice(queries, size=n, replace=len(queries) < n):
        rows = frame[frame["query_id"] == qid]
        rows = rows.sample(n=size, replace=len(rows) < size, random_state=int(rng.integers(1 << 31)))
        cands = [
            {
                "product_id": f"{pid}-{i}",
                "title": r.product_title,
                "brand": r.product_brand,
                "color": r.product_color,
                "bullets": r.product_bullet_point,
                "description": r.product_description,
            }
            for i, (pid, r) in enumerate(zip(rows["product_id"], rows.itertuples(), strict=True))
        ]
        out.append((str(rows["query"].iloc[0]), cands))
    return out


def stacker_part_ms(reranker: Reranker, query: str, cands: list[dict], cold: bool) -> float:
    """Milliseconds of the stacker's own work for one request: features and the three tree models."""
    texts = [reranker.text_of(c) for c in cands]
    encoded = reranker.pair_encoder.encode([query] * len(cands), texts)
    out = reranker.run_encoded(encoded)
    if cold:
        product_side.cache_clear()
        query_side.cache_clear()
    start = time.perf_counter()
    per_pair = [record_fields(c) for c in cands]
    fields = {
        k: [f.get(k, "") for f in per_pair] for k in ("title", "brand", "color", "bullets", "description")
    }
    columns = cross_encoder_columns(out, reranker.config.prior_features, reranker.config.gains)
    stacker = reranker.stacker
    if stacker is None:
        raise ValueError("stacker_part_ms: the model has no stacker.")
    stacker.predict(feature_arrays([query] * len(cands), fields, [query] * len(cands), columns))
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/default/model"))
    parser.add_argument("--out", type=Path, default=Path("runs/default/stacker_latency.json"))
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--candidates", type=int, default=40)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stacked = Reranker.from_pretrained(args.model, precision=args.precision)
    if stacked.stacker is None:
        raise SystemExit(f"{args.model}: no stacker/ folder; train with model.stacker: gbdt.")
    plain = Reranker.from_pretrained(args.model, precision=args.precision, stacked=False)
    work = requests(args.requests, args.candidates, seed=0)
    for query, cands in work[:3]:  # warm-up: lazy initialisation, allocator
        stacked.rerank(query, cands)
        plain.rerank(query, cands)
    times: dict[str, list[float]] = {"plain": [], "stacked_cold": [], "part_cold": [], "part_warm": []}
    for query, cands in work:
        for name, model in (("plain", plain), ("stacked_cold", stacked)):
            product_side.cache_clear()
            query_side.cache_clear()
            start = time.perf_counter()
            model.rerank(query, cands)
            times[name].append((time.perf_counter() - start) * 1000)
        times["part_cold"].append(stacker_part_ms(stacked, query, cands, cold=True))
        times["part_warm"].append(stacker_part_ms(stacked, query, cands, cold=False))
    result = {
        "model": str(args.model),
        "precision": args.precision,
        "threads": args.threads,
        "requests": args.requests,
        "candidates": args.candidates,
        "median_ms": {k: statistics.median(v) for k, v in times.items()},
        "p90_ms": {k: float(np.percentile(v, 90)) for k, v in times.items()},
    }
    result["stacker_adds_ms"] = result["median_ms"]["stacked_cold"] - result["median_ms"]["plain"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    med = result["median_ms"]
    print(
        f"{args.candidates}-candidate rerank, median of {args.requests}: cross-encoder alone {med['plain']:.1f} ms, "
        f"stacked {med['stacked_cold']:.1f} ms (+{result['stacker_adds_ms']:.1f} ms); the stacker's own part "
        f"{med['part_cold']:.1f} ms cold, {med['part_warm']:.1f} ms with products seen before -> {args.out}"
    )


if __name__ == "__main__":
    main()
