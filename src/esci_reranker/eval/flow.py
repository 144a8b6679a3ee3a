"""Search-flow metrics: how the labels hold up where a user sees them.

In the search flow a query retrieves the top N products of a whole catalogue, which are then
reranked and labelled. Each returned product is one of three kinds for its query:

- ``judged``: judged for this query; its ESCI label is known;
- ``foreign``: not judged for it, and judged only for other queries that are clearly about
  something else (``is_foreign``): it should be labelled I;
- ``unjudged``: neither; it may well be relevant, so it counts only in the shares of all results
  and as gain 0 in the end-to-end nDCG.

``flow_summary`` reports, for a run of returned results (``FLOW_COLUMNS``): the Task 1/2/3
metrics and the confusion matrix of the judged products that came back, the recall of I on
the judged-irrelevant ones and the precision of E, the E/S/C/I shares of the foreign products,
the share of all results (and of the top ``top_k``) labelled E, the end-to-end nDCG@10 (ranked
by score; every product not judged for the query has gain 0; the ideal is the query's whole
judged list) and the calibration of P(E) and P(S) on the judged products. Pure functions:
nothing here retrieves, scores or writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import pandas as pd

from esci_reranker.eval.calibration import expected_calibration_error, reliability
from esci_reranker.eval.evaluator import QUERY_SOURCE_COLUMN, evaluate_run, labelled_classes
from esci_reranker.labels import ESCI_GAINS, ESCI_LABELS
from esci_reranker.model.lexical import PREFIX_CHARS, word_tokens

KINDS: Final[tuple[str, ...]] = ("judged", "foreign", "unjudged")
#: Columns of a flow run: one row per returned product. ``esci_label`` is the judged label
#: (None unless ``kind == "judged"``); ``esci_query_source`` is optional.
FLOW_COLUMNS: Final[tuple[str, ...]] = (
    "query_id",
    "product_id",
    "kind",
    "esci_label",
    "score",
    "esci_pred",
    "esci_probs",
    "substitute_prob",
)
#: Results per query counted as "the page" (the search page's top results).
DEFAULT_TOP_K: Final[int] = 20


def query_stems(query: str) -> frozenset[str]:
    """The query's content words (stopwords dropped), cut to their first ``PREFIX_CHARS`` letters."""
    return frozenset(w[:PREFIX_CHARS] for w in word_tokens(query))


def is_foreign(query: str, judged_for: Iterable[str]) -> bool:
    """Whether a product judged only for the queries ``judged_for`` is clearly about something else.

    The rule, fixed before any result was read: the product was judged for at least one other
    query, and none of those queries shares a content word with ``query`` (stopwords dropped,
    words compared by their first four letters, so "shoe"/"shoes" and "women"/"womens" match).
    It looks at query words only, so a product judged for a differently worded query about the
    same thing ("flip flops" for "sandals for women") can pass as foreign: ``report.md`` prints
    a random sample of foreign products for a person to check.
    """
    stems = query_stems(query)
    others = list(judged_for)
    return bool(others) and all(not (stems & query_stems(other)) for other in others)


def product_kinds(
    query_id: object,
    query: str,
    product_ids: Sequence[str],
    judged: Mapping[str, Mapping[object, str]],
) -> list[str]:
    """The kind (``KINDS``) of each returned product for one query.

    Args:
        judged: product id -> {query id -> query text} of every query it is judged for.
    """
    kinds = []
    for pid in product_ids:
        queries = judged.get(pid, {})
        if query_id in queries:
            kinds.append("judged")
        elif is_foreign(query, queries.values()):
            kinds.append("foreign")
        else:
            kinds.append("unjudged")
    return kinds


def judged_index(frame: pd.DataFrame) -> dict[str, dict[object, str]]:
    """product id -> {query id -> query text} over a labelled frame (``product_kinds``' input)."""
    out: dict[str, dict[object, str]] = {}
    for qid, query, pid in zip(frame["query_id"], frame["query"], frame["product_id"], strict=True):
        out.setdefault(str(pid), {})[qid] = str(query)
    return out


def _shares(pred: pd.Series) -> dict[str, float]:
    """Share of each class among the labelled rows of ``pred`` (NaN when none is labelled)."""
    pred = labelled_classes(pred)
    n = len(pred)
    return {f"share_{c}": float((pred == c).sum() / n) if n else float("nan") for c in ESCI_LABELS}


def _share_e(pred: pd.Series) -> float:
    return _shares(pred)["share_E"]


def _e2e_ndcg(run: pd.DataFrame, ideal: Mapping[object, np.ndarray], k: int) -> float:
    """Mean over queries of nDCG@k of the reranked results (gain 0 unless judged)."""
    gains = run["esci_label"].map(lambda x: ESCI_GAINS.get(x, 0.0) if isinstance(x, str) else 0.0)
    values = []
    for qid, rows in run.assign(_gain=gains.to_numpy()).groupby("query_id", sort=True):
        ranked = rows.sort_values("score", ascending=False, kind="stable")["_gain"].to_numpy()[:k]
        best = np.sort(np.asarray(ideal.get(qid, []), dtype=np.float64))[::-1][:k]
        idcg = float(np.sum(best / np.log2(np.arange(2, len(best) + 2)))) if len(best) else 0.0
        dcg = float(np.sum(ranked / np.log2(np.arange(2, len(ranked) + 2))))
        values.append(dcg / idcg if idcg > 0 else 0.0)
    return float(np.mean(values)) if values else float("nan")


