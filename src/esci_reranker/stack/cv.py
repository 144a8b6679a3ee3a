"""Cross-validation of the stacker on out-of-fold cross-encoder outputs.

``esci-reranker cv --oof`` trains the cross-encoder on k query folds of the train+val queries and
scores each fold's held-out queries (``oof.parquet``). Here the stacker is cross-validated on
the same folds: for each fold f, the trees are fitted on the other folds' rows (whose
cross-encoder columns came from models that never trained on those queries) and predict fold f.
Every fold is also scored by the cross-encoder alone, so the stacker's gain is paired by fold.
The test split is never read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from esci_reranker.data.text import FIELD_COLUMNS
from esci_reranker.eval.evaluator import QUERY_SOURCE_COLUMN, evaluate_run
from esci_reranker.labels import ESCI_LABELS
from esci_reranker.stack.features import PRODUCT_FIELDS, feature_table
from esci_reranker.stack.outputs import CE_COLUMNS
from esci_reranker.stack.stacker import GBDTParams, Stacker, feature_columns, fit_stacker


def split_fields(frame: pd.DataFrame) -> dict[str, list[str]]:
    """The ``PRODUCT_FIELDS`` texts of a prepared split's rows ("" where missing)."""
    return {
        name: frame[FIELD_COLUMNS[name]].fillna("").astype(str).tolist()
        if FIELD_COLUMNS[name] in frame.columns
        else [""] * len(frame)
        for name in PRODUCT_FIELDS
    }


def stack_table(frame: pd.DataFrame, model_columns: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Id columns of a prepared split plus every stack feature (and the model columns given)."""
    features = feature_table(
        frame["query"].astype(str).tolist(), split_fields(frame), frame["query_id"].tolist(), model_columns
    )
    ids = [c for c in ("query_id", "product_id", "esci_label", QUERY_SOURCE_COLUMN) if c in frame.columns]
    return pd.concat([frame[ids].reset_index(drop=True), features], axis=1)


def oof_stack_table(frame: pd.DataFrame, oof: pd.DataFrame, seed: int) -> pd.DataFrame:
    """The stack table of the train+val rows with one seed's out-of-fold cross-encoder columns.

    Raises:
        ValueError: a row of ``frame`` has no out-of-fold output for ``seed``.
    """
    part = oof[oof["seed"] == seed]
    keep = ["query_id", "product_id", "fold", *[c for c in CE_COLUMNS if c in part.columns]]
    merged = frame.merge(part[keep], on=["query_id", "product_id"], how="left", validate="one_to_one")
    if merged["fold"].isna().any():
        missing = merged.loc[merged["fold"].isna(), "query_id"].unique()[:3].tolist()
        raise ValueError(f"oof table: seed {seed} has no out-of-fold outputs for queries {missing}.")
    model_columns = {c: merged[c].to_numpy(np.float64) for c in CE_COLUMNS if c in merged.columns}
    table = stack_table(merged, model_columns)
    table.insert(0, "fold", merged["fold"].astype(int).to_numpy())
    return table


def stacker_run(stacker: Stacker, table: pd.DataFrame) -> pd.DataFrame:
    """A run frame (``eval.evaluator``) of the stacker's predictions on a stack table."""
    out = stacker.predict(table)
    run = _ids(table)
    run["score"] = out["score"]
    probs = out["probs"]
    run["expected_gain"] = probs @ np.array([1.0, 0.1, 0.01, 0.0])
    run["esci_pred"] = np.asarray(ESCI_LABELS)[out["classes"]]
    run["esci_probs"] = list(probs)
    run["substitute_prob"] = out["substitute_prob"]
    return run


def cross_encoder_run(table: pd.DataFrame) -> pd.DataFrame:
    """A run frame of the cross-encoder alone (its argmax classes, 0.5 substitute threshold)."""
    run = _ids(table)
    run["score"] = table["ce_score"].to_numpy()
    probs = table[[f"ce_p_{c}" for c in ESCI_LABELS]].to_numpy()
    run["expected_gain"] = table["ce_gain"].to_numpy()
    run["esci_pred"] = np.asarray(ESCI_LABELS)[probs.argmax(axis=1)]
    run["esci_probs"] = list(probs)
    run["substitute_prob"] = table["ce_sub"].to_numpy()
    return run


def _ids(table: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ("query_id", "product_id", "esci_label", QUERY_SOURCE_COLUMN) if c in table.columns]
    return table[cols].reset_index(drop=True).copy()


def summary_metrics(metrics: Mapping[str, Any], labels: Sequence[str]) -> dict[str, float]:
    """The headline numbers of an ``evaluate_run`` result, with the trivial classifiers' rates."""
    labels = np.asarray(labels)
    out = {"ndcg": metrics["task1"]["ndcg"], "ndcg@10": metrics["task1"]["ndcg@10"]}
    if "task2" in metrics:
        out |= {
            "task2_micro_f1": metrics["task2"]["micro_f1"],
            "task2_macro_f1": metrics["task2"]["macro_f1"],
        }
    if "task3" in metrics:
        t3 = metrics["task3"]
        out |= {"task3_micro_f1": t3["micro_f1"], "task3_auc": t3["auc"], "task3_f1": t3["f1"]}
    out["always_E"] = float(np.mean(labels == "E"))
    out["never_S"] = float(np.mean(labels != "S"))
    return out


def cross_validate_stacker(
    table: pd.DataFrame,
    params: GBDTParams | None = None,
    features: Sequence[str] | None = None,
    task2_objective: str = "micro_f1",
    task3_objective: str = "micro_f1",
) -> list[dict[str, Any]]:
    """Per outer fold: the stacker's and the cross-encoder's metrics on the fold's queries.

    ``table`` is an ``oof_stack_table`` (a ``fold`` column and the features). Each entry holds
    ``fold``, ``stacker`` and ``cross_encoder`` (``summary_metrics``), their per-query-type
    breakdowns (``*_by_type``) and the stacker's chosen ``rounds`` and ``rules``.
    """
    names = list(features) if features is not None else feature_columns(table)
    results = []
    for fold in sorted(table["fold"].unique()):
        train, test = table[table["fold"] != fold], table[table["fold"] == fold]
        stacker, _ = fit_stacker(
            train.reset_index(drop=True),
            params,
            features=names,
            task2_objective=task2_objective,
            task3_objective=task3_objective,
        )
        entry: dict[str, Any] = {
            "fold": int(fold),
            "rounds": stacker.rounds,
            "rules": stacker.rules.to_dict(),
        }
        for name, run, threshold in (
            ("stacker", stacker_run(stacker, test), stacker.rules.substitute_threshold),
            ("cross_encoder", cross_encoder_run(test) if "ce_score" in test.columns else None, 0.5),
        ):
            if run is None:
                continue
            metrics = evaluate_run(run, threshold=threshold)
            entry[name] = summary_metrics(metrics, run["esci_label"].tolist())
            entry[f"{name}_by_type"] = {
                t: summary_metrics(m, run.loc[run[QUERY_SOURCE_COLUMN] == t, "esci_label"].tolist())
                for t, m in metrics.get("by_query_type", {}).items()
            }
        results.append(entry)
    return results
