"""Raw ESCI files (or a joined file) -> cleaned, joined train / val / test frames and their stats.

>>> from esci_reranker.data import PrepareOptions, prepare, sample_path, write_splits
>>> result = prepare(joined=sample_path(), options=PrepareOptions(locale="us"))
>>> sorted(result.splits)
['test', 'train', 'val']
>>> paths = write_splits(result, "data/prepared")  # doctest: +SKIP

The steps: read and check the examples, assign splits by ``query_id`` (cheap, so errors come
before the expensive part), read and clean the products the examples use, join on
(product_id, product_locale), build ``product_text``, drop rows whose product text is empty.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from esci_reranker.data.io import (
    PRODUCT_COLUMNS,
    PRODUCT_KEY,
    DataError,
    LoadedTable,
    check_locale,
    load_examples,
    load_joined,
    load_products,
)
from esci_reranker.data.splits import DEFAULT_VAL_FRAC, SPLITS, assign_splits
from esci_reranker.data.text import (
    DEFAULT_LONG_FIELD_CHARS,
    DEFAULT_TEXT_FIELDS,
    FIELD_COLUMNS,
    join_cleaned_fields,
    parse_text_fields,
)
from esci_reranker.labels import ESCI_GAINS, ESCI_LABELS
from esci_reranker.progress import progress_bar
from esci_reranker.version import __version__

#: Columns of every split file, in order, with their Arrow types; optional ones follow when present.
OUTPUT_TYPES: Final[Mapping[str, pa.DataType]] = {
    "query_id": pa.int64(),
    "query": pa.string(),
    "product_id": pa.string(),
    "product_locale": pa.string(),
    "esci_label": pa.string(),
    "gain": pa.float64(),
    **dict.fromkeys(PRODUCT_COLUMNS, pa.string()),
    "product_text": pa.string(),
    "example_id": pa.int64(),
    "small_version": pa.int8(),
    "large_version": pa.int8(),
    "esci_query_source": pa.string(),
}
STATS_FILE_NAME: Final[str] = "stats.json"
#: Rows per parquet row group when writing; also the unit of the write progress bar.
WRITE_CHUNK_ROWS: Final[int] = 200_000


@dataclass(frozen=True)
class PrepareOptions:
    """What ``prepare`` keeps and how it builds text and splits (the CLI options of ``prepare``).

    Attributes:
        locale: ``us``, ``es``, ``jp``, or ``all`` to keep every locale.
        small_version: keep only rows with ``small_version == 1`` (ESCI's reduced Task 1 set).
        text_fields: product fields joined, in order, into ``product_text`` (names of
            ``FIELD_COLUMNS``: title, brand, color, description, bullets).
        long_field_chars: character cap of description and bullets inside ``product_text``.
        val_frac: share of ESCI ``train`` queries moved to ``val``, in (0, 1). Unused when the
            input's split column holds train/dev/holdout (``dev`` is then ``val``).
        seed: seed of the ``val`` query draw.

    Raises:
        DataError: on construction, if an option is out of range (message names the option).
    """

    locale: str = "us"
    small_version: bool = False
    text_fields: tuple[str, ...] = DEFAULT_TEXT_FIELDS
    long_field_chars: int = DEFAULT_LONG_FIELD_CHARS
    val_frac: float = DEFAULT_VAL_FRAC
    seed: int = 0

    def __post_init__(self) -> None:
        check_locale(self.locale)
        try:
            fields = parse_text_fields(self.text_fields)
        except ValueError as error:
            raise DataError(str(error)) from None
        object.__setattr__(self, "text_fields", fields)
        if isinstance(self.long_field_chars, bool) or not (
            isinstance(self.long_field_chars, int) and self.long_field_chars > 0
        ):
            raise DataError(f"--long-field-chars must be a positive integer, got {self.long_field_chars!r}.")
        if not (isinstance(self.val_frac, int | float) and 0.0 < self.val_frac < 1.0):
            raise DataError(f"--val-frac must be a fraction strictly between 0 and 1, got {self.val_frac!r}.")
        if isinstance(self.seed, bool) or not (isinstance(self.seed, int) and self.seed >= 0):
            raise DataError(f"--seed must be a non-negative integer, got {self.seed!r}.")


@dataclass(frozen=True, eq=False)
class PrepareResult:
    """The prepared splits and their statistics.

    Attributes:
        splits: ``{"train": frame, "val": frame, "test": frame}``; the columns of each are in
            ``OUTPUT_TYPES`` order (optional ones only when the input has them); string columns
            are object columns of ``str``; rows are sorted by ``query_id`` (stable).
        stats: what ``stats.json`` holds: input files, options, split scheme, dropped rows by
            reason, and per split the number of queries, rows and rows per label.
    """

    splits: dict[str, pd.DataFrame]
    stats: dict[str, Any]

    @property
    def train(self) -> pd.DataFrame:
        return self.splits["train"]

    @property
    def val(self) -> pd.DataFrame:
        return self.splits["val"]

    @property
    def test(self) -> pd.DataFrame:
        return self.splits["test"]


def prepare(
    examples: str | Path | None = None,
    products: str | Path | None = None,
    *,
    joined: str | Path | None = None,
    options: PrepareOptions | None = None,
    progress: bool | None = False,
) -> PrepareResult:
    """Prepare train / val / test from Amazon's ``examples`` + ``products`` files or a ``joined`` file.

    Give either both raw files or ``joined`` (e.g. ``sample_path()``). ``progress=None`` shows
    progress bars on a terminal only. Nothing is written; see ``write_splits``.

    Raises:
        DataError: any problem with the inputs or options; the message names the file and the fix.
    """
    options = options or PrepareOptions()
    if joined is not None and examples is None and products is None:
        loaded = load_joined(
            joined, locale=options.locale, small_version=options.small_version, progress=progress
        )
        frame, scheme = _with_splits(loaded, options)
        frame = _with_product_text(frame, options)
        inputs = {"joined": str(loaded.path.resolve())}
        rows_in_files = {"joined": loaded.rows_in_file}
    elif joined is None and examples is not None and products is not None:
        loaded = load_examples(examples, locale=options.locale, small_version=options.small_version)
        frame, scheme = _with_splits(loaded, options)
        catalog = load_products(
            products,
            locale=options.locale,
            product_ids=frame["product_id"].unique(),
            progress=progress,
        )
        # Text is built once per product, before the join copies it to every example row.
        catalog = replace(catalog, frame=_with_product_text(catalog.frame, options))
        frame = _join_products(frame, catalog)
        inputs = {"examples": str(loaded.path.resolve()), "products": str(catalog.path.resolve())}
        rows_in_files = {"examples": loaded.rows_in_file, "products": catalog.rows_in_file}
    else:
        raise DataError(
            "give both the examples and the products file (--examples and --products), "
            "or one joined file (--joined / --sample), not both."
        )

    empty = frame["product_text"].to_numpy() == ""
    frame = frame.loc[~empty]
    frame = frame.assign(gain=frame["esci_label"].map(ESCI_GAINS).astype("float64"))

    splits = {name: _output_frame(frame[frame["split"] == name]) for name in SPLITS}
    stats = {
        "esci_reranker_version": __version__,
        "inputs": inputs,
        "rows_in_files": rows_in_files,
        "options": {**asdict(options), "text_fields": list(options.text_fields)},
        "split_scheme": scheme,
        "dropped": {**loaded.dropped, "empty_product_text": int(empty.sum())},
        "all": _split_stats(frame),
        "splits": {name: _split_stats(split) for name, split in splits.items()},
    }
    return PrepareResult(splits=splits, stats=stats)


def write_splits(
    result: PrepareResult, out_dir: str | Path, *, progress: bool | None = False
) -> dict[str, Path]:
    """Write ``train.parquet``, ``val.parquet``, ``test.parquet`` and ``stats.json`` into ``out_dir``.

    Every file is first written to a temporary name in ``out_dir``; only when all four are
    complete are they renamed into place (``os.replace``). If anything fails, the temporary files
    are removed and earlier outputs in ``out_dir`` are left as they were. Returns the paths by
    name (``train``, ``val``, ``test``, ``stats``).
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    final = {name: out_dir / f"{name}.parquet" for name in result.splits}
    final["stats"] = out_dir / STATS_FILE_NAME
    temporary: dict[str, Path] = {}
    try:
        for name, frame in result.splits.items():
            temporary[name] = _temporary_path(final[name])
            _write_parquet(frame, temporary[name], progress=progress, desc=f"write {name}")
        temporary["stats"] = _temporary_path(final["stats"])
        temporary["stats"].write_text(json.dumps(result.stats, indent=2) + "\n", encoding="utf-8")
        for name, path in temporary.items():
            os.replace(path, final[name])
    except BaseException:
        for path in temporary.values():
            path.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):  # not empty: leave it
                out_dir.rmdir()
        raise
    return final


