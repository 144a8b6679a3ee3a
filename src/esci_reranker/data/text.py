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
_SPACE = re.compile(r"\s+")
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
    if text.strip().lower() in _NULL_STRINGS:
        return ""
    if "<" in text:
        text = _TAG.sub(" ", text)
    if "&" in text:
        text = html.unescape(text)
    return _SPACE.sub(" ", text).strip()


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


def product_texts(
    frame: pd.DataFrame,
    fields: Sequence[str] = DEFAULT_TEXT_FIELDS,
    long_field_chars: int = DEFAULT_LONG_FIELD_CHARS,
) -> pd.Series:
    """Vectorised ``product_text`` over a frame with ESCI product columns (missing ones count as empty)."""
    columns = []
    for field in fields:
        column = FIELD_COLUMNS[field]
        if column in frame.columns:
            cleaned = frame[column].map(clean_text)
            if field in LONG_FIELDS:
                cleaned = cleaned.map(lambda s, f=field: _cap(s, f, long_field_chars))
            columns.append(cleaned)
    if not columns:
        return pd.Series([""] * len(frame), index=frame.index, dtype=object)
    joined = pd.concat(columns, axis=1).to_numpy()
    return pd.Series(
        [FIELD_SEPARATOR.join(v for v in row if v) for row in joined], index=frame.index, dtype=object
    )
