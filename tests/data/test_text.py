"""Product text helpers added for the data layer: per-distinct-value cleaning, joining cleaned fields."""

from __future__ import annotations

import re
import sys

import numpy as np
import pandas as pd
import pytest

from esci_reranker.data.text import (
    clean_column,
    clean_text,
    join_cleaned_fields,
    product_text,
    product_texts,
)


def test_clean_column_equals_clean_text_per_cell() -> None:
    values = ["<b>A</b>  &amp; b", None, float("nan"), "null", "A", "<b>A</b>  &amp; b", " x\n"]
    cleaned = clean_column(pd.Series(values, dtype=object))
    assert cleaned.dtype == object
    assert cleaned.tolist() == [clean_text(v) for v in values]
    assert cleaned[0] is cleaned[5]  # equal inputs share one string


def test_clean_column_of_an_empty_column() -> None:
    assert clean_column([]).tolist() == []


def test_join_cleaned_fields_matches_product_text() -> None:
    records = [
        {"title": "Shoe", "brand": "", "description": "word " * 40, "bullets": "b1 b2"},
        {"title": "", "brand": "", "description": "", "bullets": ""},
    ]
    fields = ("description", "title", "brand", "bullets")
    cleaned = {f: [clean_text(r[f]) for r in records] for f in fields}
    texts = join_cleaned_fields(cleaned, fields, long_field_chars=20)
    assert texts.tolist() == [product_text(r, fields, 20) for r in records]
    assert texts[1] == ""


def test_join_cleaned_fields_without_any_field() -> None:
    assert join_cleaned_fields({}, ("title",), length=2).tolist() == ["", ""]


def test_product_texts_still_cleans_raw_columns() -> None:
    frame = pd.DataFrame({"product_title": ["<p>T</p>", None], "product_color": [np.nan, "red"]})
    assert product_texts(frame, ("title", "brand", "color")).tolist() == ["T", "red"]


def test_clean_text_folds_every_unicode_whitespace_like_a_regex() -> None:
    spaces = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
    text = f"{spaces}a{spaces}b \u3000c\xa0\n{spaces}"
    assert clean_text(text) == re.sub(r"\s+", " ", text).strip() == "a b c"


def test_clean_text_null_markers() -> None:
    for marker in ("nan", "None", " NULL ", "   none          "):
        assert clean_text(marker) == ""
    assert clean_text("nano") == "nano"
    assert clean_text(" nullable ") == "nullable"


@pytest.mark.parametrize(
    "raw",
    [
        "&lt;br&gt;Soft &amp; warm<p>blanket</p>",
        "<b>Bold</b> &quot;quoted&quot;",
        "  plain   text  ",
        "&lt;3 cats",
    ],
)
def test_clean_text_is_idempotent(raw):
    once = clean_text(raw)
    assert clean_text(once) == once


def test_product_texts_names_an_unknown_field() -> None:
    frame = pd.DataFrame({"product_title": ["Shoe"]})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['bullet_point'\]"):
        product_texts(frame, ["title", "bullet_point"])
