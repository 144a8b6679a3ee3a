"""Task 2 (E/S/C/I classification) and Task 3 (substitute identification) metrics, as pure functions.

Conventions:

- Class order is ``ESCI_LABELS`` (E, S, C, I) everywhere; the confusion matrix has true labels
  on rows and predicted labels on columns.
- A ratio whose denominator is 0 (precision of a never-predicted class, recall of an absent
  class, F1 when both are 0) is 0.0, as scikit-learn's ``zero_division=0``.
- Macro F1 averages over the classes that occur in the truth or the predictions (scikit-learn's
  default label set), so a class absent from both neither helps nor hurts.
- Micro F1 of a single-label task equals its accuracy; both are reported because ESCI's
  official Task 2/3 metric is called micro F1.
- ROC-AUC is undefined when the truth holds one class only; it is then reported as 0.5, the AUC
  of a constant score (no positive/negative pair to order). Empty inputs give 0.0 elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from esci_reranker.labels import ESCI_LABELS, SUBSTITUTE_LABEL, check_labels

#: Probability at or above which Task 3 predicts "substitute".
DEFAULT_THRESHOLD = 0.5


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def confusion_matrix(
    y_true: Sequence[str] | np.ndarray,
    y_pred: Sequence[str] | np.ndarray,
    labels: Sequence[str] = ESCI_LABELS,
) -> np.ndarray:
    """Counts ``M[i, j] = |{n : y_true[n] = labels[i] and y_pred[n] = labels[j]}|``, shape (L, L), int64.

    Raises:
        ValueError: lengths differ, or a value is not in ``labels``.
    """
    true = np.asarray(y_true, dtype=object).astype(str)
    pred = np.asarray(y_pred, dtype=object).astype(str)
    if len(true) != len(pred):
        raise ValueError(f"confusion matrix: {len(true)} true labels but {len(pred)} predictions.")
    index = {label: i for i, label in enumerate(labels)}
    for name, values in (("true label", true), ("prediction", pred)):
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise ValueError(
                f"confusion matrix: unknown {name} value(s) {unknown[:5]}; expected one of {list(labels)}."
            )
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(matrix, ([index[t] for t in true], [index[p] for p in pred]), 1)
    return matrix


def per_class_scores(matrix: np.ndarray, labels: Sequence[str] = ESCI_LABELS) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows true).

    ``precision_c = M[c, c] / sum_i M[i, c]``, ``recall_c = M[c, c] / sum_j M[c, j]``,
    ``F1_c = 2 P R / (P + R)``, ``support_c = sum_j M[c, j]``; 0/0 is 0.0.
    """
    m = np.asarray(matrix)
    out = {}
    for i, label in enumerate(labels):
        tp, predicted, actual = m[i, i], m[:, i].sum(), m[i, :].sum()
        p, r = _ratio(tp, predicted), _ratio(tp, actual)
        out[label] = {"precision": p, "recall": r, "f1": _ratio(2 * p * r, p + r), "support": float(actual)}
    return out


def summary_scores(matrix: np.ndarray, labels: Sequence[str] = ESCI_LABELS) -> dict[str, float]:
    """``accuracy``, ``micro_f1`` and ``macro_f1`` from a confusion matrix.

    ``accuracy = trace(M) / sum(M)``; ``micro_f1`` pools TP/FP/FN over classes, which for
    single-label data equals accuracy; ``macro_f1`` is the mean F1 over the classes with a true
    or a predicted example. All 0.0 on an empty matrix.
    """
    m = np.asarray(matrix)
    total = m.sum()
    accuracy = _ratio(np.trace(m), total)
    tp = np.diag(m).sum()
    fp = m.sum(axis=0).sum() - tp
    fn = m.sum(axis=1).sum() - tp
    micro = _ratio(2 * tp, 2 * tp + fp + fn)
    per_class = per_class_scores(m, labels)
    seen = [label for i, label in enumerate(labels) if m[i, :].sum() + m[:, i].sum() > 0]
    macro = float(np.mean([per_class[label]["f1"] for label in seen])) if seen else 0.0
    return {"accuracy": accuracy, "micro_f1": micro, "macro_f1": macro}


def esci_classification_metrics(
    y_true: Sequence[str] | np.ndarray, y_pred: Sequence[str] | np.ndarray
) -> dict[str, float]:
    """Task 2 headline numbers over E/S/C/I: ``accuracy``, ``micro_f1``, ``macro_f1`` (see ``summary_scores``)."""
    check_labels(np.asarray(y_true, dtype=object), "task 2 true labels")
    check_labels(np.asarray(y_pred, dtype=object), "task 2 predictions")
    return summary_scores(confusion_matrix(y_true, y_pred))


def roc_auc(y_true: Sequence[bool] | np.ndarray, y_score: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve: ``P(score(pos) > score(neg)) + 0.5 * P(score(pos) = score(neg))``.

    0.5 when ``y_true`` holds a single class (or nothing): no pair to order, the AUC of a
    constant score.

    Raises:
        ValueError: lengths differ or a score is NaN.
    """
    truth = np.asarray(y_true, dtype=bool)
    score = np.asarray(y_score, dtype=np.float64)
    if len(truth) != len(score):
        raise ValueError(f"roc_auc: {len(truth)} labels but {len(score)} scores.")
    if np.isnan(score).any():
        raise ValueError("roc_auc: a score is NaN; expected probabilities (check the model output).")
    if truth.all() or not truth.any():
        return 0.5
    from sklearn.metrics import roc_auc_score  # lazy: sklearn is slow to import

    return float(roc_auc_score(truth, score))


def substitute_metrics(
    y_true: Sequence[str] | np.ndarray,
    substitute_prob: Sequence[float] | np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, float]:
    """Task 3: is the product a substitute (label S) or not?

    The prediction is ``substitute_prob >= threshold``. Returns ``accuracy``, ``f1`` (of the
    substitute class: ``2 TP / (2 TP + FP + FN)``), ``micro_f1`` (= accuracy), ``macro_f1`` (mean
    F1 of the substitute and the non-substitute class over those that occur) and ``auc``
    (``roc_auc`` of ``substitute_prob``).
    """
    true = np.asarray(y_true, dtype=object).astype(str)
    check_labels(true, "task 3 true labels")
    prob = np.asarray(substitute_prob, dtype=np.float64)
    if len(true) != len(prob):
        raise ValueError(f"task 3: {len(true)} labels but {len(prob)} substitute probabilities.")
    is_sub = true == SUBSTITUTE_LABEL
    auc = roc_auc(is_sub, prob)  # also rejects NaN
    pred_sub = prob >= threshold
    binary = ("substitute", "other")
    matrix = confusion_matrix(
        np.where(is_sub, binary[0], binary[1]), np.where(pred_sub, binary[0], binary[1]), binary
    )
    summary = summary_scores(matrix, binary)
    f1 = per_class_scores(matrix, binary)["substitute"]["f1"]
    return {
        "accuracy": summary["accuracy"],
        "f1": f1,
        "micro_f1": summary["micro_f1"],
        "macro_f1": summary["macro_f1"],
        "auc": auc,
    }
