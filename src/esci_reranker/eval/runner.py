"""Run a model (and the baselines) on a prepared split and write every evaluation file.

This module is the caller that writes: the metrics themselves come from
``esci_reranker.eval.evaluator``. The model is used only through ``Reranker.predict_frame``.

Files written by ``run_evaluation`` / ``evaluate_predictions`` under ``out_dir``::

    predictions.parquet             one row per pair (see PREDICTION_COLUMNS)
    metrics.json                    evaluate_run(...) of the model, plus "name"
    report.md                       model vs baselines, per query type, Tasks 2 and 3
    plots/confusion_matrix.png      (multi-task models)
    plots/ndcg_per_query.png
    plots/score_distribution.png    (and expected_gain_distribution.png for multi-task models)
    baselines/<name>/predictions.parquet, baselines/<name>/metrics.json
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd

from esci_reranker.eval.baselines import (
    BASELINES,
    DEFAULT_SEEDS,
    BaselineResult,
    parse_baselines,
    run_baseline,
)
from esci_reranker.eval.classification import DEFAULT_THRESHOLD
from esci_reranker.eval.evaluator import check_split, evaluate_run
from esci_reranker.eval.plots import plot_confusion_matrix, plot_ndcg_histogram, plot_score_distribution
from esci_reranker.eval.ranking import DEFAULT_RELEVANT, parse_relevant, per_query_ranking_metrics
from esci_reranker.eval.report import comparison_table, render_report
from esci_reranker.fsutil import write_json

if TYPE_CHECKING:
    from esci_reranker.model.scorer import Scorer as Reranker  # the Reranker builds on eval/

#: Columns of predictions.parquet. The last four exist only for multi-task models;
#: ``esci_query_source`` only when the split has it.
PREDICTION_COLUMNS: Final[tuple[str, ...]] = (
    "query_id",
    "product_id",
    "esci_label",
    "score",
    "expected_gain",
    "esci_pred",
    "esci_probs",
    "substitute_prob",
)


@dataclass(frozen=True)
class EvaluationResult:
    """What ``run_evaluation`` computed and wrote.

    Attributes:
        metrics: the model's metrics (the content of ``metrics.json``).
        baseline_metrics: baseline name -> its metrics, in ``BASELINES`` order.
        table: the Task 1 comparison as a markdown table, for the terminal.
        files: what was written, by role (``predictions``, ``metrics``, ``report``, ``plot:...``,
            ``baseline:<name>:predictions``, ...).
    """

    metrics: dict[str, Any]
    baseline_metrics: dict[str, dict[str, Any]]
    table: str
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationOptions:
    """What an evaluation compares the model with and how it counts the runs.

    Attributes:
        baselines: names from ``BASELINES`` (or ``"none"`` / an empty list for none).
        gains: nDCG gain table, ``"esci"`` or ``"official-script"``.
        relevant: labels relevant for MRR/MAP/Recall/Precision, ``("E",)`` or ``("E", "S")``.
        seeds: random-baseline seeds averaged.
        batch_size, device: for the bi-encoder baseline (the model keeps its own).
        bi_encoder_path: a local sentence-encoder folder (default: the packaged all-MiniLM-L6-v2).
        progress: show progress bars.
    """

    baselines: str | Iterable[str] = BASELINES
    gains: str = "esci"
    relevant: str | Iterable[str] = DEFAULT_RELEVANT
    seeds: int = DEFAULT_SEEDS
    batch_size: int = 64
    device: str | None = None
    bi_encoder_path: str | Path | None = None
    progress: bool = True

    def check(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The relevant labels and the baseline names, parsed.

        Raises:
            ValueError: an unknown label or baseline name.
        """
        return parse_relevant(self.relevant), parse_baselines(self.baselines)

    def run_baseline(self, name: str, frame: pd.DataFrame) -> BaselineResult:
        """``run_baseline`` of ``name`` on ``frame`` with these options."""
        return run_baseline(
            name,
            frame,
            gains=self.gains,
            relevant=self.relevant,
            seeds=self.seeds,
            batch_size=self.batch_size,
            device=self.device,
            model_path=self.bi_encoder_path,
            progress=self.progress,
        )


