"""Speed of model families side by side: pairs/s and ms per 40-candidate request on the same pairs.

Every checkpoint (multi-task, single-task, listwise, LLM, ...) is loaded with
``Reranker.from_pretrained`` and scores the same workload, through the one scoring path the
service uses (``Reranker.predict_texts`` / ``rerank``):

- **throughput**: whole candidate lists of randomly drawn sample queries, ``pairs`` pairs in all,
  scored in one ``predict_texts`` call (the listwise family groups them by query; the others cut
  length-sorted batches of ``batch_size``);
- **latency**: ``rerank`` of one query with exactly ``request_size`` candidates (lists shorter
  than that are topped up with other products), ``requests`` requests, median and p90 in ms.

Rounds are interleaved over the models so a slower spell of a shared machine hits all of them;
the best round is reported with the median beside it. No assertion is made on the numbers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esci_reranker.bench.backends import candidate_lists
from esci_reranker.data import sample_path
from esci_reranker.data.text import product_texts
from esci_reranker.reranker import Reranker


def _requests(frame: pd.DataFrame, size: int, count: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """``count`` (query, ``size`` row numbers of ``frame``) requests: a query's own candidates,
    topped up with other products."""
    rng = np.random.default_rng(seed)
    queries = rng.permutation(frame["query_id"].unique())[:count]
    out = []
    for qid in queries:
        rows = frame.index[frame["query_id"] == qid].to_numpy()[:size]
        extra = rng.choice(len(frame), size=size - len(rows), replace=False) if len(rows) < size else []
        out.append((str(frame.at[rows[0], "query"]), np.r_[rows, extra].astype(int)))
    return out


def run_family_bench(
    model_dirs: Sequence[str | Path],
    pairs: int = 256,
    repeats: int = 3,
    request_size: int = 40,
    requests: int = 10,
    batch_size: int = 32,
    precision: str = "auto",
    device: str = "cpu",
) -> dict[str, Any]:
    """Measure every checkpoint in ``model_dirs`` on the same pairs; returns a JSON-ready dict.

    ``precision`` ``auto`` is bf16 where the CPU computes it natively, else fp32 (as the service).
    """
    from esci_reranker.hardware import resolve_precision
    from esci_reranker.reranker import select_device

    dev = select_device(device)
    chosen = resolve_precision(precision, dev)
    frame = pd.read_parquet(sample_path()).reset_index(drop=True)
    frame = frame.assign(query=frame["query"].astype(str))
    rows = candidate_lists(frame, pairs)
    queries = frame["query"].to_numpy()[rows].tolist()
    reqs = _requests(frame, request_size, requests)
    models = {}
    for path in model_dirs:
        started = time.perf_counter()
        reranker = Reranker.from_pretrained(path, device=device, batch_size=batch_size, precision=chosen)
        models[str(path)] = (reranker, time.perf_counter() - started)
    # Each model reads the product text it was trained on (its text_fields): a model over bullets
    # and description pays for their tokens here as it would in service. Built once per model,
    # outside the timed rounds.
    pair_texts: dict[str, list[str]] = {}
    request_lists: dict[str, list[tuple[str, list[tuple[str, str]]]]] = {}
    for name, (reranker, _) in models.items():
        cfg = reranker.config
        texts = product_texts(frame, cfg.text_fields, cfg.long_field_chars).astype(str).to_numpy()
        pair_texts[name] = texts[rows].tolist()
        request_lists[name] = [
            (query, [(f"c{i}", t) for i, t in enumerate(texts[request_rows].tolist())])
            for query, request_rows in reqs
        ]
        reranker.predict_texts(queries[:8], pair_texts[name][:8])  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in models}
    latencies: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, (reranker, _) in models.items():
            start = time.perf_counter()
            reranker.predict_texts(queries, pair_texts[name])
            rates[name].append(len(queries) / (time.perf_counter() - start))
            for query, candidates in request_lists[name]:
                start = time.perf_counter()
                reranker.rerank(query, candidates)
                latencies[name].append((time.perf_counter() - start) * 1000.0)
    result: dict[str, Any] = {
        "pairs": len(queries),
        "request_size": request_size,
        "requests_per_round": len(reqs),
        "repeats": repeats,
        "batch_size": batch_size,
        "precision": chosen,
        "device": str(dev),
        "models": {},
    }
    for name, (reranker, load_seconds) in models.items():
        result["models"][name] = {
            "model_type": reranker.config.model_type,
            "backbone": reranker.config.backbone_name,
            "text_fields": list(reranker.config.text_fields),
            "load_seconds": load_seconds,
            "pairs_per_s_best": float(max(rates[name])),
            "pairs_per_s_median": float(np.median(rates[name])),
            "request_ms_p50": float(np.median(latencies[name])),
            "request_ms_p90": float(np.percentile(latencies[name], 90)),
        }
    return result


def format_family_table(result: dict[str, Any]) -> str:
    """The result as a markdown table, one row per model."""
    lines = [
        f"{result['pairs']} pairs (whole candidate lists), {result['request_size']}-candidate requests, "
        f"{result['precision']} on {result['device']}, best of {result['repeats']} rounds (median)",
        "",
        "| model | type | pairs/s | ms per request p50 (p90) | load s |",
        "|:---|:---|---:|---:|---:|",
    ]
    for name, row in result["models"].items():
        lines.append(
            f"| {name} | {row['model_type']} | {row['pairs_per_s_best']:.1f} ({row['pairs_per_s_median']:.1f}) "
            f"| {row['request_ms_p50']:.0f} ({row['request_ms_p90']:.0f}) | {row['load_seconds']:.1f} |"
        )
    return "\n".join(lines)
