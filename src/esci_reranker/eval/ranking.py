"""Task 1 ranking metrics: pure functions over one query's ranked list, and their mean over queries.

Everything here follows ``trec_eval`` (and so ``pytrec_eval``) exactly; ``tests/eval`` checks it
on random runs to 1e-6:

- **Order.** Candidates are ranked by score, highest first. Equal scores are broken by
  ``product_id`` in *descending* string order (``trec_eval`` sorts by docno descending on ties).
  The result never depends on the row order of the input.
- **Gains.** Graded gains come from the ESCI label via a table in ``esci_reranker.labels``
  (``"esci"``: E=1, S=0.1, C=0.01, I=0; ``"official-script"``: S and C swapped). nDCG uses them
  linearly with a ``log2`` discount.
- **Binary relevance.** MRR, MAP, Recall@k and Precision@k count a candidate as relevant when its
  label is in ``relevant`` (``("E",)`` by default, ``("E", "S")`` on request).
- **Edge cases.** The candidate list is the whole judged list, so ideal rankings are built from
  it. A query whose ideal DCG is 0 (no candidate with a positive gain) scores nDCG 0; a query
  without a relevant candidate scores 0 on MRR, MAP, Recall and Precision. Such queries stay in
  the mean, as in ``trec_eval``. An empty run has no queries: every mean is 0.0 and
  ``num_queries`` is 0. Scores must not be NaN.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import numpy as np
import pandas as pd

from esci_reranker.labels import ESCI_LABELS, check_labels, gain_table

#: Cutoff used for the ``@k`` metrics when none is given.
DEFAULT_CUTOFF: Final[int] = 10
#: Labels that count as relevant for MRR/MAP/Recall/Precision unless told otherwise.
DEFAULT_RELEVANT: Final[tuple[str, ...]] = ("E",)


# ---------------------------------------------------------------------------------------------
# one query
# ---------------------------------------------------------------------------------------------


def rank_order(scores: np.ndarray, doc_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Indices that put one query's candidates in ranked order.

    Sort key: ``score`` descending, then ``doc_id`` descending (code-point order, the same as
    ``strcmp`` on UTF-8), which is ``trec_eval``'s rule. Returns an int array of shape (n,).
    """
    scores = np.asarray(scores, dtype=np.float64)
    ids = np.asarray(doc_ids, dtype=object)
    if len(scores) != len(ids):
        raise ValueError(f"rank_order: {len(scores)} scores but {len(ids)} doc ids; expected equal.")
    if len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    if np.isnan(scores).any():
        raise ValueError("rank_order: a score is NaN; scores must be numbers (check the model output).")
    _, id_code = np.unique(ids.astype(str), return_inverse=True)  # ascending code-point order
    # np.lexsort sorts by the last key first and ascending; negate both for descending.
    return np.lexsort((-id_code.reshape(-1), -scores))


def dcg(ranked_gains: np.ndarray, k: int | None = None) -> float:
    """Discounted cumulative gain of a ranked list.

    ``DCG@k = sum_{i=1}^{min(k, n)} g_i / log2(i + 1)`` with ``g_i`` the gain at rank ``i``
    (linear gains, no ``2^g - 1``); ``k=None`` means the full list.
    """
    gains = np.asarray(ranked_gains, dtype=np.float64)[: None if k is None else k]
    return float(np.sum(gains / np.log2(np.arange(2, len(gains) + 2))))


def ndcg(ranked_gains: np.ndarray, k: int | None = None) -> float:
    """Normalised DCG: ``DCG@k(ranking) / DCG@k(ideal)``, the ideal being the gains sorted descending.

    The ideal is built from the whole list (every judged candidate), also when ``k`` cuts it.
    Defined as 0.0 when the ideal DCG is 0 (no candidate has a positive gain), as in trec_eval.
    """
    gains = np.asarray(ranked_gains, dtype=np.float64)
    ideal = dcg(np.sort(gains)[::-1], k)
    return dcg(gains, k) / ideal if ideal > 0 else 0.0


def reciprocal_rank(ranked_relevant: np.ndarray) -> float:
    """``1 / rank`` of the first relevant candidate (ranks start at 1); 0.0 if none is relevant."""
    hits = np.flatnonzero(np.asarray(ranked_relevant, dtype=bool))
    return 1.0 / (hits[0] + 1) if len(hits) else 0.0


def average_precision(ranked_relevant: np.ndarray) -> float:
    """``AP = (1 / R) * sum_{i : rel_i} P@i`` with ``R`` the number of relevant candidates.

    ``P@i`` is the precision of the top ``i``. 0.0 when ``R = 0``.
    """
    rel = np.asarray(ranked_relevant, dtype=bool)
    n_rel = int(rel.sum())
    if n_rel == 0:
        return 0.0
    ranks = np.flatnonzero(rel) + 1  # 1-based ranks of the relevant candidates
    return float(np.sum(np.arange(1, n_rel + 1) / ranks) / n_rel)


