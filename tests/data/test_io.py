"""Reading the raw and joined files: filters, dtypes, cleaning, and every input error."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from esci_reranker.data import DataError, load_examples, load_joined, load_products
from esci_reranker.data.io import EXAMPLE_COLUMNS, PRODUCTS_COLUMNS
from tests.data.conftest import RawFiles, examples_frame, products_frame, write


def test_load_examples_filters_locale_and_counts_the_rest(raw: RawFiles) -> None:
    loaded = load_examples(raw.examples, locale="es")
    assert set(loaded.frame["product_locale"]) == {"es"}
    assert len(loaded.frame) == 3 * 4
    assert loaded.rows_in_file == 16 * 4
    assert loaded.dropped == {"other_locale": 13 * 4}
    assert loaded.locales == ("es", "us")


def test_load_examples_all_locales_and_compact_dtypes(raw: RawFiles) -> None:
    frame = load_examples(raw.examples, locale="all").frame
    assert len(frame) == 16 * 4
    assert frame["query_id"].dtype == "int64"
    assert frame["example_id"].dtype == "int64"
    for column in ("query", "product_locale", "esci_label", "split"):
        assert isinstance(frame[column].dtype, pd.CategoricalDtype), column
    assert frame["small_version"].dtype == "int8"


def test_small_version_keeps_flagged_rows_only(raw: RawFiles) -> None:
    loaded = load_examples(raw.examples, locale="us", small_version=True)
    assert set(loaded.frame["small_version"]) == {1}
    assert set(loaded.frame["esci_label"]) == {"E", "S"}
    assert loaded.dropped == {"other_locale": 3 * 4, "not_small_version": 13 * 2}


def test_small_version_without_the_column_names_the_file(tmp_path: Path) -> None:
    path = write(examples_frame().drop(columns="small_version"), tmp_path / "ex.parquet")
    with pytest.raises(DataError, match="no 'small_version' column") as error:
        load_examples(path, small_version=True)
    assert str(path) in str(error.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.parquet"
    with pytest.raises(DataError, match=r"examples file not found; expected Amazon's") as error:
        load_examples(path)
    assert str(path) in str(error.value)


def test_directory_and_non_parquet_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a directory"):
        load_examples(tmp_path)
    path = tmp_path / "text.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot read ESCI examples file")):
        load_examples(path)


def test_missing_columns_are_listed_with_the_expected_ones(tmp_path: Path) -> None:
    path = write(examples_frame().drop(columns=["esci_label", "split"]), tmp_path / "ex.parquet")
    with pytest.raises(DataError) as error:
        load_examples(path)
    message = str(error.value)
    assert str(path) in message
    assert "missing column(s) ['esci_label', 'split']" in message
    assert str(list(EXAMPLE_COLUMNS)) in message


def test_products_missing_column(tmp_path: Path) -> None:
    path = write(products_frame().drop(columns="product_color"), tmp_path / "pr.parquet")
    with pytest.raises(DataError, match=re.escape("missing column(s) ['product_color']")) as error:
        load_products(path)
    assert str(list(PRODUCTS_COLUMNS)) in str(error.value)


def test_empty_table(tmp_path: Path) -> None:
    path = write(examples_frame().iloc[:0], tmp_path / "ex.parquet")
    with pytest.raises(DataError, match=re.escape(f"{path}: ESCI examples file is empty (0 rows)")):
        load_examples(path)


def test_unknown_label_names_the_file_and_the_value(tmp_path: Path) -> None:
    frame = examples_frame()
    frame.loc[3, "esci_label"] = "X"
    path = write(frame, tmp_path / "ex.parquet")
    with pytest.raises(DataError, match=r"unknown esci_label value\(s\) 'X'; expected one of E, S") as e:
        load_examples(path)
    assert str(path) in str(e.value)


def test_locale_without_rows_names_the_locales_present(raw: RawFiles) -> None:
    with pytest.raises(DataError) as error:
        load_examples(raw.examples, locale="jp")
    message = str(error.value)
    assert str(raw.examples) in message
    assert "no rows with product_locale == 'jp'; the file has locale(s) es, us" in message


def test_unknown_locale() -> None:
    with pytest.raises(DataError, match="locale 'fr' is not an ESCI locale; expected one of us, es"):
        load_examples("whatever.parquet", locale="fr")


def test_null_key_and_non_integer_query_id(tmp_path: Path) -> None:
    frame = examples_frame()
    frame.loc[0, "product_id"] = None
    path = write(frame, tmp_path / "nulls.parquet")
    with pytest.raises(DataError, match="column 'product_id' of ESCI examples file has null"):
        load_examples(path)
    path = write(examples_frame().astype({"query_id": str}), tmp_path / "qid.parquet")
    with pytest.raises(DataError, match=r"column 'query_id' .* expected integers"):
        load_examples(path)


def test_products_are_cleaned_and_filtered_by_locale_and_ids(raw: RawFiles) -> None:
    loaded = load_products(raw.products, locale="us", product_ids=["P0", "P4"])
    frame = loaded.frame.set_index("product_id")
    assert list(frame.index) == ["P0", "P4"]
    assert frame.loc["P0", "product_title"] == "Red & blue shoe"
    assert frame.loc["P4", "product_description"] == "Only a description"
    # None and the string "nan" both become "".
    assert frame.loc["P4", "product_brand"] == ""
    assert frame.loc["P4", "product_color"] == ""
    assert frame["product_title"].dtype == object


def test_duplicate_products_are_an_error(tmp_path: Path) -> None:
    products = products_frame()
    path = write(pd.concat([products, products.iloc[:1]]), tmp_path / "pr.parquet")
    with pytest.raises(DataError, match=r"1 product row\(s\) repeat .* \('P0', 'us'\)"):
        load_products(path)


def test_joined_file_keeps_example_and_product_columns(joined: Path) -> None:
    frame = load_joined(joined).frame
    assert {"esci_query_source", "product_title", "split"} <= set(frame.columns)
    assert "Red & blue shoe" in set(frame["product_title"])
    assert set(frame["split"]) == {"train", "dev", "holdout"}


def test_damaged_file_is_a_data_error(tmp_path: Path) -> None:
    path = write(examples_frame(), tmp_path / "damaged.parquet")
    data = bytearray(path.read_bytes())
    data[200:1200] = b"\xff" * 1000  # column pages; the footer stays readable
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(f"{path}: ESCI examples file is damaged")):
        load_examples(path)


def test_dictionary_encoded_columns_are_read(tmp_path: Path) -> None:
    """Files written from pandas categoricals store strings dictionary-encoded."""
    categorical = dict.fromkeys(("query", "product_id", "product_locale", "esci_label", "split"), "category")
    path = write(examples_frame().astype(categorical), tmp_path / "ex.parquet")
    loaded = load_examples(path, locale="es")
    assert len(loaded.frame) == 12
    assert set(loaded.frame["esci_label"]) == set("ESCI")
