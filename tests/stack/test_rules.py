"""Decision rules: thresholds and class offsets chosen on out-of-fold predictions."""

from __future__ import annotations

import numpy as np
import pytest

from esci_reranker.stack.rules import DecisionRules, fit_class_offsets, fit_threshold, task2_metric


def test_fit_threshold_maximises_micro_f1_and_prefers_the_one_nearest_half():
    probs = np.array([0.1, 0.4, 0.6, 0.9])
    # the three top ones are substitutes: any threshold in (0.1, 0.4] is perfect; midpoint 0.25
    threshold, value = fit_threshold(probs, np.array([False, True, True, True]))
    assert (threshold, value) == (pytest.approx(0.25), 1.0)
    # 0.5 is already perfect here, and nearest to itself
    threshold, value = fit_threshold(probs, np.array([False, False, True, True]))
    assert (threshold, value) == (0.5, 1.0)


def test_fit_threshold_for_the_substitute_f1():
    probs = np.array([0.05, 0.1, 0.2, 0.3])
    is_sub = np.array([False, True, False, True])
    # micro-F1: predicting nothing scores 0.5, as does every cut; F1 of the class wants recall
    threshold, value = fit_threshold(probs, is_sub, "f1")
    assert value == pytest.approx(2 * 2 / (2 + 3))  # threshold 0.075: predicts the top three
    assert threshold == pytest.approx(0.075)


def test_class_offsets_move_borderline_pairs_to_the_class_the_labels_say():
    # every pair's argmax is E (index 0), but the four true S pairs have P(S) just below P(E)
    probs = np.array(
        [[0.5, 0.4, 0.05, 0.05]] * 4 + [[0.9, 0.05, 0.03, 0.02]] * 6,
    )
    labels = np.array([1] * 4 + [0] * 6)
    assert task2_metric(labels, probs.argmax(1), "micro_f1") == 0.6
    offsets, value = fit_class_offsets(probs, labels)
    assert value == 1.0
    assert offsets[0] == 0.0
    # the smallest offset on S that wins: log(0.5/0.4) = 0.223 -> 0.3 on the 0.1 grid
    assert offsets[1] == pytest.approx(0.3)
    rules = DecisionRules(class_offsets=offsets)
    assert rules.classes(probs).tolist() == labels.tolist()


def _ranked_irrelevant_pairs() -> tuple[np.ndarray, np.ndarray]:
    """100 pairs ordered by how close P(I) comes to P(E): an I offset of 0.1 * k calls the first
    k of them I. Ten are I, at ranks 1, 2, 3, 5, 8, 12, 16, 20, 25 and 30."""
    gap = 0.05 + 0.1 * np.arange(100)  # log P(E) - log P(I)
    p_i = 0.98 / (1 + np.exp(gap))
    probs = np.stack([0.98 - p_i, np.full(100, 0.01), np.full(100, 0.01), p_i], axis=1)
    labels = np.zeros(100, dtype=int)
    labels[[0, 1, 2, 4, 7, 11, 15, 19, 24, 29]] = 3
    return probs, labels


def test_a_heavier_macro_weight_calls_the_rare_class_more_often():
    # Accuracy is best at k = 3 (3 right, none wrong; k = 5 ties and the smaller offset wins);
    # macro-F1 wants more of the I pairs: at weight 3, k = 8 scores (0.92 + 3 * 0.378) / 4
    # against (0.93 + 3 * 0.356) / 4.
    probs, labels = _ranked_irrelevant_pairs()
    found = {}
    for weight in (0.0, 3.0):
        offsets, _ = fit_class_offsets(probs, labels, "micro_macro", macro_weight=weight)
        found[weight] = DecisionRules(offsets).classes(probs)
    assert np.flatnonzero(found[0.0] == 3).tolist() == [0, 1, 2]
    assert np.flatnonzero(found[3.0] == 3).tolist() == list(range(8))
    assert task2_metric(labels, found[0.0], "micro_f1") > task2_metric(labels, found[3.0], "micro_f1")


def test_an_irrelevant_recall_floor_is_met_first_then_the_objective_chooses():
    probs, labels = _ranked_irrelevant_pairs()

    def called_irrelevant(floor: float, weights: np.ndarray | None = None) -> list[int]:
        offsets, _ = fit_class_offsets(probs, labels, weights=weights, min_irrelevant_recall=floor)
        return np.flatnonzero(DecisionRules(offsets).classes(probs) == 3).tolist()

    # accuracy alone stops at k = 3 (recall 0.3); the floor 0.5 needs the 5th I pair, rank 8,
    # and accuracy then prefers k = 8 (5 right, 3 wrong) to any larger k
    assert called_irrelevant(0.0) == [0, 1, 2]
    assert called_irrelevant(0.3) == [0, 1, 2]
    assert called_irrelevant(0.5) == list(range(8))
    # every I pair: down to rank 30, whatever it costs
    assert called_irrelevant(1.0) == list(range(30))
    # the recall is weighted as the objective is: the first three I pairs hold half the weight
    weights = np.ones(100)
    weights[[0, 1, 2]] = 7 / 3
    assert called_irrelevant(0.5, weights) == [0, 1, 2]