def recall_at_k(ranked_relevant: np.ndarray, k: int) -> float:
    """``Recall@k = |relevant in top k| / R``; 0.0 when ``R = 0``."""
    rel = np.asarray(ranked_relevant, dtype=bool)
    n_rel = int(rel.sum())
    return float(rel[:k].sum()) / n_rel if n_rel else 0.0


def precision_at_k(ranked_relevant: np.ndarray, k: int) -> float:
    """``P@k = |relevant in top k| / k``, always over ``k`` even when the list is shorter (trec_eval)."""
    rel = np.asarray(ranked_relevant, dtype=bool)
    return float(rel[:k].sum()) / k


# ---------------------------------------------------------------------------------------------
# a run: many queries
# ---------------------------------------------------------------------------------------------


def parse_relevant(spec: str | Iterable[str]) -> tuple[str, ...]:
    """Parse ``"E"`` / ``"E,S"`` (or a list) into labels in E, S, C, I order.

    Raises:
        ValueError: empty, or a name that is not one of E, S, C, I.
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    labels = {str(n).strip().upper() for n in names if str(n).strip()}
    if not labels:
        raise ValueError("relevant labels: got none; expected e.g. 'E' or 'E,S'.")
    unknown = sorted(labels - set(ESCI_LABELS))
    if unknown:
        raise ValueError(f"relevant labels: unknown {unknown}; expected a subset of E, S, C, I.")
    return tuple(label for label in ESCI_LABELS if label in labels)


def metric_names(cutoff: int = DEFAULT_CUTOFF) -> tuple[str, ...]:
    """Keys of ``ranking_metrics``: ``ndcg, ndcg@k, mrr, map, recall@k, precision@k``."""
    return ("ndcg", f"ndcg@{cutoff}", "mrr", "map", f"recall@{cutoff}", f"precision@{cutoff}")


def _label_values(labels: np.ndarray, table: Mapping[str, float]) -> np.ndarray:
    return np.array([table[label] for label in labels], dtype=np.float64)


def per_query_ranking_metrics(
    run: pd.DataFrame,
    score_column: str = "score",
    gains: str = "esci",
    relevant: Iterable[str] = DEFAULT_RELEVANT,
    cutoff: int = DEFAULT_CUTOFF,
) -> pd.DataFrame:
    """One row per query (sorted by ``query_id``) with the metrics of ``metric_names(cutoff)``.

    Args:
        run: columns ``query_id``, ``product_id``, ``esci_label`` and ``score_column``; one row
            per (query, product) pair. Not modified.
        score_column: the column to rank by (``score``, ``expected_gain``, ...).
        gains: gain table name for nDCG (``"esci"`` or ``"official-script"``).
        relevant: labels counted as relevant by MRR, MAP, Recall@k and Precision@k.
        cutoff: the ``k`` of the ``@k`` metrics.

    Returns:
        A frame with ``query_id``, ``num_candidates`` and one float column per metric.

    Raises:
        ValueError: a missing column, an unknown label, a NaN score, a repeated (query, product)
            pair, an unknown gain table or a cutoff below 1.
    """
    if cutoff < 1:
        raise ValueError(f"ranking metrics: cutoff={cutoff}; expected a positive integer.")
    table = gain_table(gains)
    relevant_set = set(parse_relevant(relevant))
    missing = [c for c in ("query_id", "product_id", "esci_label", score_column) if c not in run.columns]
    if missing:
        raise ValueError(f"ranking metrics: run is missing column(s) {missing}; it has {list(run.columns)}.")
    labels = run["esci_label"].astype(str).to_numpy()
    check_labels(labels, "ranking metrics")
    if run.duplicated(["query_id", "product_id"]).any():
        pair = run.loc[run.duplicated(["query_id", "product_id"]), ["query_id", "product_id"]].iloc[0]
        raise ValueError(
            f"ranking metrics: (query_id={pair['query_id']}, product_id={pair['product_id']!r}) "
            "occurs more than once; each pair must be scored once."
        )
    names = metric_names(cutoff)
    if len(run) == 0:
        empty = {"query_id": pd.Series(dtype="int64"), "num_candidates": pd.Series(dtype="int64")}
        return pd.DataFrame(empty | {n: pd.Series(dtype="float64") for n in names})

    query_ids = run["query_id"].to_numpy()
    scores = run[score_column].to_numpy(dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError("rank_order: a score is NaN; scores must be numbers (check the model output).")
    unique_queries, query_code = np.unique(query_ids, return_inverse=True)
    # one code-point order of every product id: within a query it is rank_order's own tie-break
    _, doc_code = np.unique(run["product_id"].astype(str).to_numpy().astype(str), return_inverse=True)
    order = np.lexsort((-doc_code.reshape(-1), -scores, query_code.reshape(-1)))
    query_sorted = query_code.reshape(-1)[order]
    starts = np.flatnonzero(np.r_[True, query_sorted[1:] != query_sorted[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    values = _ranked_metrics(
        _label_values(labels[order], table), np.isin(labels[order], list(relevant_set)), starts, sizes, cutoff
    )
    frame = pd.DataFrame({"query_id": unique_queries, "num_candidates": sizes.astype(np.int64)})
    for name, column in zip(names, values, strict=True):
        frame[name] = column
    return frame


def _ranked_metrics(
    gains: np.ndarray, relevant: np.ndarray, starts: np.ndarray, sizes: np.ndarray, cutoff: int
) -> tuple[np.ndarray, ...]:
    """Every query's ``ndcg, ndcg@k, mrr, map, recall@k, precision@k`` from its ranked rows.

    ``gains`` and ``relevant`` (N,) are in ranked order, query after query; query q holds rows
    ``starts[q] : starts[q] + sizes[q]``. The queries are taken in blocks of equal list length,
    each block one (queries, length) matrix, so every sum runs over exactly the elements, in
    exactly the order, that the one-query functions above sum (``np.sum`` of a row is
    ``np.sum`` of that row alone): the numbers are theirs to the last bit.
    """
    q = len(starts)
    ndcg_all, ndcg_k, rr, ap, recall, precision = (np.zeros(q) for _ in range(6))
    n_rel = np.add.reduceat(relevant.astype(np.int64), starts) if q else np.zeros(0, np.int64)
    for n in np.unique(sizes):
        block = np.flatnonzero(sizes == n)
        rows = starts[block][:, None] + np.arange(n)[None, :]  # (m, n)
        g, r = gains[rows], relevant[rows]
        discount = np.log2(np.arange(2, n + 2))
        ideal = np.sort(g, axis=1)[:, ::-1]
        k = min(cutoff, n)
        for out, top in ((ndcg_all, n), (ndcg_k, k)):
            dcg = np.sum(g[:, :top] / discount[:top], axis=1)
            best = np.sum(ideal[:, :top] / discount[:top], axis=1)
            out[block] = np.divide(dcg, best, out=np.zeros(len(block)), where=best > 0)
        hit = r.any(axis=1)
        rr[block] = np.where(hit, 1.0 / (r.argmax(axis=1) + 1), 0.0)
        found = r[:, :k].sum(axis=1)
        total = n_rel[block]
        recall[block] = np.divide(found, total, out=np.zeros(len(block)), where=total > 0)
        precision[block] = found / cutoff
    # average precision over each query's relevant rows only, in blocks of equal count
    position = np.arange(len(gains)) - np.repeat(starts, sizes)
    rel_rank = position[relevant] + 1  # 1-based ranks of the relevant rows, query after query
    rel_start = np.r_[0, np.cumsum(n_rel)[:-1]] if q else np.zeros(0, np.int64)
    for m in np.unique(n_rel[n_rel > 0]):
        block = np.flatnonzero(n_rel == m)
        ranks = rel_rank[rel_start[block][:, None] + np.arange(m)[None, :]]
        ap[block] = np.sum(np.arange(1, m + 1) / ranks, axis=1) / m
    return ndcg_all, ndcg_k, rr, ap, recall, precision


def mean_over_queries(per_query: pd.DataFrame) -> dict[str, float]:
    """Mean of each metric column of a ``per_query_ranking_metrics`` frame (every query weighs the same).

    ``metric = (1 / |Q|) * sum_{q in Q} metric(q)``; 0.0 for each metric when there is no query.
    """
    names = [c for c in per_query.columns if c not in ("query_id", "num_candidates")]
    return {n: float(per_query[n].mean()) if len(per_query) else 0.0 for n in names}


def ranking_metrics(
    run: pd.DataFrame,
    score_column: str = "score",
    gains: str = "esci",
    relevant: Iterable[str] = DEFAULT_RELEVANT,
    cutoff: int = DEFAULT_CUTOFF,
) -> dict[str, float]:
    """Mean over queries of each metric of ``metric_names(cutoff)``.

    ``ndcg, ndcg@k, mrr, map, recall@k, precision@k``, each ``(1 / |Q|) * sum_q metric(q)``; 0.0
    when the run is empty. Arguments and errors as in ``per_query_ranking_metrics``.
    """
    return mean_over_queries(per_query_ranking_metrics(run, score_column, gains, relevant, cutoff))
