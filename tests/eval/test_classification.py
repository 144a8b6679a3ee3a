"""Task 2 and Task 3 metrics: worked examples, edge cases, agreement with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from esci_reranker.eval.classification import (
    confusion_matrix,
    esci_classification_metrics,
    per_class_scores,
    roc_auc,
    substitute_metrics,
)

TRUE = ["E", "E", "E", "S", "S", "C", "I", "I"]
PRED = ["E", "E", "S", "S", "E", "I", "I", "E"]


def test_confusion_matrix_rows_true_cols_pred() -> None:
    m = confusion_matrix(TRUE, PRED)
    assert m.tolist() == [
        [2, 1, 0, 0],  # true E
        [1, 1, 0, 0],  # true S
        [0, 0, 0, 1],  # true C
        [1, 0, 0, 1],  # true I
    ]


def test_task2_by_hand() -> None:
    m = esci_classification_metrics(TRUE, PRED)
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["micro_f1"] == pytest.approx(4 / 8)
    # E: P=2/4, R=2/3 -> F1=4/7; S: P=1/2, R=1/2 -> 1/2; C: 0; I: P=1/2, R=1/2 -> 1/2.
    assert m["macro_f1"] == pytest.approx((4 / 7 + 1 / 2 + 0 + 1 / 2) / 4)
    per_class = per_class_scores(confusion_matrix(TRUE, PRED))
    assert per_class["E"] == pytest.approx({"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7, "support": 3})
    assert per_class["C"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1.0}


def test_task2_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    true = rng.choice(list("ESCI"), size=500)
    pred = rng.choice(list("ESI"), size=500)  # C never predicted
    m = esci_classification_metrics(true, pred)
    assert m["macro_f1"] == pytest.approx(f1_score(true, pred, average="macro", zero_division=0))
    assert m["micro_f1"] == pytest.approx(f1_score(true, pred, average="micro"))


def test_macro_f1_skips_classes_absent_from_truth_and_predictions() -> None:
    assert esci_classification_metrics(["E", "I"], ["E", "I"])["macro_f1"] == 1.0


def test_task2_empty_is_zero() -> None:
    assert esci_classification_metrics([], []) == {"accuracy": 0.0, "micro_f1": 0.0, "macro_f1": 0.0}


def test_task2_rejects_unknown_labels() -> None:
    with pytest.raises(ValueError, match="task 2 predictions: unknown esci_label"):
        esci_classification_metrics(["E"], ["X"])
    with pytest.raises(ValueError, match="2 true labels but 1 predictions"):
        confusion_matrix(["E", "S"], ["E"])


def test_task3_by_hand() -> None:
    true = ["S", "S", "E", "I", "C"]
    prob = [0.9, 0.4, 0.6, 0.1, 0.2]  # predicted S: rows 0 and 2
    m = substitute_metrics(true, prob)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["micro_f1"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # TP=1, FP=1, FN=1
    # non-S class: TP=2 (rows 3, 4), FP=1 (row 1), FN=1 (row 2) -> 4/6.
    assert m["macro_f1"] == pytest.approx((0.5 + 4 / 6) / 2)
    # AUC: pairs (pos, neg) ordered right: 0.9 beats all 3; 0.4 beats 0.1, 0.2 -> 5 of 6.
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["auc"] == pytest.approx(roc_auc_score([1, 1, 0, 0, 0], prob))


def test_task3_threshold() -> None:
    assert substitute_metrics(["S", "E"], [0.3, 0.1], threshold=0.25)["accuracy"] == 1.0


def test_auc_with_one_class_is_half() -> None:
    assert roc_auc([True, True], [0.2, 0.9]) == 0.5
    assert roc_auc([], []) == 0.5
    assert substitute_metrics(["E", "I"], [0.1, 0.7])["auc"] == 0.5
    # Tied scores count half.
    assert roc_auc([True, False], [0.5, 0.5]) == 0.5


def test_auc_rejects_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([True, False], [float("nan"), 0.1])