def _with_splits(loaded: LoadedTable, options: PrepareOptions) -> tuple[pd.DataFrame, str]:
    frame = loaded.frame
    frame["split"], scheme = assign_splits(
        frame["query_id"],
        frame["split"],
        val_frac=options.val_frac,
        seed=options.seed,
        where=str(loaded.path),
    )
    return frame, scheme


def _with_product_text(frame: pd.DataFrame, options: PrepareOptions) -> pd.DataFrame:
    """Add ``product_text`` built from the (already cleaned) ``product_*`` columns."""
    cleaned = {f: frame[FIELD_COLUMNS[f]].to_numpy() for f in options.text_fields}
    texts = join_cleaned_fields(cleaned, options.text_fields, options.long_field_chars)
    frame["product_text"] = pd.Series(texts, index=frame.index, dtype=object)
    return frame


def _join_products(frame: pd.DataFrame, catalog: LoadedTable) -> pd.DataFrame:
    """Attach the cleaned product columns to every example row; every example needs its product."""
    products = catalog.frame
    key = list(PRODUCT_KEY)
    rows = pd.MultiIndex.from_frame(products[key]).get_indexer(pd.MultiIndex.from_frame(frame[key]))
    missing = rows < 0
    if missing.any():
        keys = frame.loc[missing, key].drop_duplicates()
        shown = ", ".join(f"({pid!r}, {loc!r})" for pid, loc in keys.head(5).itertuples(index=False))
        raise DataError(
            f"{catalog.path}: no product row for {int(missing.sum())} example row(s) "
            f"({len(keys)} distinct (product_id, product_locale) key(s), e.g. {shown}); the "
            "products file must hold every product the examples name (it has locale(s) "
            f"{', '.join(catalog.locales)})."
        )
    for column in (*PRODUCT_COLUMNS, "product_text"):
        # Fancy indexing an object array copies pointers only: a product's strings are shared by
        # every query it is a candidate for.
        values = products[column].to_numpy()[rows]
        frame[column] = pd.Series(values, index=frame.index, dtype=object)
    return frame


