"""Crash-safe file-system steps shared by checkpoints, training state and data outputs."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def _old_name(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.old")


def replace_dir(src: Path, dst: Path) -> None:
    """Move the complete folder ``src`` to ``dst``, replacing what was there.

    ``os.replace`` cannot overwrite a non-empty folder, so the old one is first moved aside to
    ``.NAME.old``; ``recover_dir`` puts it back if a kill lands between the two renames. At no
    moment is ``dst`` half-written.
    """
    old = _old_name(dst)
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(dst: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dst``; when the block ends it replaces ``dst``.

    Everything written in the block appears at ``dst`` at once (``replace_dir``); if the block
    or the swap fails, the temporary folder is removed and ``dst`` is left as it was.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(dst: Path) -> bool:
    """If ``dst`` is missing but a previous version was left aside by ``replace_dir``, restore it."""
    old = _old_name(dst)
    if not dst.exists() and old.is_dir():
        os.replace(old, dst)
        return True
    return False


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def read_json(path: str | Path, error: type[Exception] = ValueError, fix: str = "") -> Any:
    """The JSON document in ``path``.

    Raises:
        error: the text is not JSON; the message names the file and the parser's complaint, then
            ``fix`` (what to do about it) when one is given.
    """
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        advice = f"; {fix}" if fix else ""
        raise error(f"{path}: not valid JSON ({err}){advice}.") from None


def write_json(path: str | Path, data: Any, *, nan_as_null: bool = False) -> Path:
    """Write ``data`` as indented JSON (numpy values and paths converted), atomically via a temp file.

    With ``nan_as_null``, non-finite floats (a metric a run did not measure) are written as
    ``null``: strict JSON, which jq and other parsers read (Python's ``NaN`` is not JSON).
    ``nulls_to_nan`` turns them back for code that computes with them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if nan_as_null:
        data = _finite(data)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(
        json.dumps(data, indent=2, default=_json_default, allow_nan=not nan_as_null) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path)
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    return value


def nulls_to_nan(value: Any) -> Any:
    """``value`` (read from JSON) with every ``null`` as NaN: the inverse of ``write_json``'s
    ``nan_as_null`` for records whose leaves are all numbers (CV runs and entries)."""
    if isinstance(value, dict):
        return {k: nulls_to_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nulls_to_nan(v) for v in value]
    return float("nan") if value is None else value
