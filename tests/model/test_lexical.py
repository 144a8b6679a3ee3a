"""The query-word coverage feature."""

from __future__ import annotations

import pytest

from esci_reranker.model.lexical import query_coverage, query_coverages, word_tokens


def test_word_tokens_lowercase_and_drop_stopwords():
    assert word_tokens("The Red shoes FOR men, size-10") == ["red", "shoes", "men", "size", "10"]


@pytest.mark.parametrize(
    ("query", "text", "expected"),
    [
        ("aa batteries", "Duracell AA Battery, 24 pack", 1.0),  # "batt" stem matches
        ("red running shoes", "Nike Air Zoom | Nike | Red", 1 / 3),
        ("iphone 13 case", "Samsung Galaxy cover", 0.0),
        ("iphone iphone case", "iPhone charger", 0.5),  # distinct query words count once
        ("the of and", "anything", 0.0),  # nothing left after stopwords
        ("tv", "55 inch TVs", 0.0),  # short words must match whole
    ],
)
def test_query_coverage(query, text, expected):
    assert query_coverage(query, text) == pytest.approx(expected)


def test_query_coverages_checks_lengths():
    assert query_coverages(["a b", "usb"], ["usb cable", "USB-C"]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="2 queries but 1 texts"):
        query_coverages(["a", "b"], ["x"])