def read_split(path: str | Path) -> pd.DataFrame:
    """Read a prepared split (parquet) and check it has the columns evaluation needs.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a needed column is missing (the message lists them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data: no file at {path}; pass a split written by `esci-reranker prepare` (a .parquet)."
        )
    frame = pd.read_parquet(path)
    check_split(frame, f"data {path}")
    return frame


def predictions_frame(reranker: Reranker, frame: pd.DataFrame, progress: bool = True) -> pd.DataFrame:
    """Score every row of ``frame`` with ``reranker`` and return the run frame (one row per pair).

    Columns: ``query_id, product_id, esci_label, score`` and, for a multi-task model,
    ``expected_gain, esci_pred, esci_probs`` (4 floats, E/S/C/I) ``, substitute_prob``;
    ``esci_query_source`` is carried over when present. Rows keep the input order.
    """
    check_split(frame, "evaluate")
    preds = reranker.predict_frame(frame, progress=progress)
    if len(preds) != len(frame):
        raise RuntimeError(
            f"evaluate: the reranker returned {len(preds)} predictions for {len(frame)} rows; "
            "expected one per row."
        )
    columns = ["query_id", "product_id", "esci_label"]
    if "esci_query_source" in frame.columns:
        columns.append("esci_query_source")
    run = frame[columns].reset_index(drop=True).copy()
    run["score"] = np.asarray(preds.scores, dtype=np.float64)
    expected = np.asarray(preds.expected_gains, dtype=np.float64)
    if len(expected) and not np.isnan(expected).all():  # a single-task model has no class heads
        run["expected_gain"] = expected
        run["esci_pred"] = np.asarray(preds.esci_classes).astype(str)
        run["esci_probs"] = list(np.asarray(preds.esci_probs, dtype=np.float64))
        run["substitute_prob"] = np.asarray(preds.substitute_probs, dtype=np.float64)
    return run


def save_run(out_dir: str | Path, run: pd.DataFrame, metrics: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``predictions.parquet`` and ``metrics.json`` into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = out / "predictions.parquet"
    run.to_parquet(predictions, index=False)
    return {"predictions": predictions, "metrics": write_json(out / "metrics.json", metrics)}


def evaluate_predictions(
    predictions: pd.DataFrame,
    frame: pd.DataFrame,
    out_dir: str | Path,
    name: str = "model",
    options: EvaluationOptions | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> EvaluationResult:
    """Evaluate an existing run frame against the baselines on ``frame`` and write all files.

    ``predictions`` is a run frame for the rows of ``frame`` (e.g. from ``predictions_frame``);
    ``frame`` is the prepared split the baselines score; ``name`` heads ``metrics.json`` and the
    report; ``threshold`` is the model's Task 3 decision threshold; ``options`` as in
    ``run_evaluation``.
    """
    options = options or EvaluationOptions()
    relevant_labels, baseline_names = options.check()
    gains = options.gains
    out = Path(out_dir)
    metrics = {"name": name} | evaluate_run(predictions, gains, relevant_labels, threshold=threshold)
    files = save_run(out, predictions, metrics)

    baseline_metrics: dict[str, dict[str, Any]] = {}
    per_query = {"model": per_query_ranking_metrics(predictions, "score", gains, relevant_labels)["ndcg"]}
    for baseline in baseline_names:
        result = options.run_baseline(baseline, frame)
        baseline_metrics[baseline] = result.metrics
        for role, path in save_run(out / "baselines" / baseline, result.run, result.metrics).items():
            files[f"baseline:{baseline}:{role}"] = path
        label = "random (seed 0)" if baseline == "random" else baseline
        per_query[label] = per_query_ranking_metrics(result.run, "score", gains, relevant_labels)["ndcg"]

    plots_dir = out / "plots"
    plots = {"nDCG per query": plot_ndcg_histogram(per_query, plots_dir / "ndcg_per_query.png")}
    plots["score by true label"] = plot_score_distribution(predictions, plots_dir / "score_distribution.png")
    if "task1_expected_gain" in metrics:
        plots["expected gain by true label"] = plot_score_distribution(
            predictions, plots_dir / "expected_gain_distribution.png", "expected_gain"
        )
    if "task2" in metrics:
        plots["confusion matrix"] = plot_confusion_matrix(
            metrics["task2"]["confusion_matrix"], plots_dir / "confusion_matrix.png"
        )
    files |= {f"plot:{path.stem}": path for path in plots.values()}
    relative = {caption: path.relative_to(out).as_posix() for caption, path in plots.items()}
    report = out / "report.md"
    report.write_text(render_report(name, metrics, baseline_metrics, relative), encoding="utf-8")
    files["report"] = report
    return EvaluationResult(
        metrics=metrics,
        baseline_metrics=baseline_metrics,
        table=comparison_table(metrics, baseline_metrics),
        files=files,
    )


def run_evaluation(
    reranker: Reranker, frame: pd.DataFrame, out_dir: str | Path, options: EvaluationOptions | None = None
) -> EvaluationResult:
    """Score ``frame`` with ``reranker``, evaluate it and the baselines, and write every file.

    Args:
        reranker: a loaded ``Reranker``; its own batch size and device are used for the model.
        frame: a prepared split (``query_id, query, product_id, esci_label`` and product columns).
        out_dir: folder for the files listed in this module's docstring (created if needed).
        options: the baselines and how the runs are counted (default: ``EvaluationOptions()``).

    Returns:
        ``EvaluationResult`` with the model's and the baselines' metrics and the text table.

    Raises:
        ValueError: bad option or a split without the needed columns (checked before scoring).
    """
    options = options or EvaluationOptions()
    check_split(frame, "evaluate")
    options.check()  # fail before the (slow) scoring, not after
    predictions = predictions_frame(reranker, frame, progress=options.progress)
    return evaluate_predictions(
        predictions, frame, out_dir, reranker.name, options, threshold=reranker.substitute_threshold
    )
