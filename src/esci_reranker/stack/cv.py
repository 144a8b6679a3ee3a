"""Cross-validation of the stacker on out-of-fold cross-encoder outputs.

``esci-reranker cv --oof`` trains the cross-encoder on k query folds of the train+val queries and
scores each fold's held-out queries (``oof.parquet``). Here the stacker is cross-validated on
the same folds: for each fold f, the trees are fitted on the other folds' rows (whose
cross-encoder columns came from models that never trained on those queries) and predict fold f.
Every fold is also scored by the cross-encoder alone, so the stacker's gain is paired by fold.
The test split is never read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from esci_reranker.data.text import FIELD_COLUMNS
from esci_reranker.eval.calibration import calibration_counts, pooled_ece
from esci_reranker.eval.evaluator import QUERY_SOURCE_COLUMN, evaluate_run
from esci_reranker.eval.flow import judged_label_quality
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


def oof_stack_table(
    frame: pd.DataFrame, oof: pd.DataFrame, seed: int, negatives: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The stack table of the train+val rows with one seed's out-of-fold cross-encoder columns.

    ``negatives`` (optional) are catalogue negatives with their own out-of-fold cross-encoder
    columns (``NEGATIVE_COLUMNS``: each scored by the fold model of its query, which never saw
    that query); their rows follow the judged ones, marked ``is_negative`` and labelled I, with
    features computed within each query's list of negatives, so the judged rows' list features
    are the same with or without them.

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
    if negatives is None or not len(negatives):
        return table
    table["is_negative"] = 0
    table["weight"] = 1.0
    return pd.concat([table, negative_stack_table(negatives, seed)], ignore_index=True)


#: Columns of a catalogue-negatives table besides the product fields and cross-encoder columns.
NEGATIVE_COLUMNS: tuple[str, ...] = ("seed", "fold", "query_id", "query", "product_id", "weight")


def negative_stack_table(negatives: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Stack rows of one seed's catalogue negatives (see ``oof_stack_table``)."""
    missing = [c for c in (*NEGATIVE_COLUMNS, "ce_score") if c not in negatives.columns]
    if missing:
        raise ValueError(f"negatives table: no column(s) {missing}; expected {list(NEGATIVE_COLUMNS)}.")
    part = negatives[negatives["seed"] == seed].reset_index(drop=True).copy()
    if not len(part):
        raise ValueError(f"negatives table: no rows for seed {seed}.")
    part["esci_label"] = "I"
    model_columns = {c: part[c].to_numpy(np.float64) for c in CE_COLUMNS if c in part.columns}
    rows = stack_table(part, model_columns)
    rows.insert(0, "fold", part["fold"].astype(int).to_numpy())
    rows["is_negative"] = 1
    rows["weight"] = part["weight"].to_numpy(np.float64)
    return rows


