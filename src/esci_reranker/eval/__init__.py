"""Evaluation: metrics (pure functions), baselines, reports and plots, and the model runner.

- ``ranking``: Task 1 nDCG / nDCG@k / MRR / MAP / Recall@k / Precision@k, trec_eval-exact.
- ``classification``: Task 2 (E/S/C/I) and Task 3 (substitute) accuracy, F1, confusion, AUC.
- ``evaluator``: ``evaluate_run(run) -> metrics.json`` dict (computes only).
- ``baselines``: random, BM25, zero-shot bi-encoder run frames.
- ``report`` / ``plots``: report.md text, the comparison table, PNG plots.
- ``runner``: ``run_evaluation(reranker, frame, out_dir, options)`` scores, evaluates and writes files.
- ``trec``: TREC run + qrels files to re-score with trec_eval.

See docs/evaluation.md for definitions and file formats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esci_reranker.eval.classification import esci_classification_metrics, substitute_metrics
from esci_reranker.eval.evaluator import evaluate_run
from esci_reranker.eval.ranking import per_query_ranking_metrics, ranking_metrics
from esci_reranker.lazy import lazy_exports

__all__ = [
    "EvaluationOptions",
    "EvaluationResult",
    "esci_classification_metrics",
    "evaluate_run",
    "per_query_ranking_metrics",
    "predictions_frame",
    "ranking_metrics",
    "run_baseline",
    "run_evaluation",
    "substitute_metrics",
]

if TYPE_CHECKING:
    from esci_reranker.eval.baselines import run_baseline
    from esci_reranker.eval.runner import (
        EvaluationOptions,
        EvaluationResult,
        predictions_frame,
        run_evaluation,
    )

# Lazy: the runner pulls in matplotlib; importing the metrics should stay light.
__getattr__ = lazy_exports(
    __name__,
    {
        "EvaluationOptions": "esci_reranker.eval.runner",
        "EvaluationResult": "esci_reranker.eval.runner",
        "predictions_frame": "esci_reranker.eval.runner",
        "run_evaluation": "esci_reranker.eval.runner",
        "run_baseline": "esci_reranker.eval.baselines",
    },
)
