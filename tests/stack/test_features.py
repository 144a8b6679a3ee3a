"""Stack features on hand-made rows, each expected value worked out by hand from the definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from esci_reranker.stack.features import (
    feature_table,
    list_bm25,
    list_features,
    model_numbers,
    negated_terms,
    pair_features,
    record_fields,
    units,
)


def test_coverage_per_field_and_exact_title_match():
    f = pair_features(
        "red running shoes",
        {"title": "Nike Running Shoe", "brand": "Nike", "color": "Blue", "bullets": "Great for red carpets"},
    )
    # query words {red, running, shoes}; title prefixes {nike, runn, shoe}: running + shoes
    assert f["cov_title"] == pytest.approx(2 / 3)
    assert f["cov_brand_color"] == 0.0  # {nike, blue}
    assert f["cov_long"] == pytest.approx(1 / 3)  # "red" in the bullets
    assert f["cov_all"] == 1.0
    assert f["exact_title"] == pytest.approx(1 / 3)  # only "running" is the same word ("shoe" != "shoes")


def test_missing_fields_are_nan_not_zero():
    f = pair_features("usb cable", {"title": "USB-C cable"})
    assert math.isnan(f["cov_brand_color"])
    assert math.isnan(f["cov_long"])
    assert math.isnan(f["brand_in_query"])
    assert f["has_brand"] == 0.0
    assert f["has_long"] == 0.0
    # the query has no colour, number, size or model number: those features say "not applicable"
    for name in (
        "color_match",
        "color_conflict",
        "number_match",
        "unit_match",
        "unit_conflict",
        "model_match",
    ):
        assert math.isnan(f[name]), name


def test_brand_and_colour_matches():
    f = pair_features("nike red shoes", {"title": "Air Zoom", "brand": "Nike", "color": "Blue"})
    assert f["brand_in_query"] == 1.0
    assert f["query_has_color"] == 1.0
    assert f["color_match"] == 0.0
    assert f["color_conflict"] == 1.0  # asked red, the product names only blue
    g = pair_features("red shoes", {"title": "Red Air Zoom", "color": "Red/White"})
    assert g["color_match"] == 1.0
    assert g["color_conflict"] == 0.0
    # a brand of two words must appear as a phrase
    h = pair_features("under armour shirt", {"title": "Shirt", "brand": "Under Armour"})
    assert h["brand_in_query"] == 1.0
    assert (
        pair_features("armour under shirt", {"title": "Shirt", "brand": "Under Armour"})["brand_in_query"]
        == 0.0
    )


def test_numbers_sizes_and_model_numbers():
    assert units("Shampoo 16oz, 2-pack of 3.5 ml") == {(16.0, "oz"), (2.0, "pack"), (3.5, "ml")}
    assert model_numbers("case for iphone a2141 (2020) red") == {"a2141"}
    f = pair_features("shampoo 64 oz", {"title": "Shampoo 16 oz bottle"})
    assert f["unit_match"] == 0.0
    assert f["unit_conflict"] == 1.0
    assert f["number_match"] == 0.0
    g = pair_features("shampoo 16 oz", {"title": "Shampoo, 16oz bottle"})
    assert g["unit_match"] == 1.0
    assert g["unit_conflict"] == 0.0
    assert g["number_match"] == 1.0
    h = pair_features("a2141 battery", {"title": "Battery for A2141 laptops"})
    assert h["model_match"] == 1.0


def test_negation():
    assert negated_terms("shampoo without sulfate") == ["sulfate"]
    assert negated_terms("gluten-free bread") == ["gluten"]
    assert negated_terms("non slip socks") == ["slip"]
    assert negated_terms("red shoes") == []
    has = pair_features("shampoo without sulfate", {"title": "Sulfate cleansing shampoo"})
    assert has["is_negation"] == 1.0
    assert has["negated_in_product"] == 1.0
    lacks = pair_features("shampoo without sulfate", {"title": "Gentle shampoo", "bullets": "for curls"})
    assert lacks["negated_in_product"] == 0.0
    assert math.isnan(pair_features("shampoo", {"title": "Shampoo"})["negated_in_product"])


def test_list_features_rank_z_and_gap_within_each_list():
    values = np.array([3.0, 1.0, 2.0, 5.0, 5.0])
    groups = np.array([0, 0, 0, 1, 1])
    out = list_features(values, groups)
    np.testing.assert_allclose(out["rank"], [0.0, 1.0, 0.5, 0.0, 0.0])  # ties share the better rank
    std = np.std([3.0, 1.0, 2.0])
    np.testing.assert_allclose(out["z"], [1 / std, -1 / std, 0.0, 0.0, 0.0])  # a flat list: 0
    np.testing.assert_allclose(out["gap"], [0.0, 2.0, 1.0, 0.0, 0.0])


def test_one_list_fast_path_equals_the_grouped_path():
    values = np.array([0.3, 0.9, 0.3, -1.0, 2.0])
    one = list_features(values, np.zeros(5))
    # the same list beside another one goes through the grouped path
    both = list_features(np.concatenate([values, [5.0, 6.0]]), np.array([0] * 5 + [1, 1]))
    for key in ("rank", "z", "gap"):
        np.testing.assert_allclose(one[key], both[key][:5])
    np.testing.assert_allclose(one["rank"], [0.5, 0.25, 0.5, 1.0, 0.0])


def test_list_bm25_by_hand():
    # two one-word documents, the query word in one: idf = ln(1 + (2 - 1 + .5) / (1 + .5)) = ln 2,
    # length norm = k1 (1 - b + b * 1/1) = 1.5, so tf part = 1 * 2.5 / (1 + 1.5) = 1
    np.testing.assert_allclose(list_bm25(["a"], [["a"], ["b"]]), [math.log(2), 0.0])
    assert np.isnan(list_bm25(["a"], [[], []])).all()


def test_feature_table_list_context_other_brand_and_model_columns():
    queries = ["nike shoes"] * 3 + ["socks"]
    fields = {
        "title": ["Air Zoom shoes", "Ultraboost shoes", "Running shoes", "Wool socks"],
        "brand": ["Nike", "Adidas", "", "Darn Tough"],
    }
    table = feature_table(queries, fields, [1, 1, 1, 2], {"ce_score": np.array([0.9, 0.5, 0.1, 0.3])})
    # the query names Nike, a brand of its list: Adidas's product is another brand's, Nike's is not
    assert table["other_brand_named"].tolist()[:3] == [0.0, 1.0, 0.0]
    assert math.isnan(table["other_brand_named"].iloc[3])  # no brand of its list is named
    assert table["list_size"].tolist() == [3.0, 3.0, 3.0, 1.0]
    np.testing.assert_allclose(table["ce_score_gap"], [0.0, 0.4, 0.8, 0.0])
    np.testing.assert_allclose(table["ce_score_rank"], [0.0, 0.5, 1.0, 0.0])
    # BM25 is computed within each list: "shoes" is in all three titles (low idf), "nike" in none
    assert table["bm25_title"].iloc[3] > 0  # "socks" in its one-product list


def test_feature_table_rejects_misaligned_fields():
    with pytest.raises(ValueError, match="field 'brand' has 1 values for 2 pairs"):
        feature_table(["a", "b"], {"title": ["x", "y"], "brand": ["z"]}, [0, 1])


def test_record_fields_from_text_short_names_and_esci_columns():
    assert record_fields("Nike Air | Nike") == {"title": "Nike Air | Nike"}
    assert record_fields({"text": " <b>Cable</b> "})["title"] == "Cable"
    fields = record_fields({"product_title": "Cable", "brand": "Anker", "product_bullet_point": "2 m"})
    assert (fields["title"], fields["brand"], fields["bullets"], fields["color"]) == (
        "Cable",
        "Anker",
        "2 m",
        "",
    )


def test_feature_table_columns_are_the_pair_features_then_the_list_ones():
    from esci_reranker.stack.features import FEATURE_NAMES

    table = feature_table(["red shoes"], {"title": ["Red shoe"]}, [0], {"ce_score": np.array([0.5])})
    names = list(table.columns)
    assert tuple(names[: len(FEATURE_NAMES)]) == FEATURE_NAMES
    assert names[len(FEATURE_NAMES) :][:5] == [
        "bm25_title",
        "bm25_all",
        "bm25_long",
        "other_brand_named",
        "list_size",
    ]
    # then the model's columns, then list features in LIST_SCORES order (ce_score ... bm25_all, cov_all)
    assert names[len(FEATURE_NAMES) + 5 :] == [
        "ce_score",
        *(f"{s}_{k}" for s in ("ce_score", "bm25_all", "cov_all") for k in ("rank", "z", "gap")),
    ]


def test_product_sides_cache_is_bounded_by_what_it_holds(monkeypatch):
    from cachetools import LRUCache

    from esci_reranker.stack import features

    bound = 200_000
    monkeypatch.setattr(features, "_PRODUCT_CACHE", LRUCache(maxsize=bound, getsizeof=features._side_bytes))
    short = features.product_side("red mug", "Acme", "red", "", "")
    assert features.product_side("red mug", "Acme", "red", "", "") is short  # a hit: the same object
    long_text = "stainless steel insulated travel mug keeps coffee hot " * 60  # ~3,300 characters
    for i in range(10):
        features.product_side(f"travel mug {i}", "Acme", "black", long_text, long_text)
    stats = features.product_cache_stats()
    # Each long product is estimated at ~170 KB (10 KB + 24 B per character), so the bound keeps one
    # of them, not the 11 products a count bound would keep.
    assert stats["max_bytes"] == bound
    assert 0 < stats["bytes"] <= bound
    assert stats["entries"] == 1
    assert features.product_side("red mug", "Acme", "red", "", "") is not short  # evicted, rebuilt
    huge = "word " * 100_000  # one product over the bound on its own: served, not kept
    side = features.product_side("huge", "", "", huge, "")
    assert side.long_text.startswith("word")
    assert features.product_cache_stats()["bytes"] <= bound


@pytest.mark.parametrize("chunk_rows", [1, 37, 20_000])
def test_lists_in_chunks_give_each_list_its_own_features(monkeypatch, chunk_rows):
    # feature_arrays holds one chunk of lists' product sides at a time: on the sample's rows,
    # shuffled so lists interleave, every value is the one the list gets when scored alone,
    # whatever the chunk size (one list at a time, a few, all)
    import pandas as pd

    from esci_reranker.data import sample_path
    from esci_reranker.stack import features
    from esci_reranker.stack.cv import split_fields

    frame = pd.read_parquet(sample_path())
    frame = frame[frame["query_id"].isin(frame["query_id"].unique()[:12])]
    frame = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    scores = np.random.default_rng(0).normal(size=len(frame))
    monkeypatch.setattr(features, "CHUNK_ROWS", chunk_rows)
    together = features.feature_table(
        frame["query"].tolist(), split_fields(frame), frame["query_id"].tolist(), {"ce_score": scores}
    )
    for _, rows in frame.groupby("query_id").groups.items():
        part = frame.loc[rows]
        alone = features.feature_table(
            part["query"].tolist(), split_fields(part), part["query_id"].tolist(), {"ce_score": scores[rows]}
        )
        expected = alone.set_axis(rows)
        # to rounding only: a list alone takes list_features' one-list path (numpy's mean and
        # std for the z-score, pandas' groupby for several lists)
        pd.testing.assert_frame_equal(together.loc[rows], expected, check_exact=False, rtol=1e-12, atol=1e-12)


def _sample_lists(frame, rng):
    """Lists as a teacher forms them: per query, its first rows as one list, then the rest in
    chunks of 2, each beside those first rows (which thus stand in several lists)."""
    rows, groups, keep = [], [], np.full(len(frame), -1)
    for qid, members in frame.groupby("query_id", sort=False).indices.items():
        own, extra = members[: len(members) // 2 + 1], members[len(members) // 2 + 1 :]
        for i, block in enumerate([own] + [np.r_[own, extra[j : j + 2]] for j in range(0, len(extra), 2)]):
            mine = own if i == 0 else block[len(own) :]
            keep[mine] = len(rows) + np.flatnonzero(np.isin(block, mine))
            rows.extend(block.tolist())
            groups.extend([f"{qid}/{i}"] * len(block))
    # shuffle the entries, so lists interleave in the input
    order = rng.permutation(len(rows))
    where = np.empty(len(order), dtype=np.int64)
    where[order] = np.arange(len(order))
    return np.asarray(rows)[order], [groups[i] for i in order], where[keep]


@pytest.mark.parametrize("chunk_rows", [1, 37, 20_000])
def test_list_entries_get_the_features_of_their_list_spelled_out(monkeypatch, chunk_rows):
    # A pair standing in several lists is given once; its kept entry gets exactly the features
    # that feature_arrays gives it when every list entry is spelled out as a row of its own
    import pandas as pd

    from esci_reranker.data import sample_path
    from esci_reranker.stack import features
    from esci_reranker.stack.cv import split_fields

    frame = pd.read_parquet(sample_path())
    frame = frame[frame["query_id"].isin(frame["query_id"].unique()[:10])].reset_index(drop=True)
    rng = np.random.default_rng(1)
    rows, groups, keep = _sample_lists(frame, rng)
    queries, fields = frame["query"].tolist(), split_fields(frame)
    model = {"ce_score": rng.normal(size=len(frame)), "ce_sub": rng.random(len(frame))}
    monkeypatch.setattr(features, "CHUNK_ROWS", chunk_rows)
    mine = features.list_entry_features(queries, fields, features.CandidateLists(rows, groups, keep), model)
    spelled = features.feature_arrays(
        [queries[i] for i in rows],
        {name: [values[i] for i in rows] for name, values in fields.items()},
        groups,
        {name: values[rows] for name, values in model.items()},
    )
    assert list(mine) == list(spelled)
    for name, values in spelled.items():
        np.testing.assert_array_equal(mine[name], values[keep], err_msg=name)


def test_candidate_lists_of_groups_is_feature_arrays():
    from esci_reranker.stack.features import CandidateLists, feature_arrays, list_entry_features

    queries = ["red mug"] * 3 + ["usb cable"] * 2
    fields = {
        "title": ["Red mug", "Blue mug", "Mug", "USB-C cable 2 m", "Lightning cable"],
        "brand": ["A"] * 5,
    }
    groups = [7, 7, 7, 9, 9]
    model = {"ce_score": np.array([0.1, 0.5, 0.3, 0.9, 0.2])}
    lists = CandidateLists.of(groups)
    assert lists.kept_rows.tolist() == [0, 1, 2, 3, 4]
    mine = list_entry_features(queries, fields, lists, model)
    for name, values in feature_arrays(queries, fields, groups, model).items():
        np.testing.assert_array_equal(mine[name], values, err_msg=name)


def test_candidate_lists_are_checked():
    from esci_reranker.stack.features import CandidateLists, list_entry_features

    fields = {"title": ["a", "b"]}
    with pytest.raises(ValueError, match="3 groups for 2 rows"):
        list_entry_features(["q", "q"], fields, CandidateLists(np.array([0, 1]), [0, 0, 0], np.array([0])))
    with pytest.raises(ValueError, match="rows must index the 2 pairs"):
        list_entry_features(["q", "q"], fields, CandidateLists(np.array([0, 2]), [0, 0], np.array([0])))
    with pytest.raises(ValueError, match="keep names an entry twice"):
        list_entry_features(["q", "q"], fields, CandidateLists(np.array([0, 1]), [0, 0], np.array([1, 1])))


def test_frame_fields_clean_each_column_as_record_fields_cleans_a_row():
    import pandas as pd

    from esci_reranker.stack.features import frame_fields

    frame = pd.DataFrame(
        {
            "product_id": ["a", "b", "c"],
            "product_title": [" <b>Mug</b> ", None, "Cable &amp; plug"],
            "product_brand": ["Acme", float("nan"), "null"],
            "product_bullet_point": ["one\n two", "", None],
        }
    )
    by_row = [record_fields(r) for r in frame.to_dict(orient="records")]
    fields = frame_fields(frame)
    assert fields == {name: [r[name] for r in by_row] for name in fields}
    assert fields["title"] == ["Mug", "", "Cable & plug"]
    assert fields["color"] == ["", "", ""]  # no colour column