def test_an_irrelevant_recall_floor_without_irrelevant_rows_or_out_of_range():
    probs, labels = _ranked_irrelevant_pairs()
    relevant = labels != 3
    # no I row to recall: the floor cannot bind, and accuracy calls nothing I
    offsets, value = fit_class_offsets(probs[relevant], labels[relevant], min_irrelevant_recall=0.9)
    assert offsets == [0.0, 0.0, 0.0, 0.0]
    assert value == 1.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"min_irrelevant_recall=.*expected a share in 0\.\.1"):
            fit_class_offsets(probs, labels, min_irrelevant_recall=bad)


def test_offsets_stay_zero_when_argmax_is_already_best():
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])
    offsets, value = fit_class_offsets(probs, np.array([0, 1, 3]))
    assert offsets == [0.0, 0.0, 0.0, 0.0]
    assert value == 1.0


def test_rules_round_trip_and_reject_bad_fields():
    rules = DecisionRules([0.0, 0.3, -0.2, 0.1], 0.31, "micro_macro", "f1", macro_weight=1.5)
    assert DecisionRules.from_dict(rules.to_dict()) == rules
    # rules written before the weight existed maximised the plain mean
    older = {k: v for k, v in rules.to_dict().items() if k != "task2_macro_weight"}
    assert DecisionRules.from_dict(older).macro_weight == 1.0
    for bad in (-1.0, "1.5", float("nan")):
        with pytest.raises(ValueError, match=r"task2_macro_weight=.*expected a number >= 0"):
            DecisionRules.from_dict({**rules.to_dict(), "task2_macro_weight": bad})
    floored = DecisionRules([0.0, 0.3, -0.2, 0.1], 0.31, "micro_macro", "f1", 0.25, min_irrelevant_recall=0.4)
    assert DecisionRules.from_dict(floored.to_dict()) == floored
    # rules written before the floor existed had none
    assert DecisionRules.from_dict(older).min_irrelevant_recall == 0.0
    for bad in (-0.1, 1.2, "0.4", True, float("nan")):
        with pytest.raises(ValueError, match=r"task2_min_irrelevant_recall=.*expected a number in 0\.\.1"):
            DecisionRules.from_dict({**floored.to_dict(), "task2_min_irrelevant_recall": bad})
    with pytest.raises(ValueError, match="missing field 'substitute_threshold'"):
        DecisionRules.from_dict({"class_offsets": {"E": 0, "S": 0, "C": 0, "I": 0}})
    with pytest.raises(ValueError, match="class_offsets must map"):
        DecisionRules.from_dict({"class_offsets": {"E": 0}, "substitute_threshold": 0.5})
    with pytest.raises(ValueError, match=r"substitute_threshold=1\.5; expected 0\.\.1"):
        DecisionRules.from_dict(
            {"class_offsets": {"E": 0, "S": 0, "C": 0, "I": 0}, "substitute_threshold": 1.5}
        )


def test_micro_macro_objective_is_the_mean_of_both_hand_computed():
    true = np.array([0, 0, 0, 3])
    pred = np.array([0, 0, 3, 3])
    # micro = accuracy 3/4; F1: E 2*2/(3+2) = 0.8, I 2*1/(1+2) = 2/3, S and C absent (0)
    macro = (0.8 + 2 / 3) / 4
    assert task2_metric(true, pred, "micro_f1") == pytest.approx(0.75)
    assert task2_metric(true, pred, "macro_f1") == pytest.approx(macro)
    assert task2_metric(true, pred, "micro_macro") == pytest.approx((0.75 + macro) / 2)
    assert task2_metric(true, pred, "micro_macro", macro_weight=1.5) == pytest.approx(
        (0.75 + 1.5 * macro) / 2.5
    )
    assert task2_metric(true, pred, "micro_macro", macro_weight=0.0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="micro_macro"):
        task2_metric(true, pred, "accuracy")


@pytest.mark.parametrize("objective", ["micro_f1", "f1"])
def test_fit_threshold_counts_give_the_scores_of_scoring_every_threshold(objective):
    # the threshold search counts rows by binary search instead of scoring each candidate over
    # every row: on random inputs with ties, the chosen threshold and value are those of the
    # row-by-row scoring, exactly
    from esci_reranker.stack.rules import task3_metric

    rng = np.random.default_rng(3)
    for _ in range(40):
        n = int(rng.integers(1, 300))
        probs = np.round(rng.random(n), int(rng.integers(1, 4)))
        is_sub = rng.random(n) < rng.random()
        distinct = np.unique(probs)
        candidates = np.concatenate([[0.5], (distinct[1:] + distinct[:-1]) / 2, [distinct[-1] + 1e-9]])
        scores = np.array([task3_metric(is_sub, probs >= t, objective) for t in candidates])
        top = scores.max()
        good = candidates[scores >= top - 1e-12]
        expected = (float(good[np.argmin(np.abs(good - 0.5))]), float(top))
        assert fit_threshold(probs, is_sub, objective) == expected


def test_fit_threshold_rejects_an_unknown_objective():
    with pytest.raises(ValueError, match="task3 objective 'auc'"):
        fit_threshold(np.array([0.2, 0.7]), np.array([False, True]), "auc")
