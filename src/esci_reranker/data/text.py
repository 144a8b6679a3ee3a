"""Product text: which catalogue fields make the text a model reads, and how they are cleaned.

The same functions build the text at data-preparation time (vectorised over a DataFrame) and at
inference time (one candidate dict at a time), so a model always sees text built exactly as in
training. The field list and the character cap travel inside each checkpoint's ``config.json``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import numpy as np
import pandas as pd

#: Short field name (used in configs and on the CLI) -> column of the ESCI products table.
FIELD_COLUMNS: Final[Mapping[str, str]] = {
    "title": "product_title",
    "brand": "product_brand",
    "color": "product_color",
    "description": "product_description",
    "bullets": "product_bullet_point",
}
DEFAULT_TEXT_FIELDS: Final[tuple[str, ...]] = ("title", "brand", "color")
#: Fields that can run to thousands of characters and are capped at ``long_field_chars``.
LONG_FIELDS: Final[frozenset[str]] = frozenset({"description", "bullets"})
DEFAULT_LONG_FIELD_CHARS: Final[int] = 500
#: Between two fields. Plain punctuation: the WordPiece vocabularies of BERT-style models know it.
FIELD_SEPARATOR: Final[str] = " | "

_TAG = re.compile(r"<[^>]{0,200}>")
_NULL_STRINGS: Final[frozenset[str]] = frozenset({"nan", "none", "null"})


def parse_text_fields(spec: str | Iterable[str]) -> tuple[str, ...]:
    """Parse ``"title,brand,color"`` (or a list of names) into a validated tuple of field names.

    Raises:
        ValueError: a name is not one of ``FIELD_COLUMNS``, a name repeats, or the list is empty.
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"text fields: expected at least one of {list(FIELD_COLUMNS)}, got none.")
    unknown = [n for n in names if n not in FIELD_COLUMNS]
    if unknown:
        raise ValueError(
            f"text fields: unknown field(s) {unknown}; expected names from {list(FIELD_COLUMNS)}."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"text fields: {names} names a field twice.")
    return tuple(names)


def clean_text(value: object) -> str:
    """Strip HTML tags and entities, fold whitespace; ``None``/NaN/"nan"/"null" become ``""``."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    text = str(value)
    # Only a short or space-padded string can be a null marker: skip copying long text to test it.
    maybe_null = len(text) <= 4 or text[0].isspace() or text[-1].isspace()
    if maybe_null and text.strip().lower() in _NULL_STRINGS:
        return ""
    # Entities first, then tags: "&lt;br&gt;" becomes "<br>" and is removed in the same pass, so
    # cleaning already-cleaned text (prepared columns rebuilt into text at train/eval time)
    # changes nothing.
    if "&" in text:
        text = html.unescape(text)
    if "<" in text:
        text = _TAG.sub(" ", text)
    # str.split() splits on exactly the characters a Unicode regex \s matches (str.isspace) and
    # drops the ends, like re.sub(r"\s+", " ", text).strip(), at a fifth of the cost.
    return " ".join(text.split())


def _cap(text: str, field: str, long_field_chars: int) -> str:
    if field in LONG_FIELDS and len(text) > long_field_chars:
        # Cut at a word boundary so the tokenizer does not see a half word.
        cut = text[:long_field_chars]
        space = cut.rfind(" ")
        return cut[:space] if space > long_field_chars // 2 else cut
    return text


def product_text(
    record: Mapping[str, object],
    fields: Sequence[str] = DEFAULT_TEXT_FIELDS,
    long_field_chars: int = DEFAULT_LONG_FIELD_CHARS,
) -> str:
    """Build the text of one product from a mapping of its fields.

    Keys may be the short names (``title``, ``brand``, ...) or the ESCI column names
    (``product_title``, ...). A ready ``text`` key is used as is (cleaned) when none of the
    fields is present. Empty fields are skipped; the rest are joined with ``FIELD_SEPARATOR``.
    """
    parts = []
    for field in fields:
        raw = record.get(field, record.get(FIELD_COLUMNS[field]))
        value = _cap(clean_text(raw), field, long_field_chars)
        if value:
            parts.append(value)
    if not parts and "text" in record:
        return clean_text(record["text"])
    return FIELD_SEPARATOR.join(parts)


def clean_column(values: object) -> np.ndarray:
    """``clean_text`` over a column (Series, array or list), computed once per distinct value.

    Returns an object array of ``str``. Brands, colours and product descriptions repeat a lot
    (and a product repeats across queries), so cleaning each distinct value once is much cheaper
    than cleaning every cell; equal inputs share one output string, which keeps memory low.
    """
    codes, uniques = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=True)
    # One slot more than the uniques: the sentinel code -1 (None/NaN) picks that last "" slot.
    cleaned = np.empty(len(uniques) + 1, dtype=object)
    cleaned[:-1] = [clean_text(u) for u in uniques]
    cleaned[-1] = ""
    return cleaned[codes]


def join_cleaned_fields(
    cleaned: Mapping[str, Sequence[str] | np.ndarray],
    fields: Sequence[str] = DEFAULT_TEXT_FIELDS,
    long_field_chars: int = DEFAULT_LONG_FIELD_CHARS,
    length: int | None = None,
) -> np.ndarray:
    """Build product texts, row by row, from fields that are already cleaned with ``clean_text``.

    ``cleaned`` maps a short field name to its cleaned values; fields in ``fields`` but not in
    ``cleaned`` count as empty. Long fields are capped, empty fields skipped, the rest joined with
    ``FIELD_SEPARATOR``, exactly as ``product_text`` does for one record. ``length`` is the row
    count, needed only when none of ``fields`` is in ``cleaned``. Returns an object array of ``str``.
    """
    columns = []
    for field in fields:
        if field not in cleaned:
            continue
        values = cleaned[field]
        if field in LONG_FIELDS:
            values = [_cap(v, field, long_field_chars) for v in values]
        columns.append(values)
    if not columns:
        if length is None:
            raise ValueError("join_cleaned_fields: no field to join and no length given.")
        return np.full(length, "", dtype=object)
    texts = np.empty(len(columns[0]), dtype=object)
    texts[:] = [FIELD_SEPARATOR.join(v for v in row if v) for row in zip(*columns, strict=True)]
    return texts


def product_texts(
    frame: pd.DataFrame,
    fields: Sequence[str] = DEFAULT_TEXT_FIELDS,
    long_field_chars: int = DEFAULT_LONG_FIELD_CHARS,
) -> pd.Series:
    """Vectorised ``product_text`` over a frame with ESCI product columns (missing ones count as empty).

    Raises:
        ValueError: ``fields`` names a field that is not one of ``FIELD_COLUMNS`` (see ``parse_text_fields``).
    """
    fields = parse_text_fields(fields)
    cleaned = {
        field: clean_column(frame[FIELD_COLUMNS[field]])
        for field in fields
        if FIELD_COLUMNS[field] in frame.columns
    }
    texts = join_cleaned_fields(cleaned, fields, long_field_chars, length=len(frame))
    return pd.Series(texts, index=frame.index, dtype=object)
