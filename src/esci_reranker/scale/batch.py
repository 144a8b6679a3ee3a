"""The per-batch work of distributed scoring, free of any engine: check rows, score the good ones.

``reject_reasons`` says which rows cannot be scored and why; ``BatchScorer`` is the stateful
callable an engine (Ray Data's ``map_batches``) creates once per worker: it loads one
``Reranker`` in its constructor and turns each Arrow batch into the same rows and columns as the
single-process ``esci-reranker score`` (``reranker.score_parquet``), minus the rejected rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

import numpy as np
import pandas as pd
import pyarrow as pa

from esci_reranker.data.text import clean_column, product_texts

#: Column of the rejects file that says why a row was not scored.
REJECT_COLUMN: Final[str] = "reject_reason"
#: Reasons, joined with "; " when a row has several.
MISSING_QUERY: Final[str] = "missing query"
MISSING_PRODUCT_TEXT: Final[str] = "missing product text"


def reject_reasons(
    frame: pd.DataFrame, read_columns: Sequence[str], text_fields: Sequence[str], long_field_chars: int
) -> np.ndarray:
    """Why each row cannot be scored (``None`` for a good row), as an object array of ``len(frame)``.

    A row is rejected when its query is empty (null, blank, or a null marker such as "nan"
    after ``clean_text``) or when the product text the model would read is empty: the text built
    from the model's ``product_*`` columns, or ``product_text`` when the model reads that.
    ``read_columns`` is ``Reranker.input_columns(...)`` of the input: ``query`` and the product
    columns. Scoring such a row would give a confident-looking score for nothing.
    """
    n = len(frame)
    bad_query = clean_column(frame["query"]) == "" if n else np.zeros(0, dtype=bool)
    product_columns = [c for c in read_columns if c != "query"]
    if product_columns == ["product_text"]:
        texts = clean_column(frame["product_text"])
        label = f"{MISSING_PRODUCT_TEXT} (product_text is empty)"
    else:
        texts = product_texts(frame, text_fields, long_field_chars).to_numpy(dtype=object)
        label = f"{MISSING_PRODUCT_TEXT} ({', '.join(product_columns)} all empty)"
    bad_text = np.asarray([not t for t in texts], dtype=bool)
    reasons = np.full(n, None, dtype=object)
    reasons[bad_query & ~bad_text] = MISSING_QUERY
    reasons[~bad_query & bad_text] = label
    reasons[bad_query & bad_text] = f"{MISSING_QUERY}; {label}"
    return reasons


class BatchScorer:
    """Scores Arrow batches with one ``Reranker``, loaded once (one instance per engine worker).

    Args:
        model: checkpoint folder or Hub repo id (every worker must be able to read it).
        read_columns: the input columns the model reads (``Reranker.input_columns`` of the input).
        device, batch_size, backend: as ``Reranker.from_pretrained``.
        precision: fp32, bf16, int8, or auto (bf16 where this worker's device has it natively).
        threads: torch CPU threads of this worker (None leaves torch's default).
    """

    def __init__(
        self,
        model: str,
        read_columns: Sequence[str],
        device: str = "auto",
        batch_size: int = 64,
        precision: str = "fp32",
        backend: str = "torch",
        threads: int | None = None,
    ) -> None:
        import torch

        from esci_reranker.hardware import resolve_precision
        from esci_reranker.reranker import Reranker, select_device

        if threads is not None:
            # One worker per core (or per few cores) must not start a thread per core each.
            torch.set_num_threads(threads)
        # "auto" is decided here, on the worker's own device (a GPU node may support bf16).
        self.reranker = Reranker.from_pretrained(
            model,
            device=device,
            batch_size=batch_size,
            precision=resolve_precision(precision, select_device(device)),
            backend=backend,
        )
        self.read_columns = list(read_columns)
        self.pid = os.getpid()

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch's good rows, every input column kept, with ``SCORE_COLUMNS`` appended."""
        from esci_reranker.reranker import _output_schema, _prediction_arrays

        config = self.reranker.config
        frame = batch.select(self.read_columns).to_pandas()
        good = pd.isna(reject_reasons(frame, self.read_columns, config.text_fields, config.long_field_chars))
        kept = batch.filter(pa.array(good)) if not good.all() else batch
        preds = self.reranker.predict_frame(frame[good].reset_index(drop=True), progress=False)
        schema = _output_schema(batch.schema)
        # The same arrays, types and order as the single-process score_parquet writes.
        return pa.Table.from_arrays([*kept.columns, *_prediction_arrays(preds)], schema=schema)


def rejected_rows(
    batch: pa.Table, read_columns: Sequence[str], text_fields: Sequence[str], long_field_chars: int
) -> pa.Table:
    """The batch's rows that ``BatchScorer`` skips, every input column kept, plus ``REJECT_COLUMN``."""
    frame = batch.select(list(read_columns)).to_pandas()
    reasons = reject_reasons(frame, read_columns, text_fields, long_field_chars)
    bad = ~pd.isna(reasons)
    rejected = batch.filter(pa.array(bad))
    return rejected.append_column(REJECT_COLUMN, pa.array(reasons[bad].tolist(), pa.string()))