def outer_split(table: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training and held-out rows of outer ``fold`` of a stack table.

    Held out: the fold's judged rows. Training: the other folds' rows, less every catalogue
    negative whose product is judged for a held-out query (a held-out product never teaches
    the trees anything).
    """
    negative = (
        table["is_negative"].to_numpy(bool) if "is_negative" in table.columns else np.zeros(len(table), bool)
    )
    in_fold = table["fold"].to_numpy() == fold
    held_products = set(table.loc[in_fold & ~negative, "product_id"])
    leaks = negative & table["product_id"].isin(held_products).to_numpy()
    train = table[~in_fold & ~leaks].reset_index(drop=True)
    test = table[in_fold & ~negative].reset_index(drop=True)
    return train, test


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
    if "ce_gain" not in table.columns:  # a single-task model: Task 1 only
        return run
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
    out = {
        "num_queries": float(metrics["num_queries"]),
        "ndcg": metrics["task1"]["ndcg"],
        "ndcg@10": metrics["task1"]["ndcg@10"],
    }
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


def fold_stackers(
    table: pd.DataFrame,
    params: GBDTParams | None = None,
    features: Sequence[str] | None = None,
    task2_objective: str = "micro_f1",
    task3_objective: str = "micro_f1",
    **fit_options: Any,
) -> Iterator[tuple[int, Stacker, pd.DataFrame]]:
    """Per outer fold of an ``oof_stack_table``: the stacker fitted on the other folds' rows and
    the fold's own judged rows (which it never saw), as ``(fold, stacker, rows)``; the split is
    ``outer_split``'s. ``fit_options`` go to ``fit_stacker`` (``class_features``, ...)."""
    names = list(features) if features is not None else feature_columns(table)
    for fold in sorted(table["fold"].unique()):
        train, test = outer_split(table, int(fold))
        stacker, _ = fit_stacker(
            train,
            params,
            features=names,
            task2_objective=task2_objective,
            task3_objective=task3_objective,
            **fit_options,
        )
        yield int(fold), stacker, test


def run_summary(run: pd.DataFrame, threshold: float = 0.5) -> dict[str, Any]:
    """A run frame's ``summary_metrics``, overall and per ESCI query type.

    Returns ``{"overall": summary, "by_type": {type: summary}}`` (``by_type`` empty without
    ``esci_query_source``); ``threshold`` is the Task 3 decision threshold.
    """
    metrics = evaluate_run(run, threshold=threshold)
    classes = "esci_probs" in run.columns

    def summary(rows: pd.DataFrame, m: Mapping[str, Any]) -> dict[str, float]:
        # the label quality the search flow is judged by, on the judged lists too
        quality = judged_label_quality(rows) if classes else {}
        return summary_metrics(m, rows["esci_label"].tolist()) | quality

    return {
        "overall": summary(run, metrics),
        "by_type": {
            t: summary(run[run[QUERY_SOURCE_COLUMN] == t], m)
            for t, m in metrics.get("by_query_type", {}).items()
        },
    }


def add_run(entry: dict[str, Any], name: str, run: pd.DataFrame, threshold: float = 0.5) -> None:
    """Put a run's metrics into a CV entry as ``entry[name]`` and ``entry[name + "_by_type"]``."""
    summary = run_summary(run, threshold)
    entry[name], entry[f"{name}_by_type"] = summary["overall"], summary["by_type"]


def cross_validate_stacker(
    folds: Iterable[tuple[int, Stacker, pd.DataFrame]],
    baseline_runs: Mapping[str, pd.DataFrame] | None = None,
    on_fold: Callable[[int, Stacker, pd.DataFrame], Mapping[str, Any]] | None = None,
    predictions: list[pd.DataFrame] | None = None,
) -> list[dict[str, Any]]:
    """Per outer fold: the stacker's and the cross-encoder's metrics on the fold's queries.

    ``folds`` are ``(fold, stacker, rows)``: each fold's stacker and the held-out rows it never
    saw, as ``fold_stackers`` fits them on an ``oof_stack_table``. The per-fold models come in
    explicitly, so the scoring here cannot reach a model that trained on the rows it scores.
    Each entry holds ``fold``, ``stacker`` and ``cross_encoder`` (``summary_metrics``), their
    per-query-type breakdowns (``*_by_type``), the stacker's chosen ``rounds`` and ``rules``, and
    ``calibration``: the stacker's P(E) and P(S) reliability counts (``calibration_counts``),
    which ``cv_summary`` pools over the folds of a seed.
    ``baseline_runs`` (name -> run frame over the same rows, e.g. ``bm25``, ``bi-encoder``)
    are evaluated on each fold's queries too. ``on_fold(fold, stacker, rows)`` (e.g. the search
    flow of the fold's queries, given by a caller that can retrieve) adds its keys to the entry.
    ``predictions`` (optional) receives each fold's ``stack_predictions`` of the held-out rows.
    """
    results = []
    for fold, stacker, test in folds:
        fold_queries = set(test["query_id"])
        baselines = {
            name: run[run["query_id"].isin(fold_queries)].reset_index(drop=True)
            for name, run in (baseline_runs or {}).items()
        }
        entry: dict[str, Any] = {
            "fold": fold,
            "rounds": stacker.rounds,
            "rules": stacker.rules.to_dict(),
        }
        stacked = stacker_run(stacker, test)
        for name, run, threshold in (
            ("stacker", stacked, stacker.rules.substitute_threshold),
            ("cross_encoder", cross_encoder_run(test) if "ce_score" in test.columns else None, 0.5),
            *((name, run, 0.5) for name, run in baselines.items()),
        ):
            if run is not None:
                add_run(entry, name, run, threshold)
        probs = np.stack(stacked["esci_probs"].to_numpy())
        labels = stacked["esci_label"].to_numpy()
        if predictions is not None:
            predictions.append(stack_predictions(stacked, fold))
        entry["calibration"] = {
            label: calibration_counts(probs[:, i], labels == label) for i, label in enumerate(ESCI_LABELS[:2])
        }
        if on_fold is not None:
            entry |= dict(on_fold(fold, stacker, test))
        results.append(entry)
    return results


def stack_predictions(run: pd.DataFrame, fold: int) -> pd.DataFrame:
    """A flat table of a stacker run on one outer fold's held-out rows (``stack_oof.parquet``):
    ``fold``, the ids, ``esci_label`` and the query type, ``score``, ``p_E`` .. ``p_I``,
    ``esci_pred`` (after the fold's decision rules) and ``substitute_prob``.

    The probabilities are the stacker's own, before the class offsets, so a reader can try
    other operating points on predictions no training saw.
    """
    table = _ids(run)
    table.insert(0, "fold", fold)
    table["score"] = run["score"].to_numpy()
    probs = np.stack(run["esci_probs"].to_numpy()) if len(run) else np.zeros((0, len(ESCI_LABELS)))
    for i, label in enumerate(ESCI_LABELS):
        table[f"p_{label}"] = probs[:, i]
    table["esci_pred"] = run["esci_pred"].to_numpy()
    table["substitute_prob"] = run["substitute_prob"].to_numpy()
    return table


#: Models of a stack CV entry, in table order (baselines follow when present).
CV_MODELS: tuple[str, ...] = ("stacker", "cross_encoder", "title_only", "bm25", "bi-encoder", "flow")
#: The search-flow table's columns (``retrieval.flow.FoldFlow``'s keys): (key, header).
FLOW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ndcg@10_e2e", "e2e nDCG@10"),
    ("share_E_all", "E share (all)"),
    ("share_E_top20", "E share (top 20)"),
    ("judged_I_recall", "judged-I recall"),
    ("E_precision", "E precision"),
    ("foreign_share_E", "foreign E"),
    ("foreign_share_I", "foreign I"),
    ("judged_task2_micro_f1", "judged T2 micro-F1"),
    ("judged_ndcg", "judged nDCG"),
)
#: The columns of the CV tables: (key of ``summary_metrics``, header).
CV_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ndcg", "nDCG"),
    ("ndcg@10", "nDCG@10"),
    ("task2_micro_f1", "T2 micro-F1"),
    ("task2_macro_f1", "T2 macro-F1"),
    ("task3_micro_f1", "T3 micro-F1"),
    ("task3_auc", "T3 AUC"),
    ("judged_I_recall", "I recall"),
    ("ece_E", "ECE P(E)"),
)


