"""Reading the ESCI parquet files: column checks, locale / small-version filters, compact dtypes.

Three file shapes are read:

- the raw **examples** file as Amazon publishes it (``shopping_queries_dataset_examples.parquet``);
- the raw **products** file (``shopping_queries_dataset_products.parquet``);
- a **joined** file: example columns and the five ``product_*`` columns on every row (the shape
  of the bundled sample, whose ``split`` holds ``train`` / ``dev`` / ``holdout``).

Files are scanned in record batches and only the needed columns are read, so the full dataset
(2.6M example rows, 1.8M products with long descriptions) never sits in memory twice. Product text
is cleaned batch by batch while it is read, which is why the raw HTML text is never kept.
Every problem raises ``DataError`` naming the file, what is wrong and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esci_reranker.data.text import FIELD_COLUMNS, clean_column
from esci_reranker.labels import check_labels
from esci_reranker.progress import progress_bar

#: The file names Amazon publishes (``amazon-science/esci-data``, ``shopping_queries_dataset/``).
EXAMPLES_FILE_NAME: Final[str] = "shopping_queries_dataset_examples.parquet"
PRODUCTS_FILE_NAME: Final[str] = "shopping_queries_dataset_products.parquet"

LOCALES: Final[tuple[str, ...]] = ("us", "es", "jp")
ALL_LOCALES: Final[str] = "all"

#: The join key of examples and products: an ASIN can carry different text in each locale.
PRODUCT_KEY: Final[tuple[str, str]] = ("product_id", "product_locale")
#: The five product text columns, in the order of the published products file.
PRODUCT_COLUMNS: Final[tuple[str, ...]] = tuple(
    FIELD_COLUMNS[f] for f in ("title", "description", "bullets", "brand", "color")
)
#: Example columns every input must have (the joined sample has these too).
EXAMPLE_COLUMNS: Final[tuple[str, ...]] = (
    "query_id",
    "query",
    "product_id",
    "product_locale",
    "esci_label",
    "split",
)
#: Example columns carried to the outputs when the input has them.
OPTIONAL_EXAMPLE_COLUMNS: Final[tuple[str, ...]] = (
    "example_id",
    "small_version",
    "large_version",
    "esci_query_source",
)
PRODUCTS_COLUMNS: Final[tuple[str, ...]] = (*PRODUCT_KEY, *PRODUCT_COLUMNS)
JOINED_COLUMNS: Final[tuple[str, ...]] = (*EXAMPLE_COLUMNS, *PRODUCT_COLUMNS)

#: Few distinct values over millions of rows: held as pandas categoricals.
_CATEGORICAL: Final[frozenset[str]] = frozenset(
    {"query", "product_locale", "esci_label", "split", "esci_query_source"}
)
_INT8: Final[frozenset[str]] = frozenset({"small_version", "large_version"})
#: Rows per record batch; bounds the raw (uncleaned) text held at any one time.
BATCH_ROWS: Final[int] = 100_000
#: Read buffer per column when streaming a parquet file.
READ_BUFFER_BYTES: Final[int] = 4 * 2**20


class DataError(ValueError):
    """An input file or option is not usable; the message names the file, the problem and the fix."""


@dataclass(frozen=True, eq=False)
class LoadedTable:
    """A file read into a frame, with how many rows it had and how many were filtered out, by reason."""

    path: Path
    frame: pd.DataFrame
    rows_in_file: int
    dropped: dict[str, int] = field(default_factory=dict)
    #: The locales found in the file, before any filter (for error messages).
    locales: tuple[str, ...] = ()


def check_locale(locale: str) -> str:
    """Return ``locale`` if it is ``us``, ``es``, ``jp`` or ``all``; raise ``DataError`` otherwise."""
    if locale not in (*LOCALES, ALL_LOCALES):
        raise DataError(
            f"locale {locale!r} is not an ESCI locale; expected one of {', '.join((*LOCALES, ALL_LOCALES))}."
        )
    return locale


def load_examples(path: str | Path, *, locale: str = "us", small_version: bool = False) -> LoadedTable:
    """Read a raw ESCI examples file: the needed columns, filtered to ``locale`` (or ``"all"``).

    With ``small_version`` only rows with ``small_version == 1`` are kept (the Task 1 set).
    Labels are checked. ``query``, ``product_locale``, ``esci_label`` and ``split`` come back as
    categoricals, the version flags as int8.

    Raises:
        DataError: the file is missing or unreadable, lacks a column, is empty, has no row for
            ``locale``, lacks ``small_version`` when it is asked for, or holds an unknown label.
    """
    return _load(
        path,
        "ESCI examples file",
        f"Amazon's {EXAMPLES_FILE_NAME}",
        EXAMPLE_COLUMNS,
        OPTIONAL_EXAMPLE_COLUMNS,
        locale=locale,
        small_version=small_version,
    )


def load_joined(
    path: str | Path,
    *,
    locale: str = "us",
    small_version: bool = False,
    progress: bool | None = False,
) -> LoadedTable:
    """Read a joined file (example columns plus the five ``product_*`` columns on every row).

    Same filters and checks as ``load_examples``; the product columns are cleaned with
    ``clean_text`` as they are read and come back as object columns of ``str``.
    """
    return _load(
        path,
        "joined examples file",
        "a joined ESCI file such as the bundled sample",
        JOINED_COLUMNS,
        OPTIONAL_EXAMPLE_COLUMNS,
        locale=locale,
        small_version=small_version,
        progress=progress,
    )


def load_products(
    path: str | Path,
    *,
    locale: str = "us",
    product_ids: Sequence[str] | np.ndarray | None = None,
    progress: bool | None = False,
) -> LoadedTable:
    """Read a raw ESCI products file, keeping ``locale`` (or ``"all"``) and, if given, ``product_ids``.

    Passing the ids the examples use skips the text of products no example needs (most of them
    with ``--small-version``). The five ``product_*`` columns are cleaned with ``clean_text`` as
    they are read, batch by batch, so the raw text is never held whole. Unlike the example
    readers, no rows left after the filters is not an error here: the join reports which
    examples lack a product.

    Raises:
        DataError: the file is missing or unreadable, lacks a column, is empty, or holds the same
            (product_id, product_locale) twice.
    """
    loaded = _load(
        path,
        "ESCI products file",
        f"Amazon's {PRODUCTS_FILE_NAME}",
        PRODUCTS_COLUMNS,
        locale=locale,
        keep=None if product_ids is None else _id_filter(product_ids),
        progress=progress,
    )
    duplicated = loaded.frame.duplicated(list(PRODUCT_KEY))
    if duplicated.any():
        first = loaded.frame.loc[duplicated, list(PRODUCT_KEY)].iloc[0]
        raise DataError(
            f"{loaded.path}: {int(duplicated.sum())} product row(s) repeat a (product_id, "
            f"product_locale) key, e.g. ({first.iloc[0]!r}, {first.iloc[1]!r}); expected one row "
            "per product and locale, as in Amazon's products file."
        )
    return loaded


def _load(
    path: str | Path,
    what: str,
    expected: str,
    required: Sequence[str],
    optional: Sequence[str] = (),
    *,
    locale: str,
    small_version: bool = False,
    keep: Callable[[pa.Array], pa.Array] | None = None,
    progress: bool | None = False,
) -> LoadedTable:
    """Scan ``path`` batch by batch: filter rows, clean product text, return a compact frame.

    ``keep`` maps a batch's ``product_id`` column to a mask of the rows to keep (after the locale
    and small-version filters, which are counted in ``dropped``; ``keep`` is not).
    """
    path = Path(path)
    check_locale(locale)
    parquet = _open(path, what, expected)
    schema = parquet.schema_arrow
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise DataError(
            f"{path}: {what} is missing column(s) {missing}; expected the columns "
            f"{list(required)} ({expected}). Columns found: {schema.names}."
        )
    for column in ("query_id", "example_id"):
        if column in schema.names and not pa.types.is_integer(schema.field(column).type):
            raise DataError(
                f"{path}: column {column!r} of {what} has type {schema.field(column).type}; "
                "expected integers, as in Amazon's files."
            )
    if small_version and "small_version" not in schema.names:
        raise DataError(
            f"{path}: --small-version keeps rows with small_version == 1, but {what} has no "
            "'small_version' column (the bundled sample has none); drop --small-version or use "
            f"Amazon's {EXAMPLES_FILE_NAME}."
        )
    rows_in_file = parquet.metadata.num_rows
    if rows_in_file == 0:
        raise DataError(f"{path}: {what} is empty (0 rows); expected {expected} with rows.")

    columns = [*required, *(c for c in optional if c in schema.names)]
    text_columns = [c for c in PRODUCT_COLUMNS if c in columns]
    dropped = {"other_locale": 0, **({"not_small_version": 0} if small_version else {})}
    locales_seen: set[str] = set()
    kept: list[pa.RecordBatch] = []
    text: dict[str, list[np.ndarray]] = {c: [] for c in text_columns}
    for batch in _batches(parquet, columns, path=path, what=what, progress=progress):
        _check_no_nulls(batch, required, path, what)
        locales_seen.update(pc.unique(batch["product_locale"]).to_pylist())
        if locale != ALL_LOCALES:
            batch, dropped["other_locale"] = _filter(
                batch, pc.equal(batch["product_locale"], locale), dropped["other_locale"]
            )
        if small_version:
            batch, dropped["not_small_version"] = _filter(
                batch, pc.equal(batch["small_version"], 1), dropped["not_small_version"]
            )
        if keep is not None:
            batch, _ = _filter(batch, keep(batch["product_id"]), 0)
        if batch.num_rows == 0:
            continue
        # Clean product text now, one batch at a time, and keep only the cleaned strings.
        for column, parts in text.items():
            parts.append(clean_column(batch[column].to_numpy(zero_copy_only=False)))
        kept.append(batch.drop_columns(text_columns))

    if not kept and keep is None:
        where = f"product_locale == {locale!r}"
        if small_version:
            where += " and small_version == 1"
        raise DataError(
            f"{path}: {what} has no rows with {where}; the file has locale(s) "
            f"{', '.join(sorted(locales_seen))}. Use --locale with one of them "
            f"or --locale {ALL_LOCALES}."
        )
    rest = [c for c in columns if c not in text]
    table = pa.Table.from_batches(kept) if kept else schema.empty_table().select(rest)
    frame = table.to_pandas()
    for column, parts in text.items():
        # dtype=object keeps the cleaned strings shared (pandas >= 3 would copy them into Arrow).
        values = np.concatenate(parts) if parts else np.empty(0, dtype=object)
        frame[column] = pd.Series(values, index=frame.index, dtype=object)
    frame = _compact(frame)
    if "esci_label" in frame.columns:
        try:
            check_labels(frame["esci_label"].unique(), f"{path}: {what}")
        except ValueError as error:
            raise DataError(str(error)) from None
    return LoadedTable(
        path=path,
        frame=frame,
        rows_in_file=rows_in_file,
        dropped=dropped,
        locales=tuple(sorted(locales_seen)),
    )


def _id_filter(product_ids: Sequence[str] | np.ndarray) -> Callable[[pa.Array], pa.Array]:
    """A batch filter keeping ``product_ids``.

    The ids are hashed once into an Index; ``pc.is_in`` would rebuild its hash set every batch.
    """
    wanted = pd.Index(pd.unique(np.asarray(product_ids, dtype=object)), dtype=object)
    return lambda ids: pa.array(wanted.get_indexer(ids.to_numpy(zero_copy_only=False)) >= 0)


def _open(path: Path, what: str, expected: str) -> pq.ParquetFile:
    if not path.is_file():
        kind = "is a directory, not a file" if path.is_dir() else "not found"
        raise DataError(f"{path}: {what} {kind}; expected {expected}.")
    try:
        # No pre-buffering: it would load a whole row group (over a GiB of product text in a
        # file written with pyarrow's defaults) before the first batch; stream it instead.
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: cannot read {what} as parquet ({error}); expected {expected}.") from None


def _batches(
    parquet: pq.ParquetFile,
    columns: Sequence[str],
    *,
    path: Path,
    what: str,
    progress: bool | None,
) -> Iterator[pa.RecordBatch]:
    # progress=None lets tqdm decide (shown on a terminal only).
    disable = None if progress is None else not progress
    total = parquet.metadata.num_rows
    with progress_bar(total=total, desc=f"read {path.name}", unit="row", disable=disable) as bar:
        try:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=list(columns)):
                yield batch
                bar.update(batch.num_rows)
        except (pa.ArrowException, OSError) as error:
            # A damaged page shows only when it is decoded, after the footer read fine.
            raise DataError(f"{path}: {what} is damaged, reading it failed: {error}") from None


def _filter(batch: pa.RecordBatch, mask: pa.Array, dropped: int) -> tuple[pa.RecordBatch, int]:
    """Keep the rows where ``mask`` is true (null counts as false); add the rest to ``dropped``."""
    mask = pc.fill_null(mask, False)
    kept = batch.filter(mask)
    return kept, dropped + batch.num_rows - kept.num_rows


def _check_no_nulls(batch: pa.RecordBatch, required: Sequence[str], path: Path, what: str) -> None:
    # Missing product text is normal (it becomes ""); a missing key, query or label is not.
    for column in required:
        if column not in PRODUCT_COLUMNS and batch[column].null_count:
            raise DataError(
                f"{path}: column {column!r} of {what} has null value(s); expected a value in every row."
            )


def _compact(frame: pd.DataFrame) -> pd.DataFrame:
    """Categoricals for repetitive strings, small ints for flags, int64 ids."""
    for column in frame.columns:
        if column in _CATEGORICAL:
            frame[column] = frame[column].astype("category")
        elif column in _INT8:
            frame[column] = frame[column].astype("int8")
        elif column in {"query_id", "example_id"}:
            frame[column] = frame[column].astype("int64")
    return frame
