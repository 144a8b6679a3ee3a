"""Before and after of the three fixes ``benchmarks/full_scale.py`` led to, at the US locale's size.

Each "before" is the computation the package did before the fix, built from functions it still
has (``task3_metric`` per threshold, the one-query ranking functions a query at a time, ``_draw``
from an explicit pool of every product); each "after" is the package's function now. Times are
CPU seconds of this process (``time.process_time``): on a shared host the wall time says more
about the neighbours than about the code.

- **Task 3 threshold** (``stack.rules.fit_threshold``) on the ~1.40M train+val pairs' inner
  out-of-fold substitute probabilities: before, quadratic, so timed on ``--threshold-rows`` rows and
  scaled by the square of the row ratio;
- **per-query ranking metrics** (``eval.ranking.per_query_ranking_metrics``) of a test split of
  ESCI US size (22,458 queries, 425,762 pairs), both measured at full size;
- **unlabelled draws** of ``distill.data.sample_unlabelled`` (1,215,854 products, a query's ~19
  own candidates left out, 30 uniform draws a query): both timed on ``--draw-queries`` queries
  and scaled to the ~75k train+val queries.

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/scaling_fixes.py --out runs/bench/scaling_fixes.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

TRAIN_VAL_PAIRS, TRAIN_VAL_QUERIES = 1_393_063, 74_887
TEST_PAIRS, TEST_QUERIES = 425_762, 22_458
PRODUCTS = 1_215_854


def _cpu(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.process_time()
    value = fn()
    return time.process_time() - started, value


def threshold(rows_before: int, seed: int = 0) -> dict[str, Any]:
    """``fit_threshold`` now on the full rows; before on ``rows_before`` rows, scaled quadratically."""
    from esci_reranker.stack.rules import fit_threshold, task3_metric

    rng = np.random.default_rng(seed)
    probs = rng.beta(2, 5, size=TRAIN_VAL_PAIRS)
    is_sub = rng.random(TRAIN_VAL_PAIRS) < 0.22
    after, _ = _cpu(lambda: fit_threshold(probs, is_sub))

    small_p, small_s = probs[:rows_before], is_sub[:rows_before]

    def before() -> tuple[float, float]:
        distinct = np.unique(small_p)
        candidates = np.concatenate([[0.5], (distinct[1:] + distinct[:-1]) / 2, [distinct[-1] + 1e-9]])
        scores = np.array([task3_metric(small_s, small_p >= t, "micro_f1") for t in candidates])
        good = candidates[scores >= scores.max() - 1e-12]
        return float(good[np.argmin(np.abs(good - 0.5))]), float(scores.max())

    measured, old = _cpu(before)
    if old != fit_threshold(small_p, small_s):
        raise RuntimeError("threshold: before and after differ")
    return {
        "rows": TRAIN_VAL_PAIRS,
        "after_cpu_s": after,
        "before_cpu_s_measured": measured,
        "before_rows_measured": rows_before,
        "before_cpu_s_full": measured * (TRAIN_VAL_PAIRS / rows_before) ** 2,
    }


def ranking(seed: int = 0) -> dict[str, Any]:
    """``per_query_ranking_metrics`` against the one-query functions a query at a time, full size."""
    from esci_reranker.eval.ranking import (
        average_precision,
        ndcg,
        per_query_ranking_metrics,
        precision_at_k,
        rank_order,
        recall_at_k,
        reciprocal_rank,
    )
    from esci_reranker.labels import gain_table

    rng = np.random.default_rng(seed)
    sizes = np.maximum(1, rng.poisson(TEST_PAIRS / TEST_QUERIES, size=TEST_QUERIES))
    n = int(sizes.sum())
    run = pd.DataFrame(
        {
            "query_id": np.repeat(np.arange(TEST_QUERIES), sizes),
            "product_id": [f"B{i:09d}" for i in rng.permutation(n)],
            "esci_label": rng.choice(["E", "S", "C", "I"], size=n, p=[0.65, 0.22, 0.03, 0.10]),
            "score": rng.normal(size=n),
        }
    )
    after, new = _cpu(lambda: per_query_ranking_metrics(run))

    def before() -> pd.DataFrame:
        # the loop the function ran before: sorted by query, one rank_order and six metrics each
        gains = gain_table("esci")
        order = np.argsort(run["query_id"].to_numpy(), kind="stable")
        q = run["query_id"].to_numpy()[order]
        starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
        ends = np.r_[starts[1:], len(order)]
        ids = run["product_id"].astype(str).to_numpy()[order]
        scores = run["score"].to_numpy()[order]
        labels = run["esci_label"].to_numpy()[order]
        g_all = np.array([gains[x] for x in labels])
        r_all = labels == "E"
        rows = []
        for s, e in zip(starts, ends, strict=True):
            ranked = rank_order(scores[s:e], ids[s:e])
            g, r = g_all[s:e][ranked], r_all[s:e][ranked]
            rows.append(
                (q[s], e - s, ndcg(g), ndcg(g, 10), reciprocal_rank(r), average_precision(r),
                 recall_at_k(r, 10), precision_at_k(r, 10))
            )  # fmt: skip
        return pd.DataFrame(rows, columns=list(new.columns))

    measured, old = _cpu(before)
    pd.testing.assert_frame_equal(old, new, check_exact=True)
    return {"rows": n, "queries": TEST_QUERIES, "after_cpu_s": after, "before_cpu_s_full": measured}


def draws(queries: int, seed: int = 0) -> dict[str, Any]:
    """The uniform unlabelled draws of ``queries`` queries among every product, scaled to all."""
    from esci_reranker.distill.data import _draw, _draw_range

    rng = np.random.default_rng(seed)
    own = [set(rng.choice(PRODUCTS, size=19, replace=False).tolist()) for _ in range(queries)]
    everything = np.arange(PRODUCTS)

    def run(new: bool) -> list[int]:
        draw_rng, chosen = np.random.default_rng(1), []
        for exclude in own:
            if new:
                _draw_range(draw_rng, PRODUCTS, 30, set(exclude), chosen)
            else:
                _draw(draw_rng, everything, 30, set(exclude), chosen)
        return chosen

    before, old = _cpu(lambda: run(False))
    after, new = _cpu(lambda: run(True))
    if old != new:
        raise RuntimeError("draws: before and after differ")
    factor = TRAIN_VAL_QUERIES / queries
    return {
        "queries_measured": queries,
        "products": PRODUCTS,
        "before_cpu_s_full": before * factor,
        "after_cpu_s_full": after * factor,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threshold-rows", type=int, default=20_000)
    parser.add_argument("--draw-queries", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = {
        "threshold": threshold(args.threshold_rows),
        "ranking": ranking(),
        "draws": draws(args.draw_queries),
    }
    for name, r in results.items():
        print(
            f"{name:10s} before {r['before_cpu_s_full']:10.1f} s CPU   after {r.get('after_cpu_s', r.get('after_cpu_s_full')):8.2f} s CPU"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
