"""Packed token rows: the same ids as the tokenizer's lists, at a few bytes a token."""

from __future__ import annotations

import numpy as np
import pytest

from esci_reranker.model import features
from esci_reranker.model.features import EncodedPairs, PairEncoder, TokenRows
from tests.conftest import build_tiny_model

ROWS = [[101, 7, 8, 102], [], [101, 5000, 102], [9]]


def test_rows_read_back_as_the_lists_they_were_made_of():
    rows = TokenRows.from_rows(ROWS)
    assert len(rows) == 4
    assert [rows[i] for i in range(4)] == ROWS
    assert rows[-1] == [9]
    assert list(rows) == ROWS
    assert rows == ROWS
    assert rows != [[101, 7, 8, 102]]
    assert rows.lengths().tolist() == [4, 0, 3, 1]
    assert all(type(x) is int for x in rows[2])  # plain ints, as the tokenizer gives them
    with pytest.raises(IndexError):
        rows[4]


def test_take_slices_and_concat_keep_every_row():
    rows = TokenRows.from_rows(ROWS)
    assert rows.take([3, 0, 0]) == [[9], ROWS[0], ROWS[0]]
    assert rows[1:3] == ROWS[1:3]
    assert rows[::-1] == ROWS[::-1]
    assert rows.take([]) == []
    joined = TokenRows.concat([rows, TokenRows.from_rows([[1, 2]])])
    assert joined == [*ROWS, [1, 2]]
    arrays = TokenRows.from_rows([np.asarray(r, dtype=np.int32) for r in ROWS])
    assert arrays == rows
    assert rows.nbytes == 4 * 8 + 5 * 8  # 8 ids of 4 bytes, 5 offsets of 8


def test_offsets_that_do_not_cover_the_ids_are_refused():
    with pytest.raises(ValueError, match="offsets"):
        TokenRows(np.arange(3, dtype=np.int32), np.asarray([0, 2]))


def test_encoding_in_chunks_gives_the_ids_of_one_pass(monkeypatch: pytest.MonkeyPatch):
    model, tokenizer = build_tiny_model(prior="cosine", lexical=True, max_length=16)
    queries = ["aa batteries", "usb c cable", "lamp", "desk", "garden hose"]
    texts = ["Duracell AA 24 pack", "Anker cable " * 20, "Desk lamp", "Oak desk | Ikea", "Hose 50 ft"]
    encoder = PairEncoder(tokenizer, model.config)
    whole = encoder.encode(queries, texts)
    monkeypatch.setattr(features, "ENCODE_CHUNK", 2)
    chunked = encoder.encode(queries, texts)
    assert chunked == whole
    assert isinstance(chunked.pair_ids, TokenRows)
    expected = tokenizer(queries, texts, truncation="longest_first", max_length=16)
    assert whole.pair_ids == expected["input_ids"]
    assert whole.pair_type_ids == expected["token_type_ids"]
    assert whole.truncated == [len(x) >= 16 for x in expected["input_ids"]]
    assert whole.truncated[1]
    assert whole.lengths() == [
        len(p) + len(q) + len(t)
        for p, q, t in zip(whole.pair_ids, whole.query_ids or [], whole.product_ids or [], strict=True)
    ]
    empty = encoder.encode([], [])
    assert len(empty) == 0
    assert empty.lengths() == []


def test_concat_of_encoded_pairs_takes_lists_too():
    a = EncodedPairs(
        pair_ids=[[1, 2]], pair_type_ids=None, query_ids=None, product_ids=None, truncated=[False]
    )
    b = EncodedPairs(
        pair_ids=TokenRows.from_rows([[3]]),
        pair_type_ids=None,
        query_ids=None,
        product_ids=None,
        truncated=[True],
    )
    both = EncodedPairs.concat([a, b])
    assert both.pair_ids == [[1, 2], [3]]
    assert both.truncated == [False, True]
    assert both.query_ids is None