def _top(run: pd.DataFrame, k: int) -> pd.DataFrame:
    ranked = run.sort_values(["query_id", "score"], ascending=[True, False], kind="stable")
    return ranked.groupby("query_id", sort=False).head(k)


def flow_summary(
    run: pd.DataFrame,
    ideal: Mapping[object, np.ndarray],
    top_k: int = DEFAULT_TOP_K,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """The numbers of the module docstring for one flow run.

    Args:
        run: ``FLOW_COLUMNS`` rows, every returned product of every query.
        ideal: query id -> the gains of its whole judged list (the end-to-end nDCG's ideal).
        top_k: results per query that make "the page".
        threshold: the model's Task 3 decision threshold.
    """
    missing = [c for c in FLOW_COLUMNS if c not in run.columns]
    if missing:
        raise ValueError(f"flow run: no column(s) {missing}; expected {list(FLOW_COLUMNS)}.")
    judged = run[run["kind"] == "judged"].reset_index(drop=True)
    foreign = run[run["kind"] == "foreign"]
    top = _top(run, top_k)
    out: dict[str, Any] = {
        "num_queries": int(run["query_id"].nunique()),
        "results": len(run),
        "judged_returned": len(judged),
        "foreign_returned": len(foreign),
        "unjudged_returned": int((run["kind"] == "unjudged").sum()),
        "share_E_all": _share_e(run["esci_pred"]),
        f"share_E_top{top_k}": _share_e(top["esci_pred"]),
        "ndcg@10_e2e": _e2e_ndcg(run, ideal, 10),
        "foreign": _shares(foreign["esci_pred"]),
        f"foreign_top{top_k}": _shares(top.loc[top["kind"] == "foreign", "esci_pred"]),
    }
    out |= judged_label_quality(judged)
    if len(judged):
        metrics = evaluate_run(judged.drop(columns=["kind"]), threshold=threshold)
        # a model without class heads (a score student) has no Task 2/3 metrics: NaN, no matrix
        task2, task3, nan = metrics.get("task2", {}), metrics.get("task3", {}), float("nan")
        out["judged"] = {
            "ndcg": metrics["task1"]["ndcg"],
            "task2_micro_f1": task2.get("micro_f1", nan),
            "task2_macro_f1": task2.get("macro_f1", nan),
            "task3_micro_f1": task3.get("micro_f1", nan),
            "task3_auc": task3.get("auc", nan),
        }
        if "confusion_matrix" in task2:
            out["judged"]["confusion_matrix"] = task2["confusion_matrix"]
    return out


def judged_label_quality(run: pd.DataFrame) -> dict[str, float]:
    """Of judged rows (``esci_label``, ``esci_pred``, ``esci_probs``): the recall of I on the
    judged-irrelevant, the precision of E, and the ECE of P(E) and P(S); NaN for a model
    without class heads (no labels, NaN probabilities)."""
    if not len(labelled_classes(run["esci_pred"])):
        nan = float("nan")
        return {"judged_I_recall": nan, "E_precision": nan, "ece_E": nan, "ece_S": nan}
    labels = run["esci_label"].to_numpy()
    pred = run["esci_pred"].astype(str).to_numpy()
    irrelevant, called_e = labels == "I", pred == "E"
    probs = np.stack(run["esci_probs"].to_numpy()).astype(np.float64)
    return {
        "judged_I_recall": float((pred[irrelevant] == "I").mean()) if irrelevant.any() else float("nan"),
        "E_precision": float((labels[called_e] == "E").mean()) if called_e.any() else float("nan"),
        "ece_E": expected_calibration_error(probs[:, 0], labels == "E"),
        "ece_S": expected_calibration_error(probs[:, 1], labels == "S"),
    }


def flow_metrics(
    run: pd.DataFrame,
    ideal: Mapping[object, np.ndarray],
    top_k: int = DEFAULT_TOP_K,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """``flow_summary`` overall (``overall``), per ESCI query type (``by_type``, when the run has
    ``esci_query_source``) and the reliability bins of P(E) and P(S) on the judged products."""
    out: dict[str, Any] = {"overall": flow_summary(run, ideal, top_k, threshold), "by_type": {}}
    if QUERY_SOURCE_COLUMN in run.columns:
        for qtype, rows in run.groupby(QUERY_SOURCE_COLUMN, sort=True):
            out["by_type"][str(qtype)] = flow_summary(rows, ideal, top_k, threshold)
    judged = run[run["kind"] == "judged"]
    if len(labelled_classes(judged["esci_pred"])):  # a model without class heads has nothing to calibrate
        probs = np.stack(judged["esci_probs"].to_numpy()).astype(np.float64)
        labels = judged["esci_label"].to_numpy()
        out["reliability"] = {
            c: reliability(probs[:, i], labels == c) for i, c in enumerate(ESCI_LABELS) if c in ("E", "S")
        }
    return out


def ideal_gains(frame: pd.DataFrame) -> dict[object, np.ndarray]:
    """query id -> the ESCI gains of its judged list (``flow_summary``'s ideal)."""
    gains = frame["esci_label"].map(ESCI_GAINS).to_numpy(dtype=np.float64)
    return {qid: gains[idx] for qid, idx in frame.groupby("query_id", sort=False).indices.items()}
