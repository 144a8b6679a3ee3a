"""The distillation pairs: train+val plus unlabelled pairs, and never the test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from esci_reranker.distill.config import DistillData
from esci_reranker.distill.data import (
    LABELLED,
    UNLABELLED,
    TestLeakError,
    check_no_test_leak,
    distillation_pairs,
    normalise_query,
    similar_queries,
    validation_queries,
)


@pytest.fixture(scope="module")
def pairs(distill_data: Path):
    return distillation_pairs(distill_data, DistillData(unlabelled_per_query=12, similar_queries=3, seed=5))


def test_no_test_product_or_query_reaches_the_set(pairs, distill_data: Path):
    test = pd.read_parquet(distill_data / "test.parquet")
    frame = pairs.frame
    assert not set(frame["product_id"]) & set(test["product_id"])
    assert not set(frame["query_id"]) & set(test["query_id"])
    assert not set(frame["query"].map(normalise_query)) & set(test["query"].map(normalise_query))
    # the two rows the fixture planted in train (a test product; a test query's text) are counted
    assert pairs.excluded == {"test_product": 1, "test_query": 1}


def test_the_leak_check_fails_on_any_test_product_query_id_or_query_text(pairs, distill_data: Path):
    test = pd.read_parquet(distill_data / "test.parquet")
    check_no_test_leak(pairs.frame, test)  # the built set passes
    row = pairs.frame.iloc[[0]].copy()
    leaks = {
        "test product id": row.assign(product_id=test["product_id"].iloc[3]),
        "test query id": row.assign(query_id=test["query_id"].iloc[3]),
        "test query text": row.assign(query=f" {test['query'].iloc[3].title()}  "),
    }
    for name, leak in leaks.items():
        with pytest.raises(TestLeakError, match=name):
            check_no_test_leak(pd.concat([pairs.frame, leak], ignore_index=True), test)


def test_labelled_pairs_are_the_train_and_val_rows_left_after_the_test_rules(pairs, distill_data: Path):
    frame = pairs.frame
    labelled = frame[frame["source"] == LABELLED]
    train_val = pd.concat([pd.read_parquet(distill_data / f"{s}.parquet") for s in ("train", "val")])
    assert len(labelled) == len(train_val) - 2
    assert labelled["esci_label"].notna().all()
    assert frame.loc[frame["source"] == UNLABELLED, "esci_label"].isna().all()


def test_unlabelled_pairs_join_a_query_with_other_queries_products(pairs):
    frame = pairs.frame
    labelled = frame[frame["source"] == LABELLED]
    own = labelled.groupby("query_id")["product_id"].agg(set)
    unlabelled = frame[frame["source"] == UNLABELLED]
    assert unlabelled.groupby("query_id").size().eq(12).all()
    assert set(unlabelled["query_id"]) == set(labelled["query_id"])
    for qid, products in unlabelled.groupby("query_id")["product_id"]:
        assert not set(products) & own[qid]  # never its own candidates
        assert products.is_unique
    assert set(unlabelled["product_id"]) <= set(labelled["product_id"])  # products of train/val queries
    # the product's text travels with it, the query's with the query
    text = labelled.drop_duplicates("product_id").set_index("product_id")["product_title"]
    assert (unlabelled["product_title"].to_numpy() == text[unlabelled["product_id"]].to_numpy()).all()
    assert not frame.duplicated(["query_id", "product_id"]).any()


def test_sampling_is_seeded(distill_data: Path, pairs):
    again = distillation_pairs(distill_data, DistillData(unlabelled_per_query=12, similar_queries=3, seed=5))
    pd.testing.assert_frame_equal(again.frame, pairs.frame)
    other = distillation_pairs(distill_data, DistillData(unlabelled_per_query=12, similar_queries=3, seed=6))
    assert not other.frame["product_id"].equals(pairs.frame["product_id"])


def test_similar_share_draws_from_the_nearest_queries(distill_data: Path):
    only_similar = distillation_pairs(
        distill_data, DistillData(unlabelled_per_query=4, similar_share=1.0, similar_queries=1, seed=0)
    ).frame
    labelled = only_similar[only_similar["source"] == LABELLED]
    queries = labelled.drop_duplicates("query_id").reset_index(drop=True)
    nearest = similar_queries(queries["query"], 1)[:, 0]
    for i, qid in enumerate(queries["query_id"]):
        neighbour = queries["query_id"][nearest[i]]
        drawn = only_similar[(only_similar["source"] == UNLABELLED) & (only_similar["query_id"] == qid)]
        assert set(drawn["product_id"]) <= set(labelled.loc[labelled["query_id"] == neighbour, "product_id"])


def test_similar_queries_rank_shared_words_first():
    queries = pd.Series(["red running shoes", "blue running shoes", "coffee grinder", "burr coffee grinder"])
    nearest = similar_queries(queries, 1)[:, 0].tolist()
    assert nearest == [1, 0, 3, 2]


def test_validation_queries_are_a_seeded_share_by_query():
    ids = pd.Series([1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    chosen = validation_queries(ids, 0.2, seed=1)
    assert len(chosen) == 2
    assert chosen <= set(ids)
    assert validation_queries(ids, 0.2, seed=1) == chosen


def test_missing_test_split_is_an_error(tmp_path: Path, distill_data: Path):
    for name in ("train", "val"):
        (tmp_path / f"{name}.parquet").write_bytes((distill_data / f"{name}.parquet").read_bytes())
    with pytest.raises(
        FileNotFoundError, match="the test split is needed to keep its queries and products out"
    ):
        distillation_pairs(tmp_path, DistillData())


def test_drawing_from_every_product_by_position_draws_what_drawing_from_the_pool_did():
    # sample_unlabelled draws a query's uniform share from every product by position among the
    # allowed ones (no pass over all products per query): the same products, in the same order,
    # with the random stream left in the same state, as drawing from the explicit pool
    from esci_reranker.distill.data import _draw, _draw_range

    cases = np.random.default_rng(5)
    for _ in range(300):
        size = int(cases.integers(1, 200))
        n = int(cases.integers(0, 30))
        own = set(cases.choice(size, size=int(cases.integers(0, size + 1)), replace=False).tolist())
        seed = int(cases.integers(2**31))
        old_rng, new_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        old_exclude, new_exclude = set(own), set(own)
        old, new = [], []
        _draw(old_rng, np.arange(size), n, old_exclude, old)
        _draw_range(new_rng, size, n, new_exclude, new)
        assert new == old
        assert new_exclude == old_exclude
        assert new_rng.random() == old_rng.random()
