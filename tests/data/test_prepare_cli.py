"""`esci-reranker prepare` through typer's CliRunner: the sample by default, and a user error."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from esci_reranker.cli import app
from tests.data.conftest import RawFiles

runner = CliRunner()


def test_prepare_sample_is_the_default(tmp_path: Path) -> None:
    result = runner.invoke(app, ["prepare", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "train      97 queries" in result.output
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["all"]["rows"] == 6694
    assert {p.name for p in tmp_path.iterdir()} == {
        "train.parquet",
        "val.parquet",
        "test.parquet",
        "stats.json",
    }


def test_prepare_raw_pair_with_options(raw: RawFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["prepare", "--examples", str(raw.examples), "--products", str(raw.products)]
    args += ["--out", str(out), "--locale", "all", "--small-version", "--text-fields", "title"]
    args += ["--long-field-chars", "100", "--val-frac", "0.5", "--seed", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    options = json.loads((out / "stats.json").read_text())["options"]
    assert options == {
        "locale": "all",
        "small_version": True,
        "text_fields": ["title"],
        "long_field_chars": 100,
        "val_frac": 0.5,
        "seed": 3,
    }


def test_prepare_error_exits_2_with_the_message_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "train.parquet").write_bytes(b"old")
    result = runner.invoke(app, ["prepare", "--sample", "--locale", "jp", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "error: " in result.output
    assert (
        "esci_us_sample.parquet: joined examples file has no rows with product_locale == 'jp'"
        in result.output
    )
    assert "Traceback" not in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["train.parquet"]
    assert (tmp_path / "train.parquet").read_bytes() == b"old"


def test_prepare_rejects_two_inputs(tmp_path: Path) -> None:
    result = runner.invoke(app, ["prepare", "--sample", "--joined", "x.parquet", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--sample cannot be combined" in result.output
