"""Evaluate a run frame into the ``metrics.json`` structure. Computes only; callers write files.

A **run frame** has one row per (query, product) pair:

=================== ========== ====================================================================
column              required   meaning
=================== ========== ====================================================================
``query_id``        yes        int64 query id
``product_id``      yes        product id (ASIN)
``esci_label``      yes        true label, E/S/C/I
``score``           yes        ranking score, higher is better (Task 1)
``expected_gain``   no         ``sum_c P(c) * gain(c)``; Task 1 is scored a second time by it
``esci_pred``       no         predicted class E/S/C/I (Task 2)
``esci_probs``      no         list of 4 probabilities in E, S, C, I order
``substitute_prob`` no         probability of "substitute" (Task 3)
``esci_query_source`` no       ESCI query type; adds nDCG per query type
=================== ========== ====================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import pandas as pd

from esci_reranker.eval.classification import (
    DEFAULT_THRESHOLD,
    confusion_matrix,
    esci_classification_metrics,
    per_class_scores,
    substitute_metrics,
)
from esci_reranker.eval.ranking import (
    DEFAULT_CUTOFF,
    DEFAULT_RELEVANT,
    mean_over_queries,
    parse_relevant,
    per_query_ranking_metrics,
)
from esci_reranker.labels import ESCI_LABELS, gain_table

RUN_COLUMNS: Final[tuple[str, ...]] = ("query_id", "product_id", "esci_label", "score")
OPTIONAL_RUN_COLUMNS: Final[tuple[str, ...]] = (
    "expected_gain",
    "esci_pred",
    "esci_probs",
    "substitute_prob",
    "esci_query_source",
)
#: Column holding the ESCI query type, used for the per-type breakdown.
QUERY_SOURCE_COLUMN: Final[str] = "esci_query_source"
#: Columns a prepared split needs to be scored by a model or a baseline (plus product text).
SPLIT_COLUMNS: Final[tuple[str, ...]] = ("query_id", "query", "product_id", "esci_label")


def check_split(frame: pd.DataFrame, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` when a prepared split lacks ``SPLIT_COLUMNS``."""
    missing = [c for c in SPLIT_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{where}: the data is missing column(s) {missing}; expected a split written by "
            f"`esci-reranker prepare` with {list(SPLIT_COLUMNS)} and product text "
            f"(has {list(frame.columns)})."
        )


def check_run(run: pd.DataFrame, where: str = "run") -> None:
    """Raise ``ValueError`` naming ``where`` when a required run column is missing."""
    missing = [c for c in RUN_COLUMNS if c not in run.columns]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {missing}; a run needs {list(RUN_COLUMNS)} "
            f"(has {list(run.columns)})."
        )


def ranking_by_group(per_query: pd.DataFrame, groups: pd.Series) -> dict[str, dict[str, float]]:
    """Mean of each per-query metric within each group, plus ``num_queries``.

    ``groups`` maps ``query_id`` (its index) to a group name; queries without a group are left out.
    """
    joined = per_query.assign(_group=per_query["query_id"].map(groups)).dropna(subset=["_group"])
    return {
        str(name): {"num_queries": len(part)} | mean_over_queries(part.drop(columns="_group"))
        for name, part in joined.groupby("_group", sort=True)
    }


def _task1(
    run: pd.DataFrame, score_column: str, gains: str, relevant: tuple[str, ...], cutoff: int
) -> tuple[dict[str, float], dict[str, dict[str, float]] | None]:
    per_query = per_query_ranking_metrics(run, score_column, gains, relevant, cutoff)
    means = mean_over_queries(per_query)
    by_source = None
    if QUERY_SOURCE_COLUMN in run.columns:
        sources = run.groupby("query_id", sort=False)[QUERY_SOURCE_COLUMN].first().astype(object)
        by_source = ranking_by_group(per_query, sources)
    return means, by_source


def labelled_classes(pred: pd.Series) -> pd.Series:
    """The predicted classes that are classes: a model without class heads predicts ``""``."""
    pred = pred.astype(str)
    return pred[pred != ""]


