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


def _hand_made() -> pd.DataFrame:
    """Four queries, each judged on two products of its own (q1 also on p5, which q3 shares)."""
    rows = [
        (1, "red shoes", "p1"),
        (1, "red shoes", "p2"),
        (1, "red shoes", "p5"),
        (2, "blue shoes", "p3"),
        (2, "blue shoes", "p4"),
        (3, "coffee grinder", "p5"),
        (3, "coffee grinder", "p6"),
        (4, "burr grinder", "p7"),
        (4, "burr grinder", "p8"),
    ]
    frame = pd.DataFrame(rows, columns=["query_id", "query", "product_id"])
    frame["product_title"] = "title of " + frame["product_id"]
    frame["esci_label"] = "E"
    return frame.assign(source=LABELLED)


def test_retrieved_share_takes_the_top_of_each_list_skipping_judged_products():
    from esci_reranker.distill.data import sample_unlabelled

    lists = {
        1: ["p2", "p7", "p5", "nowhere", "p3", "p8", "p4"],  # p2, p5 judged for q1; "nowhere" not in the pool
        2: ["p3", "p1"],  # runs short: one retrieved product, the rest drawn
    }
    cfg = DistillData(unlabelled_per_query=4, retrieved_share=0.5, similar_share=0.25, similar_queries=1)
    pairs = sample_unlabelled(_hand_made(), cfg, lists)
    q1 = pairs[pairs["query_id"] == 1]
    assert q1["product_id"].tolist()[:2] == ["p7", "p3"]  # in retrieval order, judged ones skipped
    assert q1["draw"].tolist() == ["retrieved", "retrieved", "similar", "uniform"]
    assert not set(q1["product_id"]) & {"p1", "p2", "p5"}
    assert q1["product_id"].is_unique
    q2 = pairs[pairs["query_id"] == 2]
    assert q2.loc[q2["draw"] == "retrieved", "product_id"].tolist() == ["p1"]
    assert len(q2) == 4  # the short list is made up by the other draws
    # queries without a list get none; the text comes from the pool
    assert (pairs.loc[pairs["query_id"].isin([3, 4]), "draw"] != "retrieved").all()
    assert (pairs["product_title"] == "title of " + pairs["product_id"]).all()
    # no randomness in the retrieved part, and the rest is seeded
    pd.testing.assert_frame_equal(sample_unlabelled(_hand_made(), cfg, lists), pairs)


def test_retrieved_share_zero_reproduces_the_pairs_without_lists():
    from esci_reranker.distill.data import sample_unlabelled

    cfg = DistillData(unlabelled_per_query=4, similar_share=0.5, similar_queries=2, seed=3)
    without = sample_unlabelled(_hand_made(), cfg)
    lists = {q: ["p1", "p3", "p6", "p8"] for q in (1, 2, 3, 4)}
    pd.testing.assert_frame_equal(sample_unlabelled(_hand_made(), cfg, lists), without)
    assert set(without["draw"]) <= {"similar", "uniform"}


def test_retrieved_share_needs_the_lists_and_fits_beside_similar_share():
    from pydantic import ValidationError

    from esci_reranker.distill.data import sample_unlabelled

    with pytest.raises(
        ValueError, match=r"data.retrieved_share=0.5: the sampling needs each query's retrieved"
    ):
        sample_unlabelled(_hand_made(), DistillData(unlabelled_per_query=4, retrieved_share=0.5))
    with pytest.raises(ValidationError, match=r"retrieved_share=0.6 \+ data.similar_share=0.5 > 1"):
        DistillData(retrieved_share=0.6)


def test_a_test_product_at_the_top_of_every_list_never_enters(distill_data: Path):
    test = pd.read_parquet(distill_data / "test.parquet")
    train = pd.read_parquet(distill_data / "train.parquet")
    # test products first in every list, one of them also judged for a train query (the fixture
    # plants that row in train; the test rules drop it, so it is not in the pool)
    planted = test["product_id"].astype(str).unique()[:5].tolist()
    train_val = pd.concat([train, pd.read_parquet(distill_data / "val.parquet")])
    others = train_val["product_id"].astype(str).unique().tolist()
    lists = {qid: [*planted, *others] for qid in train_val["query_id"].unique()}
    cfg = DistillData(unlabelled_per_query=6, retrieved_share=0.5, similar_queries=3)
    built = distillation_pairs(distill_data, cfg, lists)
    frame = built.frame
    assert built.draws["retrieved"] == 3 * frame["query_id"].nunique()
    assert not set(frame["product_id"].astype(str)) & set(test["product_id"].astype(str))
    assert not set(frame["query_id"]) & set(test["query_id"])
    assert not set(frame["product_id"].astype(str)) & set(planted)
    check_no_test_leak(frame, test)
    # and with the share at 0 the lists change nothing
    zero = DistillData(unlabelled_per_query=6, similar_queries=3)
    pd.testing.assert_frame_equal(
        distillation_pairs(distill_data, zero, lists).frame, distillation_pairs(distill_data, zero).frame
    )
