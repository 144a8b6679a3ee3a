"""Splits by query_id: ESCI train/test with a seeded val draw, or the sample's train/dev/holdout."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esci_reranker.data import SPLITS, DataError, assign_splits
from esci_reranker.data.splits import check_query_splits, sample_val_queries, split_scheme


def _rows(splits_by_query: dict[int, str], per_query: int = 3) -> tuple[pd.Series, pd.Series]:
    query_ids = [q for q in splits_by_query for _ in range(per_query)]
    split = [splits_by_query[q] for q in query_ids]
    return pd.Series(query_ids), pd.Series(split, dtype="category")


def test_esci_scheme_moves_a_seeded_fraction_of_train_queries_to_val() -> None:
    layout = {q: ("test" if q >= 80 else "train") for q in range(100)}
    query_ids, split = _rows(layout)
    result, scheme = assign_splits(query_ids, split, val_frac=0.25, seed=3)
    assert scheme == "esci"
    assert list(result.cat.categories) == list(SPLITS)
    per_query = pd.DataFrame({"q": query_ids, "s": result}).groupby("q")["s"].agg(set)
    assert all(len(s) == 1 for s in per_query)  # never splits a query
    assert (per_query.map(min) == "test").sum() == 20
    assert (per_query.map(min) == "val").sum() == 20  # round(0.25 * 80)
    assert set(per_query.index[per_query.map(min) == "test"]) == set(range(80, 100))


def test_val_draw_is_deterministic_and_order_free() -> None:
    ids = np.arange(50, 150)
    first = sample_val_queries(ids, 0.1, seed=0)
    assert first.size == 10
    np.testing.assert_array_equal(first, sample_val_queries(ids[::-1], 0.1, seed=0))
    np.testing.assert_array_equal(first, sample_val_queries(np.repeat(ids, 3), 0.1, seed=0))
    assert not np.array_equal(first, sample_val_queries(ids, 0.1, seed=1))
    # The documented draw: sorted distinct ids, numpy's default_rng(seed).choice.
    expected = np.sort(np.random.default_rng(0).choice(np.unique(ids), size=10, replace=False))
    np.testing.assert_array_equal(first, expected)


def test_val_draw_keeps_at_least_one_query_on_each_side() -> None:
    assert sample_val_queries(np.array([1, 2]), 0.01, seed=0).size == 1
    assert sample_val_queries(np.array([1, 2]), 0.99, seed=0).size == 1
    assert sample_val_queries(np.array([7]), 0.5, seed=0).size == 0


def test_train_dev_holdout_is_mapped_not_resplit() -> None:
    query_ids, split = _rows({1: "train", 2: "dev", 3: "holdout", 4: "train"})
    result, scheme = assign_splits(query_ids, split, val_frac=0.5, seed=0)
    assert scheme == "train-dev-holdout"
    assert list(result) == ["train"] * 3 + ["val"] * 3 + ["test"] * 3 + ["train"] * 3


def test_only_train_values_use_the_esci_scheme() -> None:
    assert split_scheme({"train"}, "f") == "esci"
    assert split_scheme({"train", "holdout"}, "f") == "train-dev-holdout"


def test_unknown_or_mixed_split_values() -> None:
    with pytest.raises(DataError, match=r"f.parquet: column 'split' holds \['dev', 'test'\]"):
        split_scheme({"dev", "test"}, "f.parquet")
    with pytest.raises(DataError, match="expected ESCI's values train/test or the sample's"):
        split_scheme({"validation"}, "f.parquet")


def test_query_in_two_splits_is_an_error_naming_it() -> None:
    query_ids = pd.Series([1, 1, 2, 2])
    split = pd.Series(["train", "test", "train", "train"])
    with pytest.raises(
        DataError, match=r"x.parquet: 1 query_id\(s\) have rows in two splits, e\.g\. 1 \(test/train\)"
    ):
        check_query_splits(query_ids, split, "x.parquet")
    with pytest.raises(DataError, match="two splits"):
        assign_splits(query_ids, split, where="x.parquet")
