"""Fusion on hand-made rankings; every expected value is computed by hand from the formulas."""

from __future__ import annotations

import math

import pytest

from esci_reranker.retrieval.fusion import Ranking, fuse, reciprocal_rank_fusion, zscore_fusion

A = Ranking(["a", "b", "c"], [3.0, 2.0, 1.0])
B = Ranking(["b", "d"], [10.0, 0.0])


def test_rrf_with_k_zero_sums_reciprocal_ranks() -> None:
    fused = reciprocal_rank_fusion([A, B], k=0)
    # a: 1/1; b: 1/2 + 1/1; c: 1/3; d: 1/2
    assert fused.keys == ["b", "a", "d", "c"]
    assert fused.scores.tolist() == pytest.approx([1.5, 1.0, 0.5, 1 / 3])
    assert fused.ranks.tolist() == [[2, 1], [1, 0], [0, 2], [3, 0]]


def test_rrf_default_k_60() -> None:
    fused = reciprocal_rank_fusion([A, B])
    assert fused.keys == ["b", "a", "d", "c"]
    assert fused.scores.tolist() == pytest.approx([1 / 62 + 1 / 61, 1 / 61, 1 / 62, 1 / 63])


def test_rrf_weights_scale_each_list() -> None:
    fused = reciprocal_rank_fusion([A, B], k=0, weights=[1.0, 0.0])
    # B counts for nothing: a 1, b 1/2, c 1/3, d 0.
    assert fused.keys == ["a", "b", "c", "d"]
    assert fused.scores.tolist() == pytest.approx([1.0, 0.5, 1 / 3, 0.0])


def test_rrf_tie_broken_by_best_rank_then_first_appearance() -> None:
    fused = reciprocal_rank_fusion([Ranking(["x", "y"], [2, 1]), Ranking(["y", "x"], [2, 1])], k=0)
    assert fused.keys == ["x", "y"]  # both 1.5 and both best rank 1: x appeared first
    tied = reciprocal_rank_fusion([Ranking(["p", "q"], [2, 1]), Ranking(["r"], [1])], k=0)
    # p: 1, r: 1 (tie, both rank 1; p first), q: 1/2
    assert tied.keys == ["p", "r", "q"]


def test_zscore_standardises_each_list_and_fills_absent_with_the_lowest_z() -> None:
    fused = zscore_fusion([A, B])
    z = 1 / math.sqrt(2 / 3)  # A: mean 2, population std sqrt(2/3) -> z = (+z, 0, -z); B: (+1, -1)
    expected = {"a": z - 1, "b": 0 + 1, "c": -z - 1, "d": -z - 1}
    # c and d tie: d's best rank (2, in B) beats c's (3, in A).
    assert fused.keys == ["b", "a", "d", "c"]
    assert fused.scores.tolist() == pytest.approx([expected[k] for k in fused.keys])


def test_zscore_weights() -> None:
    fused = zscore_fusion([A, B], weights=[0.25, 0.75])
    z = 1 / math.sqrt(2 / 3)
    assert dict(zip(fused.keys, fused.scores.tolist(), strict=True)) == pytest.approx(
        {"a": 0.25 * z - 0.75, "b": 0.75, "c": -0.25 * z - 0.75, "d": -0.25 * z - 0.75}
    )


def test_zscore_constant_scores_give_zero_and_empty_list_is_ignored() -> None:
    fused = zscore_fusion([Ranking(["a", "b"], [5.0, 5.0]), Ranking([], [])])
    assert fused.keys == ["a", "b"]
    assert fused.scores.tolist() == [0.0, 0.0]
    assert fused.ranks.tolist() == [[1, 0], [2, 0]]


def test_fuse_dispatches_and_rejects_bad_input() -> None:
    assert fuse([A, B], "rrf", rrf_k=0).keys == reciprocal_rank_fusion([A, B], k=0).keys
    assert fuse([A, B], "zscore").keys == zscore_fusion([A, B]).keys
    with pytest.raises(ValueError, match="fusion method 'max'"):
        fuse([A, B], "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 keys but 1 scores"):
        Ranking(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="appears twice"):
        Ranking(["a", "a"], [1.0, 0.5])
    with pytest.raises(ValueError, match="1 weights for 2 rankings"):
        reciprocal_rank_fusion([A, B], weights=[1.0])
    with pytest.raises(ValueError, match="expected finite numbers >= 0"):
        zscore_fusion([A, B], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        zscore_fusion([Ranking(["a"], [float("nan")])])
    assert len(fuse([], "rrf")) == 0
