"""A training's strings read from its split file for the rows asked: the same as those of the
whole table, in any order, across read chunks, and refused when the file changed."""

from __future__ import annotations

import os

import numpy as np
import pytest

from esci_reranker.model.config import ModelConfig
from esci_reranker.train import texts as texts_module
from esci_reranker.train.loop import read_split
from esci_reranker.train.texts import SplitTexts, frame_texts


def test_rows_in_any_order_across_read_chunks_match_the_whole_table(small_splits, monkeypatch):
    path = small_splits / "train.parquet"
    full = read_split(path, "train")
    config = ModelConfig(text_fields=["title", "brand", "color"])
    every_text = frame_texts(full, config)
    monkeypatch.setattr(texts_module, "READ_ROWS", 7)  # many chunks, rows asked in several
    rng = np.random.default_rng(0)
    index = np.concatenate([rng.permutation(len(full))[:50], [3, 3, len(full) - 1]])  # repeats too
    queries, texts = SplitTexts(path, config).take(index)
    assert queries == full["query"].astype(str).iloc[index].tolist()
    assert texts == [every_text[i] for i in index]
    assert SplitTexts(path, config).take([]) == ([], [])
    # a subset of the file's rows, in the training's order
    rows = rng.permutation(len(full))[:20]
    chosen = SplitTexts(path, config, rows)
    assert len(chosen) == 20
    assert chosen.take([19, 0])[1] == [every_text[rows[19]], every_text[rows[0]]]


def test_a_title_only_or_text_only_split_and_a_split_without_text(small_splits, tmp_path):
    full = read_split(small_splits / "train.parquet", "train")
    config = ModelConfig(text_fields=["title", "brand", "color"])
    full[["query_id", "query", "product_id", "esci_label", "product_title"]].to_parquet(
        tmp_path / "t.parquet"
    )
    assert SplitTexts(tmp_path / "t.parquet", config).take([0])[1] == [
        frame_texts(full.head(1)[["product_title"]], config)[0]
    ]
    full[["query_id", "query", "product_id", "esci_label", "product_text"]].to_parquet(tmp_path / "p.parquet")
    assert SplitTexts(tmp_path / "p.parquet", config).take([1])[1] == [str(full["product_text"].iloc[1])]
    full[["query_id", "query", "product_id", "esci_label"]].to_parquet(tmp_path / "none.parquet")
    with pytest.raises(
        ValueError, match=r"none\.parquet: expected the columns 'query' and \['product_title'"
    ):
        SplitTexts(tmp_path / "none.parquet", config)


def test_a_split_that_changed_during_training_is_refused(small_splits, tmp_path):
    full = read_split(small_splits / "train.parquet", "train")
    path = tmp_path / "train.parquet"
    full.to_parquet(path)
    texts = SplitTexts(path, ModelConfig())
    # the same number of rows in another order: positions would point at other pairs
    full.iloc[::-1].to_parquet(path)
    os.utime(path, ns=(0, texts._stamp[1] + 1))  # a later write, whatever the clock's resolution
    with pytest.raises(ValueError, match=r"train\.parquet: the split changed during training"):
        texts.take([0])
