"""The shared file steps: reading a JSON document with an error that names the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from esci_reranker.fsutil import read_json, write_json


class ComponentError(ValueError):
    pass


def test_read_json_reads_what_write_json_wrote(tmp_path: Path):
    path = write_json(tmp_path / "doc.json", {"a": [1, 2], "b": None})
    assert read_json(path) == {"a": [1, 2], "b": None}


def test_read_json_raises_the_callers_error_naming_the_file_and_the_fix(tmp_path: Path):
    path = tmp_path / "doc.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"doc.json: not valid JSON \(Expecting property name"):
        read_json(path)
    with pytest.raises(ComponentError, match=r"doc.json: not valid JSON \(.*\); rewrite it\.$"):
        read_json(path, ComponentError, fix="rewrite it")
