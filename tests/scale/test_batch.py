"""The per-batch work of distributed scoring, without Ray: which rows are rejected, and the scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esci_reranker.reranker import SCORE_COLUMNS
from esci_reranker.scale.batch import (
    MISSING_PRODUCT_TEXT,
    MISSING_QUERY,
    REJECT_COLUMN,
    BatchScorer,
    reject_reasons,
    rejected_rows,
)
from tests.conftest import SAMPLE_PARQUET

FIELDS = ("title", "brand", "color")
PRODUCT_COLUMNS = ["product_title", "product_brand", "product_color"]


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    """40 real sample rows, four of them broken in different ways."""
    frame = pd.read_parquet(SAMPLE_PARQUET).iloc[:40].reset_index(drop=True)
    frame.loc[1, "query"] = None
    frame.loc[2, "query"] = "   "
    frame.loc[3, PRODUCT_COLUMNS] = [None, "", "nan"]  # every field the model reads is empty
    frame.loc[4, "query"] = "nan"
    frame.loc[4, PRODUCT_COLUMNS] = None
    frame.loc[5, ["product_title", "product_brand"]] = None  # the colour alone is still a text
    return frame


def test_reject_reasons_name_what_is_missing(rows: pd.DataFrame):
    reasons = reject_reasons(rows, ["query", *PRODUCT_COLUMNS], FIELDS, 500)
    product = f"{MISSING_PRODUCT_TEXT} (product_title, product_brand, product_color all empty)"
    assert reasons[1] == reasons[2] == MISSING_QUERY
    assert reasons[3] == product
    assert reasons[4] == f"{MISSING_QUERY}; {product}"
    assert reasons[0] is None
    assert reasons[5] is None
    assert pd.isna(reasons).sum() == len(rows) - 4


def test_reject_reasons_with_product_text_input():
    frame = pd.DataFrame({"query": ["a", "b", "c"], "product_text": ["x", None, " <br> "]})
    reasons = reject_reasons(frame, ["query", "product_text"], FIELDS, 500)
    assert reasons.tolist() == [
        None,
        f"{MISSING_PRODUCT_TEXT} (product_text is empty)",
        f"{MISSING_PRODUCT_TEXT} (product_text is empty)",  # only markup: nothing left to read
    ]


def test_batch_scorer_gives_the_single_process_rows_and_columns(
    rows: pd.DataFrame, tiny_checkpoint: Path, score_in_one_process
):
    good = rows.drop(index=[1, 2, 3, 4]).reset_index(drop=True)
    single = pq.read_table(score_in_one_process(good))

    scorer = BatchScorer(str(tiny_checkpoint), ["query", *PRODUCT_COLUMNS], device="cpu", threads=1)
    out = scorer(pa.Table.from_pandas(rows, preserve_index=False))
    assert out.num_rows == len(good)
    assert out.schema.names == single.schema.names
    assert out.schema.names[-len(SCORE_COLUMNS) :] == list(SCORE_COLUMNS)
    assert out.column("product_id").to_pylist() == good["product_id"].tolist()
    np.testing.assert_allclose(out.column("score").to_numpy(), single.column("score").to_numpy(), atol=1e-6)
    assert out.column("esci_pred").to_pylist() == single.column("esci_pred").to_pylist()


def test_batch_scorer_on_a_batch_of_rejects_only(rows: pd.DataFrame, tiny_checkpoint: Path):
    scorer = BatchScorer(str(tiny_checkpoint), ["query", *PRODUCT_COLUMNS], device="cpu", precision="auto")
    out = scorer(pa.Table.from_pandas(rows.iloc[1:5], preserve_index=False))
    assert out.num_rows == 0
    assert out.schema.names[-len(SCORE_COLUMNS) :] == list(SCORE_COLUMNS)


def test_rejected_rows_keep_every_column_and_add_the_reason(rows: pd.DataFrame):
    table = pa.Table.from_pandas(rows, preserve_index=False)
    out = rejected_rows(table, ["query", *PRODUCT_COLUMNS], FIELDS, 500)
    assert out.schema.names == [*table.schema.names, REJECT_COLUMN]
    assert out.column("product_id").to_pylist() == rows.loc[[1, 2, 3, 4], "product_id"].tolist()
    assert all(out.column(REJECT_COLUMN).to_pylist())
