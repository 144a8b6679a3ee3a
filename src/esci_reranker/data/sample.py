"""The bundled sample: 6,694 real ESCI rows (151 US queries), see ``sample/README.md``."""

from __future__ import annotations

from pathlib import Path
from typing import Final

_SAMPLE_DIR: Final[Path] = Path(__file__).resolve().parent / "sample"
SAMPLE_FILE_NAME: Final[str] = "esci_us_sample.parquet"
HOLDOUT_IDS_FILE_NAME: Final[str] = "holdout_query_ids.txt"


def sample_path() -> Path:
    """Path of the bundled joined sample parquet (split column: train / dev / holdout)."""
    return _SAMPLE_DIR / SAMPLE_FILE_NAME


def sample_holdout_query_ids() -> frozenset[int]:
    """The ``query_id``s of the sample's ``holdout`` split (the ``test`` split once prepared)."""
    text = (_SAMPLE_DIR / HOLDOUT_IDS_FILE_NAME).read_text(encoding="utf-8")
    return frozenset(int(line) for line in text.split())
