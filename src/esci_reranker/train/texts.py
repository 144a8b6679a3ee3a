"""The strings a training tokenises, built from its split file for the rows a process asks for.

A training plans each epoch's batches from the query ids alone, and with several processes each
one tokenises only the pairs of its own batches (and its share of the prior fit's). Holding every
pair's query and product text on every process would undo that: ~0.7 GiB a process on the full
ESCI train+val, the same for 1 process or 8. So the trainer keeps the ids and labels, reads the
text columns of the split file for the rows it needs when it needs them, and lets the strings go
once they are tokenised.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from esci_reranker.data.text import FIELD_COLUMNS, product_texts
from esci_reranker.model.config import ModelConfig

#: Rows decoded at a time while a split file is read: bounds the read's transient memory
#: (~10 MB of title, brand and colour), whatever the file's row groups.
READ_ROWS = 65_536


def frame_texts(frame: pd.DataFrame, config: ModelConfig) -> list[str]:
    """Product text as the model reads it: rebuilt from product_* columns, else ``product_text``."""
    if any(FIELD_COLUMNS[f] in frame.columns for f in config.text_fields):
        return product_texts(frame, config.text_fields, config.long_field_chars).tolist()
    if "product_text" in frame.columns:
        return frame["product_text"].astype(str).tolist()
    raise ValueError("split has neither product_* columns nor product_text.")


def text_columns(present: Sequence[str], config: ModelConfig) -> list[str]:
    """The columns ``frame_texts`` reads for ``config``, of those ``present``, with ``query`` first."""
    fields = [FIELD_COLUMNS[f] for f in config.text_fields if FIELD_COLUMNS[f] in present]
    if fields:
        return ["query", *fields]
    return ["query", "product_text"] if "product_text" in present else ["query"]


class SplitTexts:
    """The (query, product text) pairs of a split file's rows, built on demand.

    Args:
        path: a prepared split (parquet).
        config: the model's config (its ``text_fields`` and ``long_field_chars`` make the text).
        rows: the file positions of the training's rows, in the training's order (a
            ``data.max_train_rows`` sample); every row of the file when omitted.

    Raises:
        ValueError: the file has no ``query`` column, or neither product_* columns of
            ``config.text_fields`` nor ``product_text``.
    """

    def __init__(self, path: Path | str, config: ModelConfig, rows: np.ndarray | None = None) -> None:
        self.path = Path(path)
        self.config = config
        metadata = pq.read_metadata(self.path)
        self.columns = text_columns(metadata.schema.names, config)
        if "query" not in metadata.schema.names or len(self.columns) < 2:
            wanted = [FIELD_COLUMNS[f] for f in config.text_fields]
            raise ValueError(
                f"{self.path}: expected the columns 'query' and {wanted} (or 'product_text'), "
                f"found {metadata.schema.names}."
            )
        self.num_file_rows = metadata.num_rows
        self._stamp = self._file_stamp()
        self.rows = np.arange(self.num_file_rows) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def _file_stamp(self) -> tuple[int, int]:
        stat = self.path.stat()
        return stat.st_size, stat.st_mtime_ns

    def take(self, index: np.ndarray | Sequence[int]) -> tuple[list[str], list[str]]:
        """The queries and product texts of the training's rows ``index`` (any order, repeats
        allowed), read from the file in one pass.

        Raises:
            ValueError: the file was written again since this was made.
        """
        wanted = self.rows[np.asarray(index, dtype=np.int64)]
        queries = np.empty(len(wanted), dtype=object)
        texts = np.empty(len(wanted), dtype=object)
        if not len(wanted):
            return [], []
        order = np.argsort(wanted, kind="stable")
        ordered = wanted[order]
        # rows are looked up by position: a file written again meanwhile would give other texts
        if self._file_stamp() != self._stamp:
            raise ValueError(
                f"{self.path}: the split changed during training (written again since it was first "
                "read); run the training again."
            )
        file = pq.ParquetFile(self.path)
        start = 0
        for batch in file.iter_batches(batch_size=READ_ROWS, columns=self.columns):
            end = start + batch.num_rows
            lo, hi = np.searchsorted(ordered, (start, end))
            if hi > lo:
                chunk = batch.take(pa.array(ordered[lo:hi] - start)).to_pandas()
                queries[order[lo:hi]] = chunk["query"].astype(str).to_numpy()
                texts[order[lo:hi]] = frame_texts(chunk, self.config)
            if hi == len(ordered):
                break
            start = end
        return queries.tolist(), texts.tolist()
