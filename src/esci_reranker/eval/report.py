"""Markdown report and comparison table of a model against the baselines on the same split.

Everything here turns ``metrics.json``-shaped dicts (``evaluate_run``'s output) into text; it
computes no metric and writes no file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from esci_reranker.eval.ranking import DEFAULT_CUTOFF
from esci_reranker.labels import ESCI_LABELS, LABEL_NAMES, gain_table

Metrics = Mapping[str, Any]


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; floats with 4 decimals, first column left-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _task1_columns(cutoff: int) -> list[tuple[str, str]]:
    k = cutoff
    return [
        ("ndcg", "nDCG"),
        (f"ndcg@{k}", f"nDCG@{k}"),
        ("mrr", "MRR"),
        ("map", "MAP"),
        (f"recall@{k}", f"Recall@{k}"),
        (f"precision@{k}", f"P@{k}"),
    ]


def _run_label(name: str, metrics: Metrics) -> str:
    seeds = metrics.get("num_seeds")
    return f"{name} (mean of {seeds} seeds)" if seeds else name


def comparison_rows(
    model_metrics: Metrics | None, baseline_metrics: Mapping[str, Metrics], model_label: str = "model"
) -> list[tuple[str, str, Metrics]]:
    """``(row label, metrics.json key, metrics)`` for every Task 1 row: the model by ``score``,
    by ``expected_gain`` when present, then each baseline."""
    rows: list[tuple[str, str, Metrics]] = []
    if model_metrics is not None:
        rows.append((f"{model_label} (score)", "task1", model_metrics))
        if "task1_expected_gain" in model_metrics:
            rows.append((f"{model_label} (expected gain)", "task1_expected_gain", model_metrics))
    rows += [(_run_label(name, m), "task1", m) for name, m in baseline_metrics.items()]
    return rows


def comparison_table(
    model_metrics: Metrics | None, baseline_metrics: Mapping[str, Metrics], model_label: str = "model"
) -> str:
    """Task 1 of the model and the baselines as one markdown table (also fine in a terminal)."""
    rows = comparison_rows(model_metrics, baseline_metrics, model_label)
    cutoff = rows[0][2].get("cutoff", DEFAULT_CUTOFF) if rows else DEFAULT_CUTOFF
    columns = _task1_columns(cutoff)
    return markdown_table(
        ["run", *[title for _, title in columns]],
        [[label, *[m[key].get(c) for c, _ in columns]] for label, key, m in rows],
    )


def describe_gains(name: str) -> str:
    """``"esci (E=1, S=0.1, C=0.01, I=0)"``."""
    table = gain_table(name)
    return f"{name} (" + ", ".join(f"{label}={table[label]:g}" for label in ESCI_LABELS) + ")"


def _by_source_table(
    model_metrics: Metrics, baseline_metrics: Mapping[str, Metrics], label: str
) -> str | None:
    candidates = [
        (f"{label} (score)", model_metrics.get("task1_by_query_source")),
        (f"{label} (expected gain)", model_metrics.get("task1_expected_gain_by_query_source")),
    ] + [(_run_label(name, m), m.get("task1_by_query_source")) for name, m in baseline_metrics.items()]
    runs: list[tuple[str, Metrics]] = [(name, by) for name, by in candidates if by]
    if not runs:
        return None
    sources = sorted({s for _, by in runs for s in by})
    reference = runs[0][1]
    rows = [
        [s, int(reference.get(s, {}).get("num_queries", 0)), *[by.get(s, {}).get("ndcg") for _, by in runs]]
        for s in sources
    ]
    return markdown_table(["query type", "queries", *[name for name, _ in runs]], rows)


def _by_type_table(by_type: Mapping[str, Metrics]) -> str:
    """One row per query type: queries, Task 1 nDCG/nDCG@10/MRR, Task 2 and Task 3 figures."""
    rows = []
    for name, m in by_type.items():
        t1, t2, t3 = m.get("task1", {}), m.get("task2", {}), m.get("task3", {})
        rows.append(
            [
                name,
                m.get("num_queries", ""),
                t1.get("ndcg", ""),
                t1.get("ndcg@10", ""),
                t1.get("mrr", ""),
                t2.get("micro_f1", ""),
                t2.get("macro_f1", ""),
                t3.get("micro_f1", ""),
                t3.get("f1", ""),
                t3.get("auc", ""),
            ]
        )
    header = ["query type", "queries", "nDCG", "nDCG@10", "MRR", "T2 micro-F1", "T2 macro-F1"]
    return markdown_table([*header, "T3 micro-F1", "T3 F1 (S)", "T3 AUC"], rows)


def _task2_section(task2: Metrics) -> list[str]:
    labels = task2.get("labels", list(ESCI_LABELS))
    per_class = task2["per_class"]
    out = [
        "## Task 2: E/S/C/I classification",
        "",
        markdown_table(
            ["accuracy", "micro F1", "macro F1"], [[task2["accuracy"], task2["micro_f1"], task2["macro_f1"]]]
        ),
        "",
        markdown_table(
            ["class", "precision", "recall", "F1", "support"],
            [
                [
                    f"{c} ({LABEL_NAMES[c]})",
                    per_class[c]["precision"],
                    per_class[c]["recall"],
                    per_class[c]["f1"],
                    int(per_class[c]["support"]),
                ]
                for c in labels
            ],
        ),
        "",
        "Confusion matrix (rows: true label, columns: predicted):",
        "",
        markdown_table(
            ["true \\ predicted", *labels],
            [[c, *row] for c, row in zip(labels, task2["confusion_matrix"], strict=True)],
        ),
        "",
    ]
    return out


def render_report(
    model_name: str,
    metrics: Metrics,
    baseline_metrics: Mapping[str, Metrics],
    plots: Mapping[str, str] | None = None,
    model_label: str = "model",
) -> str:
    """The ``report.md`` text: Task 1 against the baselines (same split), per query type, Tasks 2 and 3.

    Args:
        model_name: shown in the title (e.g. ``reranker.name``).
        metrics: the model's ``evaluate_run`` output.
        baseline_metrics: baseline name -> its metrics, in table order.
        plots: caption -> path relative to the report, embedded at the end.
    """
    cutoff = metrics.get("cutoff", DEFAULT_CUTOFF)
    relevant = ", ".join(metrics.get("relevant_labels", ["E"]))
    lines = [
        f"# Evaluation: {model_name}",
        "",
        f"- Split: {metrics['num_queries']} queries, {metrics['num_pairs']} (query, product) pairs.",
        f"- nDCG gains: {describe_gains(metrics['gains'])}; linear gains, log2 discount, no cutoff for nDCG.",
        f"- Relevant for MRR, MAP, Recall@{cutoff} and P@{cutoff}: {relevant}.",
        "- Ties in score are broken by product_id, descending (as trec_eval does).",
        "- Every number is a mean over queries.",
    ]
    mismatched = [
        name
        for name, m in baseline_metrics.items()
        if (m.get("num_queries"), m.get("num_pairs")) != (metrics["num_queries"], metrics["num_pairs"])
    ]
    if mismatched:
        lines.append(
            f"- **Warning:** {', '.join(mismatched)} scored a different split; rows are not comparable."
        )
    lines += [
        "",
        "## Task 1: ranking",
        "",
        comparison_table(metrics, baseline_metrics, model_label),
        "",
    ]
    if "task1_expected_gain" in metrics:
        lines += [
            "`score` ranks by the regression head; `expected gain` ranks by "
            "sum over classes of P(class) x gain(class) from the E/S/C/I head.",
            "",
        ]
    by_source = _by_source_table(metrics, baseline_metrics, model_label)
    if by_source:
        lines += ["### nDCG by query type (`esci_query_source`)", "", by_source, ""]
    if "task2" in metrics:
        lines += _task2_section(metrics["task2"])
    if "task3" in metrics:
        t3 = metrics["task3"]
        lines += [
            "## Task 3: substitute identification (S vs the rest)",
            "",
            f"Predicted substitute when substitute_prob >= {t3.get('threshold', 0.5):g}.",
            "",
            markdown_table(
                ["accuracy", "F1 (substitute)", "micro F1", "macro F1", "ROC-AUC"],
                [[t3["accuracy"], t3["f1"], t3["micro_f1"], t3["macro_f1"], t3["auc"]]],
            ),
            "",
        ]
    by_type = metrics.get("by_query_type")
    if by_type:
        lines += ["## Every task by query type (`esci_query_source`)", "", _by_type_table(by_type), ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{caption}]({path})\n" for caption, path in plots.items()]
    return "\n".join(lines).rstrip() + "\n"


def render_flow_section(
    metrics: Metrics, audit: Sequence[Mapping[str, Any]], top_k: int, retrieved: int, plot: str | None = None
) -> str:
    """The "Search flow" section of ``report.md``: ``eval.flow.flow_metrics`` of a run, the
    confusion matrix of the judged products that came back, and the foreign-rule audit sample."""
    overall = metrics["overall"]
    rows = [("all queries", overall), *metrics.get("by_type", {}).items()]
    header = [
        "queries",
        "results",
        "e2e nDCG@10",
        "E share (all)",
        f"E share (top {top_k})",
        "judged returned",
        "judged-I recall",
        "E precision",
        "foreign",
        "foreign E",
        "foreign I",
        "ECE P(E)",
        "ECE P(S)",
    ]
    table = [
        [
            name,
            m["num_queries"],
            m["results"],
            m["ndcg@10_e2e"],
            m["share_E_all"],
            m[f"share_E_top{top_k}"],
            m["judged_returned"],
            m["judged_I_recall"],
            m["E_precision"],
            m["foreign_returned"],
            m["foreign"]["share_E"],
            m["foreign"]["share_I"],
            m["ece_E"],
            m["ece_S"],
        ]
        for name, m in rows
    ]
    lines = [
        "## Search flow: retrieve, rerank, label",
        "",
        f"Each query retrieves the top {retrieved} products of the catalogue index; the model reranks and "
        "labels them. *Judged*: judged for this query. *Foreign*: judged only for other queries that share "
        "no content word with it (`eval.flow.is_foreign`); they should be labelled I. End-to-end nDCG@10 "
        "counts every product not judged for the query as irrelevant; its ideal is the whole judged list.",
        "",
        markdown_table(["", *header], table),
        "",
    ]
    judged = overall.get("judged")
    if judged and "confusion_matrix" in judged:  # not for a model without class heads
        matrix = judged["confusion_matrix"]
        lines += [
            "Judged products that came back (rows: true label, columns: predicted):",
            "",
            markdown_table(
                ["true \\ predicted", *ESCI_LABELS], [[c, *matrix[i]] for i, c in enumerate(ESCI_LABELS)]
            ),
            "",
        ]
    if plot:
        lines += [f"![calibration]({plot})", ""]
    if audit:
        lines += [
            f"### {len(audit)} random foreign results, to check the rule",
            "",
            markdown_table(
                ["query", "product", "judged for", "label"],
                [
                    [_cell_text(a[k], 80) for k in ("query", "product", "judged for")] + [a["label"]]
                    for a in audit
                ],
            ),
            "",
        ]
    return "\n".join(lines)


def _cell_text(value: object, limit: int) -> str:
    """Text for a markdown table cell: no pipes or line breaks, cut to ``limit`` characters."""
    text = " ".join(str(value).replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