def _output_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Select and order the output columns; plain ``str`` (object) columns instead of categoricals."""
    frame = frame.sort_values("query_id", kind="stable")
    columns = [c for c in OUTPUT_TYPES if c in frame.columns]
    out = {}
    for column in columns:
        values = frame[column]
        if pa.types.is_string(OUTPUT_TYPES[column]):
            values = values.astype(object)
        out[column] = values.to_numpy()
    # Build from numpy arrays with explicit object dtype so pandas >= 3 keeps the shared strings.
    return pd.DataFrame(
        {c: pd.Series(v, dtype=v.dtype) for c, v in out.items()}, index=pd.RangeIndex(len(frame))
    )


def _split_stats(frame: pd.DataFrame) -> dict[str, Any]:
    labels = frame["esci_label"].value_counts()
    return {
        "queries": int(frame["query_id"].nunique()),
        "rows": len(frame),
        "labels": {label: int(labels.get(label, 0)) for label in ESCI_LABELS},
    }


def _temporary_path(final: Path) -> Path:
    # Same folder as the final file, so os.replace is an atomic rename on the same filesystem.
    # Not mkstemp: its 0600 mode would carry over to the outputs.
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")


def _write_parquet(frame: pd.DataFrame, path: Path, *, progress: bool | None, desc: str) -> None:
    schema = pa.schema([(c, OUTPUT_TYPES[c]) for c in frame.columns])
    n_chunks = max(1, math.ceil(len(frame) / WRITE_CHUNK_ROWS))
    disable = None if progress is None else not progress
    # Chunks bound the Arrow copy of the text to one row group at a time.
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in progress_bar(
            range(0, n_chunks * WRITE_CHUNK_ROWS, WRITE_CHUNK_ROWS), desc=desc, disable=disable
        ):
            chunk = frame.iloc[start : start + WRITE_CHUNK_ROWS]
            arrays = [_arrow_column(chunk[f.name], f.type, path) for f in schema]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))


def _arrow_column(values: pd.Series, type_: pa.DataType, path: Path) -> pa.Array:
    try:
        if pa.types.is_string(type_):
            # Encode non-ASCII text to bytes here: when pyarrow encodes a str itself, CPython
            # keeps that UTF-8 copy inside the str for its whole life, which more than doubles
            # the memory of the Spanish and Japanese text still held by the result.
            encoded = [
                v if type(v) is str and v.isascii() else _utf8(v) for v in values.to_numpy(dtype=object)
            ]
            return pa.array(encoded, type=pa.binary()).cast(pa.string())
        return pa.array(values.to_numpy(), type=type_)
    except (AttributeError, TypeError, ValueError, pa.ArrowException) as error:
        raise DataError(
            f"{path}: column {values.name!r} cannot be written as {type_} ({error}); expected "
            "the values prepare() produced."
        ) from error


def _utf8(value: object) -> bytes | None:
    if isinstance(value, str):
        return value.encode()
    if value is None or value != value:  # a missing optional value (e.g. esci_query_source)
        return None
    raise TypeError(f"expected str, got {type(value).__name__} {value!r}")