def evaluate_run(
    run: pd.DataFrame,
    gains: str = "esci",
    relevant: Iterable[str] = DEFAULT_RELEVANT,
    cutoff: int = DEFAULT_CUTOFF,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, Any]:
    """All metrics of a run frame, shaped as ``metrics.json``.

    Returns a dict with ``gains``, ``relevant_labels``, ``cutoff``, ``num_queries``,
    ``num_pairs`` and

    - ``task1``: ``ndcg, ndcg@k, mrr, map, recall@k, precision@k`` ranking by ``score``
      (see ``esci_reranker.eval.ranking``), and ``task1_by_query_source`` when the run has
      ``esci_query_source``;
    - ``task1_expected_gain`` (and ``task1_expected_gain_by_query_source``): the same ranking by
      ``expected_gain``, when that column exists and is not all NaN;
    - ``task2``: ``accuracy, micro_f1, macro_f1``, ``per_class`` (precision/recall/f1/support of
      E, S, C, I), ``confusion_matrix`` (list of rows, true E,S,C,I x predicted E,S,C,I) and
      ``labels``, when ``esci_pred`` exists;
    - ``task3``: ``accuracy, f1, micro_f1, macro_f1, auc`` and ``threshold``, when
      ``substitute_prob`` exists and is not all NaN;
    - ``by_query_type``: when the run has ``esci_query_source``, each type's ``num_queries``,
      ``num_pairs`` and every Task 1/2/3 section above (without the confusion matrix).

    The input is not modified.
    """
    check_run(run)
    gain_table(gains)  # validate the name early
    relevant_labels = parse_relevant(relevant)
    metrics: dict[str, Any] = {
        "gains": gains,
        "relevant_labels": list(relevant_labels),
        "cutoff": cutoff,
        "num_queries": int(run["query_id"].nunique()),
        "num_pairs": len(run),
    }
    metrics["task1"], by_source = _task1(run, "score", gains, relevant_labels, cutoff)
    if by_source is not None:
        metrics["task1_by_query_source"] = by_source
    if _has_values(run, "expected_gain"):
        metrics["task1_expected_gain"], by_source = _task1(
            run, "expected_gain", gains, relevant_labels, cutoff
        )
        if by_source is not None:
            metrics["task1_expected_gain_by_query_source"] = by_source
    if "esci_pred" in run.columns and len(labelled_classes(run["esci_pred"])):
        true, pred = run["esci_label"].astype(str), run["esci_pred"].astype(str)
        matrix = confusion_matrix(true, pred)
        metrics["task2"] = esci_classification_metrics(true, pred) | {
            "per_class": per_class_scores(matrix),
            "confusion_matrix": matrix.tolist(),
            "labels": list(ESCI_LABELS),
        }
    if _has_values(run, "substitute_prob"):
        metrics["task3"] = substitute_metrics(
            run["esci_label"].astype(str), run["substitute_prob"], threshold
        ) | {"threshold": threshold}
    if QUERY_SOURCE_COLUMN in run.columns:
        metrics["by_query_type"] = {
            str(name): _type_metrics(
                evaluate_run(
                    part.drop(columns=QUERY_SOURCE_COLUMN), gains, relevant_labels, cutoff, threshold
                )
            )
            for name, part in run.groupby(run[QUERY_SOURCE_COLUMN].astype(str), sort=True)
        }
    return metrics


#: What ``by_query_type`` keeps of each type's ``evaluate_run`` result.
_TYPE_SECTIONS: Final[tuple[str, ...]] = (
    "num_queries",
    "num_pairs",
    "task1",
    "task1_expected_gain",
    "task2",
    "task3",
)


def _type_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One query type's metrics: every Task 1/2/3 number, without the confusion matrix."""
    out = {k: metrics[k] for k in _TYPE_SECTIONS if k in metrics}
    if "task2" in out:
        out["task2"] = {k: v for k, v in out["task2"].items() if k not in ("confusion_matrix", "labels")}
    return out


def _has_values(run: pd.DataFrame, column: str) -> bool:
    return column in run.columns and bool(run[column].notna().any())


def average_metrics(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Element-wise mean of several ``evaluate_run`` results with the same keys (e.g. random seeds).

    Numbers are averaged, nested dicts recursively, anything else (names, label lists) is taken
    from the first result. Adds nothing and drops nothing.
    """
    if not runs:
        raise ValueError("average_metrics: got no results to average.")
    first = runs[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, Mapping):
            out[key] = average_metrics([r[key] for r in runs])
        elif isinstance(value, bool) or not isinstance(value, int | float):
            out[key] = value
        else:
            mean = float(np.mean([r[key] for r in runs]))
            out[key] = int(value) if isinstance(value, int) and mean == value else mean
    return out