def cv_summary(entries: Sequence[Mapping[str, Any]], models: Sequence[str] = CV_MODELS) -> dict[str, Any]:
    """Mean and std over entries (folds x seeds) of every model's metrics, overall and per query type.

    ``models`` are the entry keys to summarise, in table order (those absent from an entry are
    left out). Returns ``{"overall": {model: {metric: {"mean", "std"}}}, "by_type": {type:
    {model: ...}}}``; the per-type numbers average the folds where the type occurs.
    """

    def stats(rows: list[Mapping[str, float]]) -> dict[str, dict[str, float]]:
        keys = [k for k in rows[0] if all(k in r for r in rows)]
        return {
            k: {
                "mean": float(np.nanmean([r[k] for r in rows])),
                "std": float(np.nanstd([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0,
            }
            for k in keys
        }

    overall = {m: stats([e[m] for e in entries]) for m in models if all(m in e for e in entries)}
    types = sorted({t for e in entries for m in overall for t in e.get(f"{m}_by_type", {})})
    by_type: dict[str, dict[str, Any]] = {}
    for t in types:
        by_type[t] = {
            m: stats([e[f"{m}_by_type"][t] for e in entries if t in e.get(f"{m}_by_type", {})])
            for m in overall
            if any(t in e.get(f"{m}_by_type", {}) for e in entries)
        }
    out: dict[str, Any] = {"runs": len(entries), "overall": overall, "by_type": by_type}
    pooled = pooled_calibration(entries)
    if pooled:
        out["pooled"] = pooled
    return out


def pooled_calibration(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The stacker's ECE of P(E) and P(S) over every out-of-fold pair of a seed (its folds pooled),
    as mean and std over seeds (``seeds``: how many); empty when no entry has ``calibration`` counts.

    A fold's own ECE (``ece_E`` in its entry) bins ~1,200 pairs on the bundled sample, too few for
    the binned rates to be exact: a perfectly calibrated model would still score ~0.027 there (labels
    drawn from its own P(E), docs/results.md). Pooling a seed's folds bins 4x the pairs.
    """
    by_seed: dict[Any, list[Mapping[str, Any]]] = defaultdict(list)
    for entry in entries:
        if "calibration" in entry:
            by_seed[entry.get("seed", 0)].append(entry["calibration"])
    if not by_seed:
        return {}
    out: dict[str, Any] = {"seeds": len(by_seed)}
    for label in ESCI_LABELS[:2]:
        values = [pooled_ece(counts[label] for counts in seed) for seed in by_seed.values()]
        out[f"ece_{label}"] = {
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        }
    return out


def _number(value: float | None) -> str:
    # a summary read back from stack_cv.json has null where it had NaN
    return f"{float('nan') if value is None else value:.3f}"


def _cell(stat: Mapping[str, Mapping[str, float | None]], key: str) -> str:
    if key not in stat:
        return ""
    return f"{_number(stat[key]['mean'])} ± {_number(stat[key]['std'])}"


def cv_tables(summary: Mapping[str, Any]) -> str:
    """Markdown tables of ``cv_summary``: every model overall, then each query type."""
    header = "| model | " + " | ".join(h for _, h in CV_COLUMNS) + " |"
    rule = "|:---|" + "---:|" * len(CV_COLUMNS)
    lines = [header, rule]
    for model, stat in summary["overall"].items():
        if model != "flow":
            lines.append(f"| {model} | " + " | ".join(_cell(stat, k) for k, _ in CV_COLUMNS) + " |")
    lines += [
        "",
        "By ESCI query type:",
        "",
        "| query type | model | " + header[len("| model | ") :],
        "|:---|:---|" + "---:|" * len(CV_COLUMNS),
    ]
    for qtype, models in summary["by_type"].items():
        for model, stat in models.items():
            if model != "flow":
                lines.append(
                    f"| {qtype} | {model} | " + " | ".join(_cell(stat, k) for k, _ in CV_COLUMNS) + " |"
                )
    if "pooled" in summary:
        pooled = summary["pooled"]
        if pooled.get("seeds", 1) > 1:
            over, e, s = "mean ± std over seeds", _cell(pooled, "ece_E"), _cell(pooled, "ece_S")
        else:
            over, e, s = "one seed", _number(pooled["ece_E"]["mean"]), _number(pooled["ece_S"]["mean"])
        lines += [
            "",
            f"Stacker calibration, each seed's out-of-fold pairs pooled ({over}): ECE of P(E) {e}, of P(S) {s}.",
        ]
    if "flow" in summary["overall"]:
        lines += ["", flow_table(summary)]
    return "\n".join(lines)


def flow_table(summary: Mapping[str, Any]) -> str:
    """Markdown table of the search flow (each fold's held-out queries retrieving from the train+val
    catalogue, top 100 reranked): overall, then per query type."""
    header = "| search flow | " + " | ".join(h for _, h in FLOW_COLUMNS) + " |"
    lines = [header, "|:---|" + "---:|" * len(FLOW_COLUMNS)]
    rows = [("all queries", summary["overall"]["flow"])]
    rows += [(t, m["flow"]) for t, m in summary["by_type"].items() if "flow" in m]
    for name, stat in rows:
        lines.append(f"| {name} | " + " | ".join(_cell(stat, k) for k, _ in FLOW_COLUMNS) + " |")
    return "\n".join(lines)


def oof_entries(oof: pd.DataFrame) -> list[dict[str, Any]]:
    """``cross_validate_stacker``-shaped entries of the cross-encoder alone, one per (fold, seed)
    of an ``oof.parquet``: what ``cv_summary`` needs for a config without a stacker."""
    entries = []
    for (fold, seed), rows in oof.groupby(["fold", "seed"], sort=True):
        entry: dict[str, Any] = {"fold": int(fold), "seed": int(seed)}
        add_run(entry, "cross_encoder", cross_encoder_run(rows.reset_index(drop=True)))
        entries.append(entry)
    return entries
