"""Decision rules for Tasks 2 and 3, chosen on out-of-fold predictions.

A classifier's argmax and a 0.5 threshold are right only for calibrated probabilities and
equal error costs. The rules here are fitted on honest (out-of-fold) predictions of the training
queries, each to maximise one metric:

- Task 2: per-class offsets ``o`` added to the log-probabilities, ``argmax(log p + o)`` with
  ``o_E = 0``; coordinate ascent over a grid, ties broken towards the smallest offsets. A floor
  on the share of irrelevant rows labelled I can bind the choice: a user who hides I results
  needs that label to catch the products a search should not show, whatever F1 prefers.
- Task 3: the threshold on the substitute probability.

They travel in the checkpoint (``stacker.json``) and every consumer (``Reranker``, the service,
``evaluate``) applies them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np

from esci_reranker.labels import ESCI_LABELS

Task2Objective = Literal["micro_f1", "macro_f1", "micro_macro"]
Task3Objective = Literal["micro_f1", "f1"]
#: Offsets tried for each class, in log-probability units.
OFFSET_GRID: Final[np.ndarray] = np.round(np.arange(-3.0, 3.0001, 0.1), 2)
#: What one unit of I recall below the floor costs in the offsets' objective. One I row short
#: is 1 / (I rows) of recall: up to a million I rows that costs more than any objective can give
#: back (F1s lie in 0..1), so the floor is met first and the objective chosen among the offsets
#: that meet it.
_FLOOR_PENALTY: Final = 1e6
_IRRELEVANT: Final = ESCI_LABELS.index("I")


@dataclass
class DecisionRules:
    """Per-class log-probability offsets (E, S, C, I order) and the substitute threshold."""

    class_offsets: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    substitute_threshold: float = 0.5
    task2_objective: str = "micro_f1"
    task3_objective: str = "micro_f1"
    #: ``micro_macro``: macro-F1's weight against micro-F1 (1: their mean)
    macro_weight: float = 1.0
    #: the share of the irrelevant rows the offsets were required to label I (0: none)
    min_irrelevant_recall: float = 0.0

    def classes(self, probs: np.ndarray) -> np.ndarray:
        """Predicted class indices (E, S, C, I order) for (N, 4) probabilities."""
        return _apply_offsets(np.log(np.clip(probs, 1e-12, 1.0)), np.asarray(self.class_offsets))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (``stacker.json``)."""
        return {
            "class_offsets": dict(zip(ESCI_LABELS, map(float, self.class_offsets), strict=True)),
            "substitute_threshold": float(self.substitute_threshold),
            "task2_objective": self.task2_objective,
            "task3_objective": self.task3_objective,
            "task2_macro_weight": float(self.macro_weight),
            "task2_min_irrelevant_recall": float(self.min_irrelevant_recall),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> DecisionRules:
        """Inverse of ``to_dict``; raises ``ValueError`` naming a missing or bad field."""
        try:
            offsets = data["class_offsets"]
            if not isinstance(offsets, dict) or set(offsets) != set(ESCI_LABELS):
                raise ValueError(f"class_offsets must map {list(ESCI_LABELS)} to numbers, got {offsets!r}")
            threshold = float(data["substitute_threshold"])  # type: ignore[arg-type]
        except KeyError as err:
            raise ValueError(f"decision rules: missing field {err}") from None
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"decision rules: substitute_threshold={threshold}; expected 0..1.")
        weight = data.get("task2_macro_weight", 1.0)  # absent in rules written before it existed
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
            raise ValueError(f"decision rules: task2_macro_weight={weight!r}; expected a number >= 0.")
        floor = data.get("task2_min_irrelevant_recall", 0.0)  # absent in rules written before it
        if isinstance(floor, bool) or not isinstance(floor, int | float) or not 0.0 <= floor <= 1.0:
            raise ValueError(
                f"decision rules: task2_min_irrelevant_recall={floor!r}; expected a number in 0..1."
            )
        return cls(
            class_offsets=[float(offsets[c]) for c in ESCI_LABELS],
            substitute_threshold=threshold,
            task2_objective=str(data.get("task2_objective", "micro_f1")),
            task3_objective=str(data.get("task3_objective", "micro_f1")),
            macro_weight=float(weight),
            min_irrelevant_recall=float(floor),
        )


