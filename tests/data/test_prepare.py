"""prepare(): join, text, drops, splits and stats; write_splits(): outputs and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from esci_reranker.data import (
    OUTPUT_TYPES,
    DataError,
    PrepareOptions,
    PrepareResult,
    prepare,
    sample_holdout_query_ids,
    sample_path,
    write_splits,
)
from esci_reranker.data.text import FIELD_SEPARATOR, product_text
from esci_reranker.labels import ESCI_GAINS
from tests.data.conftest import RawFiles, examples_frame, products_frame, write

BASE_COLUMNS = [
    c for c in OUTPUT_TYPES if c not in {"example_id", "small_version", "large_version", "esci_query_source"}
]


def _all(result: PrepareResult) -> pd.DataFrame:
    return pd.concat(result.splits.values(), ignore_index=True)


def test_raw_pair_is_joined_cleaned_and_split(raw: RawFiles) -> None:
    result = prepare(raw.examples, raw.products)
    train, val, test = result.train, result.val, result.test
    expected_columns = [*BASE_COLUMNS, "example_id", "small_version", "large_version"]
    for frame in (train, val, test):
        assert list(frame.columns) == expected_columns
        assert frame["query_id"].dtype == "int64"
        assert frame["gain"].dtype == "float64"
        assert frame["query_id"].is_monotonic_increasing
    # us: 10 train queries -> 1 val; 3 test queries; rows of us/P4 (empty default text) dropped.
    assert (train["query_id"].nunique(), val["query_id"].nunique(), test["query_id"].nunique()) == (9, 1, 3)
    assert not set(train["query_id"]) & set(val["query_id"]) | set(train["query_id"]) & set(test["query_id"])
    rows = _all(result)
    assert set(rows["product_locale"]) == {"us"}
    assert "P4" not in set(rows["product_id"])
    assert result.stats["dropped"] == {"other_locale": 12, "empty_product_text": 8}
    assert rows["gain"].tolist() == rows["esci_label"].map(ESCI_GAINS).tolist()
    p0 = rows[rows["product_id"] == "P0"].iloc[0]
    assert p0["product_title"] == "Red & blue shoe"
    assert p0["product_text"] == FIELD_SEPARATOR.join(["Red & blue shoe", "brand0"])
    p1 = rows[rows["product_id"] == "P1"].iloc[0]
    assert p1["product_text"] == "us title 1 | brand1 | red"


def test_product_text_matches_inference_time_text(raw: RawFiles) -> None:
    """Training text equals what product_text builds at inference from the raw product record."""
    fields = ("bullets", "title", "description")
    result = prepare(
        raw.examples, raw.products, options=PrepareOptions(text_fields=fields, long_field_chars=50)
    )
    rows = _all(result).drop_duplicates("product_id").set_index("product_id")
    raw_products = products_frame().query("product_locale == 'us'").set_index("product_id")
    for product_id, row in rows.iterrows():
        assert row["product_text"] == product_text(raw_products.loc[product_id].to_dict(), fields, 50)
    assert rows.loc["P0", "product_text"].startswith("bullet 0 | Red & blue shoe | word word")
    assert len(rows.loc["P0", "product_text"]) < 50 + len("bullet 0 | Red & blue shoe | ")
    # The cleaned column itself is not capped.
    assert rows.loc["P0", "product_description"] == ("word " * 200).strip()


def test_description_field_keeps_rows_that_only_have_a_description(raw: RawFiles) -> None:
    result = prepare(raw.examples, raw.products, options=PrepareOptions(text_fields=("title", "description")))
    rows = _all(result)
    assert result.stats["dropped"]["empty_product_text"] == 0
    assert set(rows.loc[rows["product_id"] == "P4", "product_text"]) == {"Only a description"}


def test_locale_all_and_small_version(raw: RawFiles, tmp_path: Path) -> None:
    options = PrepareOptions(locale="all", small_version=True, text_fields=("title",))
    result = prepare(raw.examples, raw.products, options=options)
    rows = _all(result)
    assert set(rows["product_locale"]) == {"us", "es"}
    assert set(rows["small_version"]) == {1}
    assert result.stats["dropped"] == {"other_locale": 0, "not_small_version": 32, "empty_product_text": 4}
    # The same ASIN carries each locale's own text.
    es = rows[(rows["product_locale"] == "es") & (rows["product_id"] == "P1")]
    assert set(es["product_title"]) == {"es título 1"}
    paths = write_splits(result, tmp_path / "out")
    for name, frame in result.splits.items():
        pd.testing.assert_frame_equal(pd.read_parquet(paths[name]), frame, check_dtype=False)


def test_val_frac_and_seed_choose_val_queries(raw: RawFiles) -> None:
    def val_queries(**kwargs: object) -> set[int]:
        return set(prepare(raw.examples, raw.products, options=PrepareOptions(**kwargs)).val["query_id"])

    assert len(val_queries(val_frac=0.5)) == 5
    assert val_queries(seed=4) == val_queries(seed=4)
    assert len({frozenset(val_queries(seed=s)) for s in range(5)}) > 1


def test_missing_products_are_counted_and_named(raw: RawFiles, tmp_path: Path) -> None:
    products = products_frame()
    products = products[~((products["product_id"] == "P2") & (products["product_locale"] == "us"))]
    path = write(products, tmp_path / "few_products.parquet")
    with pytest.raises(DataError) as error:
        prepare(raw.examples, path)
    message = str(error.value)
    assert str(path) in message
    assert (
        "no product row for 9 example row(s) (1 distinct (product_id, product_locale) key(s), e.g. ('P2', 'us'))"
        in message
    )


def test_products_of_another_locale_only(raw: RawFiles, tmp_path: Path) -> None:
    path = write(products_frame().query("product_locale == 'es'"), tmp_path / "es.parquet")
    with pytest.raises(DataError, match=r"no product row for 52 example row\(s\).*has locale\(s\) es"):
        prepare(raw.examples, path)


def test_a_query_in_two_splits_is_an_error(tmp_path: Path, raw: RawFiles) -> None:
    frame = examples_frame()
    frame.loc[1, "split"] = "test"
    path = write(frame, tmp_path / "ex.parquet")
    with pytest.raises(
        DataError, match=r"ex.parquet: 1 query_id\(s\) have rows in two splits, e.g. 100 \(test/train\)"
    ):
        prepare(path, raw.products)


def test_unknown_label_through_prepare(tmp_path: Path, raw: RawFiles) -> None:
    frame = examples_frame()
    frame.loc[0, "esci_label"] = "exact"
    path = write(frame, tmp_path / "ex.parquet")
    with pytest.raises(DataError, match="unknown esci_label value"):
        prepare(path, raw.products)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text_fields": ("title", "price")}, r"unknown field\(s\) \['price'\]; expected names from"),
        ({"text_fields": ()}, "expected at least one of"),
        ({"text_fields": ("title", "title")}, "names a field twice"),
        ({"val_frac": 0.0}, r"--val-frac must be a fraction strictly between 0 and 1, got 0.0"),
        ({"val_frac": 1.0}, "--val-frac must be"),
        ({"val_frac": float("nan")}, "--val-frac must be"),
        ({"long_field_chars": 0}, "--long-field-chars must be a positive integer"),
        ({"seed": -1}, "--seed must be a non-negative integer"),
        ({"locale": "uk"}, "locale 'uk' is not an ESCI locale"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        PrepareOptions(**kwargs)


def test_text_fields_are_normalised() -> None:
    assert PrepareOptions(text_fields=(" title", "brand ")).text_fields == ("title", "brand")


def test_inputs_must_be_a_pair_or_a_joined_file(raw: RawFiles, joined: Path) -> None:
    for kwargs in (
        {"examples": raw.examples},
        {"products": raw.products},
        {},
        {"examples": raw.examples, "products": raw.products, "joined": joined},
    ):
        with pytest.raises(DataError, match="give both the examples and the products file"):
            prepare(**kwargs)


def test_joined_file_maps_dev_and_holdout(joined: Path) -> None:
    result = prepare(joined=joined, options=PrepareOptions(val_frac=0.5))
    assert result.stats["split_scheme"] == "train-dev-holdout"
    # dev = us queries 0 and 1 -> val (val_frac is not applied); holdout -> test.
    assert set(result.val["query"]) == {"us query 0", "us query 1"}
    assert set(result.test["query"]) == {"us query 10", "us query 11", "us query 12"}
    assert list(result.train.columns) == [*BASE_COLUMNS, "esci_query_source"]


def test_stats_and_written_files(raw: RawFiles, tmp_path: Path) -> None:
    result = prepare(raw.examples, raw.products)
    paths = write_splits(result, tmp_path / "out" / "nested")
    assert sorted(p.name for p in (tmp_path / "out" / "nested").iterdir()) == [
        "stats.json",
        "test.parquet",
        "train.parquet",
        "val.parquet",
    ]
    stats = json.loads(paths["stats"].read_text())
    assert stats == json.loads(json.dumps(result.stats))
    assert stats["inputs"] == {
        "examples": str(raw.examples.resolve()),
        "products": str(raw.products.resolve()),
    }
    assert stats["options"] == {
        "locale": "us",
        "small_version": False,
        "text_fields": ["title", "brand", "color"],
        "long_field_chars": 500,
        "val_frac": 0.1,
        "seed": 0,
    }
    assert stats["split_scheme"] == "esci"
    assert stats["rows_in_files"] == {"examples": 64, "products": 12}
    for name, frame in result.splits.items():
        split_stats = stats["splits"][name]
        assert split_stats["rows"] == len(frame)
        assert split_stats["queries"] == frame["query_id"].nunique()
        assert split_stats["labels"] == {k: int((frame["esci_label"] == k).sum()) for k in "ESCI"}
        table = pq.read_table(paths[name])
        assert table.schema.names == list(frame.columns)
        assert [table.schema.field(c).type for c in frame.columns] == [OUTPUT_TYPES[c] for c in frame.columns]
        pd.testing.assert_frame_equal(table.to_pandas(), frame, check_dtype=False)
    assert stats["all"]["rows"] == sum(s["rows"] for s in stats["splits"].values())


def _broken(result: PrepareResult) -> PrepareResult:
    """A result whose test split cannot be written (an int in a string column)."""
    test = result.test.copy()
    test.loc[0, "product_title"] = 123
    return PrepareResult(splits={**result.splits, "test": test}, stats=result.stats)


def test_a_failed_write_leaves_previous_outputs_intact(raw: RawFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_splits(prepare(raw.examples, raw.products), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = prepare(raw.examples, raw.products, options=PrepareOptions(seed=9, text_fields=("title",)))
    with pytest.raises(DataError, match=r"test\.parquet.*tmp: column 'product_title' cannot be written"):
        write_splits(_broken(other), out, progress=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file either


def test_a_failed_write_into_a_new_folder_leaves_nothing(raw: RawFiles, tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    with pytest.raises(DataError, match="expected str, got int 123"):
        write_splits(_broken(prepare(raw.examples, raw.products)), out)
    assert not out.exists()


def test_bundled_sample() -> None:
    result = prepare(joined=sample_path())
    stats = result.stats
    assert (stats["all"]["queries"], stats["all"]["rows"]) == (151, 6694)
    assert [stats["splits"][s]["queries"] for s in ("train", "val", "test")] == [97, 13, 41]
    assert [stats["splits"][s]["rows"] for s in ("train", "val", "test")] == [4325, 548, 1821]
    assert stats["all"]["labels"] == {"E": 3392, "S": 1904, "C": 305, "I": 1093}
    queries = [set(frame["query_id"]) for frame in result.splits.values()]
    assert sum(len(q) for q in queries) == len(set().union(*queries))  # no query in two splits
    assert queries[2] == sample_holdout_query_ids()
    assert stats["dropped"] == {"other_locale": 0, "empty_product_text": 0}


def test_missing_optional_values_are_written_as_nulls(tmp_path: Path, joined: Path) -> None:
    frame = pd.read_parquet(joined)
    frame["esci_query_source"] = frame["esci_query_source"].where(frame["query"] != "us query 2")
    frame.loc[frame["query"] == "us query 3", "esci_query_source"] = "négations 否定"
    path = write(frame, tmp_path / "with_nulls.parquet")
    paths = write_splits(prepare(joined=path), tmp_path / "out")
    train = pd.read_parquet(paths["train"])
    assert train.loc[train["query"] == "us query 2", "esci_query_source"].isna().all()
    assert set(train.loc[train["query"] == "us query 3", "esci_query_source"]) == {"négations 否定"}
