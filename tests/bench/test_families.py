"""`bench-families`: every family through Reranker on the same pairs, table and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from esci_reranker.model import save_checkpoint
from tests.cli.helpers import assert_fails, run
from tests.conftest import build_tiny_model


def test_bench_families_measures_each_model_on_the_same_pairs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model, tokenizer = build_tiny_model("esci-listwise")
    listwise = save_checkpoint(model, tokenizer, tmp_path / "listwise")
    out = tmp_path / "families.json"
    result = run(
        "bench-families", "--model", tiny_checkpoint, "--model", listwise, "--out", out,
        "--pairs", 24, "--repeats", 1, "--requests", 2, "--request-size", 12, "--precision", "fp32",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["pairs"] == 24
    assert data["request_size"] == 12
    assert data["precision"] == "fp32"
    rows = data["models"]
    assert [rows[str(p)]["model_type"] for p in (tiny_checkpoint, listwise)] == [
        "esci-multitask",
        "esci-listwise",
    ]
    for row in rows.values():
        assert row["pairs_per_s_best"] >= row["pairs_per_s_median"] > 0
        assert row["request_ms_p90"] >= row["request_ms_p50"] > 0
    assert "esci-listwise" in result.output


def test_bench_families_names_a_missing_model(tmp_path: Path) -> None:
    assert_fails(run("bench-families", "--model", tmp_path / "nope"), "nope", "no such checkpoint folder")
