"""The distillation pairs: train+val plus unlabelled pairs, and never the test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from esci_reranker.distill.config import DistillData
from esci_reranker.distill.data import (
    LABELLED,
    SYNTHETIC,
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
    ids = pd.DataFrame({"query_id": [1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]})
    chosen = validation_queries(ids, 0.2, seed=1)
    assert len(chosen) == 2
    assert chosen <= set(ids["query_id"])
    assert validation_queries(ids, 0.2, seed=1) == chosen


def test_validation_queries_are_real_ones_drawn_as_without_synthetic_queries():
    real = pd.DataFrame({"query_id": list(range(1, 21)), "source": LABELLED})
    synthetic = pd.DataFrame({"query_id": list(range(-1, -41, -1)), "source": SYNTHETIC})
    chosen = validation_queries(real, 0.25, seed=4)
    assert validation_queries(pd.concat([real, synthetic]), 0.25, seed=4) == chosen


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


def _catalogue() -> pd.DataFrame:
    """Two judged queries over six products with hand-written titles."""
    titles = {
        "p1": "Acme Red Running Shoes for Women",
        "p2": "Acme Blue Running Shoes for Men",
        "p3": "Burr Coffee Grinder, Stainless Steel",
        "p4": "Electric Coffee Grinder 200W",
        "p5": "Ceramic Coffee Mug 12 oz",
        "p6": "Women's Trail Running Socks",
    }
    rows = [(1, "running shoes", p) for p in ("p1", "p2", "p6")] + [
        (2, "coffee grinder", p) for p in ("p3", "p4", "p5")
    ]
    frame = pd.DataFrame(rows, columns=["query_id", "query", "product_id"])
    frame["product_title"] = frame["product_id"].map(titles)
    frame["esci_label"] = "E"
    return frame.assign(source=LABELLED)


def test_title_words_are_the_first_words_of_a_title_in_lower_case():
    from esci_reranker.distill.data import SYNTHETIC_TITLE_WORDS, title_words

    assert title_words("Women's Trail-Running Socks, 2.5 mm (3 Pack)") == [
        "women's",
        "trail",
        "running",
        "socks",
        "2.5",
        "mm",
        "3",
        "pack",
    ]
    assert len(title_words(" ".join(f"w{i}" for i in range(30)))) == SYNTHETIC_TITLE_WORDS
    assert title_words(None) == []
    assert title_words(float("nan")) == []
    assert title_words("--") == []


def test_synthetic_query_texts_keep_title_order_and_skip_what_is_taken():
    from esci_reranker.distill.data import synthetic_query_texts

    titles = ["Acme Red Running Shoes", "Burr Coffee Grinder", "Acme Red Running Shoes"]
    texts, origins = synthetic_query_texts(titles, np.array([2]), 5, np.random.default_rng(0))
    # the repeated title may give the same two words: then it is skipped, never made twice
    assert len(texts) == len(set(texts))
    assert 2 <= len(texts) <= 3
    for text, origin in zip(texts, origins, strict=True):
        words = titles[origin].lower().split()
        picked = text.split()
        assert len(picked) == 2
        assert [words.index(w) for w in picked] == sorted(words.index(w) for w in picked)
    # every two-word text of the grinder's title is avoided: no query comes from it
    avoid = {"burr coffee", "burr grinder", "coffee grinder"}
    texts, origins = synthetic_query_texts(titles, np.array([2]), 5, np.random.default_rng(0), avoid)
    assert 1 not in origins
    assert not set(texts) & avoid
    # lengths are capped at the title's words
    texts, _ = synthetic_query_texts(["Mug"], np.array([4]), 3, np.random.default_rng(0))
    assert texts == ["mug"]


def test_title_search_ranks_shared_words_first():
    from esci_reranker.distill.data import title_search

    titles = ["Red Running Shoes", "Blue Running Shoes", "Burr Coffee Grinder", "Coffee Mug"]
    ranked = title_search(titles, ["coffee grinder", "red running shoes"], k=2)
    assert ranked.tolist() == [[2, 3], [0, 1]]
    assert title_search(titles, ["mug"], k=10).shape == (1, 4)  # at most every title


def test_synthetic_pairs_are_new_queries_over_the_pool_with_their_search_results():
    from esci_reranker.distill.data import sample_unlabelled

    frame = _catalogue()
    cfg = DistillData(unlabelled_per_query=2, similar_queries=1, synthetic_queries=4, synthetic_per_query=3)
    pairs = sample_unlabelled(frame, cfg)
    without = sample_unlabelled(frame, cfg.model_copy(update={"synthetic_queries": 0}))
    # the real queries' pairs are drawn as without them (the synthetic ones have their own stream)
    pd.testing.assert_frame_equal(pairs[pairs["source"] == UNLABELLED].reset_index(drop=True), without)
    synthetic = pairs[pairs["source"] == SYNTHETIC]
    assert (synthetic["draw"] == "synthetic").all()
    assert synthetic["esci_label"].isna().all()
    assert synthetic["query_id"].nunique() == 4
    assert (synthetic["query_id"] < 0).all()
    assert synthetic["query_id"].dtype == frame["query_id"].dtype
    assert set(synthetic["product_id"]) <= set(frame["product_id"])
    titles = frame.drop_duplicates("product_id").set_index("product_id")["product_title"]
    for _, group in synthetic.groupby("query_id"):
        query = group["query"].iloc[0]
        assert query not in {"running shoes", "coffee grinder"}  # never a real query
        assert len(group) == 3
        assert group["product_id"].is_unique
        # the first result holds every word of the query: the title it was made from, or a tie
        assert set(query.split()) <= set(titles[group["product_id"].iloc[0]].lower().replace(",", "").split())
    # seeded
    pd.testing.assert_frame_equal(sample_unlabelled(frame, cfg), pairs)


def test_synthetic_queries_never_spell_a_test_query_and_need_titles(distill_data: Path):
    from esci_reranker.distill.data import sample_unlabelled

    test = pd.read_parquet(distill_data / "test.parquet")
    cfg = DistillData(unlabelled_per_query=3, similar_queries=3, synthetic_queries=30, synthetic_per_query=4)
    built = distillation_pairs(distill_data, cfg)
    synthetic = built.frame[built.frame["source"] == SYNTHETIC]
    assert built.counts()["synthetic_queries"] == synthetic["query_id"].nunique() > 0
    assert (
        built.counts()["queries"] == built.frame.loc[built.frame["source"] != SYNTHETIC, "query_id"].nunique()
    )
    check_no_test_leak(built.frame, test)
    # a pool whose only title words are a test query's: every text it could make is avoided
    query = normalise_query(test["query"].iloc[0])
    pool = _catalogue().assign(product_title=query)
    one = DistillData(unlabelled_per_query=1, similar_queries=1, synthetic_queries=5)
    # (the real query is one word longer, so each synthetic query takes the whole title)
    made = sample_unlabelled(pool.assign(query=query + " extra"), one, avoid_queries=[query.upper()])
    assert (made["source"] != SYNTHETIC).all()
    made = sample_unlabelled(pool.assign(query=query + " extra"), one)
    assert set(made.loc[made["source"] == SYNTHETIC, "query"]) == {query}
    with pytest.raises(ValueError, match="no product_title column"):
        sample_unlabelled(pool.drop(columns="product_title"), one)
