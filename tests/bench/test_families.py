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


def test_each_model_is_benchmarked_on_its_own_product_text(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    # A model trained on bullets and description must pay for their tokens in the benchmark;
    # scoring it on the default title+brand+colour text would understate its cost.
    from esci_reranker.bench.families import run_family_bench
    from esci_reranker.reranker import Reranker

    model, tokenizer = build_tiny_model(text_fields=("title", "bullets", "description"))
    long_text = save_checkpoint(model, tokenizer, tmp_path / "long-text")
    seen: dict[tuple[str, ...], list[str]] = {}
    real = Reranker.predict_texts

    def spy(self, queries, texts, *args, **kwargs):
        seen.setdefault(tuple(self.config.text_fields), []).extend(texts)
        return real(self, queries, texts, *args, **kwargs)

    monkeypatch.setattr(Reranker, "predict_texts", spy)
    result = run_family_bench(
        [tiny_checkpoint, long_text], pairs=16, repeats=1, requests=1, request_size=8, precision="fp32"
    )
    assert result["models"][str(long_text)]["text_fields"] == ["title", "bullets", "description"]
    short, long = seen[("title", "brand", "color")], seen[("title", "bullets", "description")]
    assert len(short) == len(long)  # the same pairs ...
    assert sum(map(len, long)) > 2 * sum(map(len, short))  # ... each with its own text