def _apply_offsets(logp: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.argmax(logp + offsets[None, :], axis=1)


def _f1_scores(true: np.ndarray, pred: np.ndarray, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """F1 of each class 0..k-1 (0 where a class is neither true nor predicted); rows weighted."""
    hit = true == pred
    tp = np.bincount(true[hit], weights=None if weights is None else weights[hit], minlength=k).astype(
        np.float64
    )
    n_true = np.bincount(true, weights=weights, minlength=k).astype(np.float64)
    n_pred = np.bincount(pred, weights=weights, minlength=k).astype(np.float64)
    denom = n_true + n_pred
    return np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)


def task2_metric(
    true: np.ndarray,
    pred: np.ndarray,
    objective: str,
    weights: np.ndarray | None = None,
    macro_weight: float = 1.0,
) -> float:
    """Micro-F1 (= accuracy for single-label classes), macro-F1 over the four classes, or
    ``(micro + macro_weight * macro) / (1 + macro_weight)`` (``micro_macro``; 1: their mean);
    ``weights`` (N,) weigh the rows (default 1)."""
    if objective == "micro_f1":
        return float(np.average(true == pred, weights=weights))
    if objective == "macro_f1":
        return float(_f1_scores(true, pred, len(ESCI_LABELS), weights).mean())
    if objective == "micro_macro":  # both at once: the official metric and every class's F1
        micro = float(np.average(true == pred, weights=weights))
        macro = float(_f1_scores(true, pred, len(ESCI_LABELS), weights).mean())
        return (micro + macro_weight * macro) / (1.0 + macro_weight)
    raise ValueError(f"task2 objective {objective!r}; expected 'micro_f1', 'macro_f1' or 'micro_macro'.")


def _irrelevant_recall(true: np.ndarray, pred: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The (weighted) share of the rows labelled I in ``true`` that ``pred`` labels I; 1 without
    such rows (none to miss, so any floor is met)."""
    irrelevant = true == _IRRELEVANT
    w = np.ones(len(true)) if weights is None else np.asarray(weights, dtype=np.float64)
    total = float(w[irrelevant].sum())
    return float(w[irrelevant & (pred == _IRRELEVANT)].sum()) / total if total > 0 else 1.0


def fit_class_offsets(
    probs: np.ndarray,
    labels: np.ndarray,
    objective: str = "micro_f1",
    sweeps: int = 3,
    weights: np.ndarray | None = None,
    macro_weight: float = 1.0,
    min_irrelevant_recall: float = 0.0,
) -> tuple[list[float], float]:
    """Offsets (E fixed at 0) maximising ``objective`` of ``argmax(log p + o)``; and the value reached.

    Args:
        probs: (N, 4) out-of-fold class probabilities, E/S/C/I order.
        labels: (N,) true class indices.
        weights: (N,) row weights (default 1).
        macro_weight: ``micro_macro``'s weight of macro-F1 (``task2_metric``).
        min_irrelevant_recall: the share of the I rows the offsets must label I; the objective is
            maximised among the offsets that reach it (where none does, the nearest are taken).
            The value returned is then the objective less the shortfall's penalty.

    Raises:
        ValueError: ``min_irrelevant_recall`` outside 0..1.
    """
    if not 0.0 <= min_irrelevant_recall <= 1.0:
        raise ValueError(f"min_irrelevant_recall={min_irrelevant_recall!r}; expected a share in 0..1.")
    logp = np.log(np.clip(probs, 1e-12, 1.0))

    def value(trial: np.ndarray) -> float:
        pred = _apply_offsets(logp, trial)
        score = task2_metric(labels, pred, objective, weights, macro_weight)
        if min_irrelevant_recall > 0.0:
            shortfall = min_irrelevant_recall - _irrelevant_recall(labels, pred, weights)
            score -= _FLOOR_PENALTY * max(0.0, shortfall)
        return score

    offsets = np.zeros(len(ESCI_LABELS))
    best = value(offsets)
    for _ in range(sweeps):
        changed = False
        for c in range(1, len(ESCI_LABELS)):
            values = []
            for step in OFFSET_GRID:
                trial = offsets.copy()
                trial[c] = step
                values.append(value(trial))
            scores = np.asarray(values)
            top = scores.max()
            # among the best, the offset nearest 0: the smallest change that reaches it
            candidates = OFFSET_GRID[scores >= top - 1e-12]
            chosen = float(candidates[np.argmin(np.abs(candidates))])
            if top > best + 1e-12 or (top >= best - 1e-12 and abs(chosen) < abs(offsets[c])):
                changed = changed or chosen != offsets[c]
                offsets[c], best = chosen, max(best, float(top))
        if not changed:
            break
    return [float(o) for o in offsets], best


def task3_metric(is_sub: np.ndarray, pred: np.ndarray, objective: str) -> float:
    """Micro-F1 (accuracy) or the substitute class's F1 of binary predictions."""
    if objective == "micro_f1":
        return float(np.mean(is_sub == pred))
    if objective == "f1":
        tp = float(np.sum(is_sub & pred))
        denom = float(is_sub.sum() + pred.sum())
        return 2 * tp / denom if denom else 0.0
    raise ValueError(f"task3 objective {objective!r}; expected 'micro_f1' or 'f1'.")


def fit_threshold(probs: np.ndarray, is_sub: np.ndarray, objective: str = "micro_f1") -> tuple[float, float]:
    """The substitute-probability threshold maximising ``objective``; and the value reached.

    Candidates are 0.5 and the midpoints between consecutive distinct probabilities; among
    equally good thresholds the one nearest 0.5 wins.
    """
    probs = np.asarray(probs, dtype=np.float64)
    is_sub = np.asarray(is_sub, dtype=bool)
    distinct = np.unique(probs)
    candidates = np.concatenate([[0.5], (distinct[1:] + distinct[:-1]) / 2, [distinct[-1] + 1e-9]])
    scores = _threshold_scores(probs, is_sub, candidates, objective)
    top = scores.max()
    good = candidates[scores >= top - 1e-12]
    return float(good[np.argmin(np.abs(good - 0.5))]), float(top)


def _threshold_scores(
    probs: np.ndarray, is_sub: np.ndarray, thresholds: np.ndarray, objective: str
) -> np.ndarray:
    """``task3_metric(is_sub, probs >= t, objective)`` for every ``t`` of ``thresholds``, from counts.

    Scoring each threshold over every row is quadratic (~1.4M distinct probabilities on the
    full data); here the rows at or above each threshold, and the substitutes among them, are
    counted by binary search in the sorted probabilities. The counts are the integers
    ``task3_metric`` sums, so the values are the same to the last bit.
    """
    if objective not in ("micro_f1", "f1"):
        raise ValueError(f"task3 objective {objective!r}; expected 'micro_f1' or 'f1'.")
    n, positives = len(probs), int(is_sub.sum())
    predicted = n - np.searchsorted(np.sort(probs), thresholds, side="left")
    hits = positives - np.searchsorted(np.sort(probs[is_sub]), thresholds, side="left")
    if objective == "micro_f1":
        # right = true substitutes predicted + non-substitutes not predicted
        right = hits + (n - positives) - (predicted - hits)
        return right.astype(np.float64) / n
    denom = (positives + predicted).astype(np.float64)
    return np.divide(2.0 * hits, denom, out=np.zeros(len(thresholds)), where=denom > 0)
