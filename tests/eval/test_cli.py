"""`esci-reranker evaluate` and `esci-reranker baseline` through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from esci_reranker.cli import app

runner = CliRunner()


def evaluate(model, data, out, *options: str):
    """``esci-reranker evaluate --model model --data data --out out`` with ``options``; it must succeed."""
    args = ["evaluate", "--model", str(model), "--data", str(data), "--out", str(out), *options]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_evaluate_writes_every_file(tiny_checkpoint, split_path, tmp_path) -> None:
    out = tmp_path / "eval"
    options = ["--device", "cpu", "--baselines", "random,bm25,bi-encoder", "--seeds", "3", "--no-progress"]
    result = evaluate(tiny_checkpoint, split_path, out, *options)
    assert "| model (score) |" in result.output
    assert "| random (mean of 3 seeds) |" in result.output
    assert "| bi-encoder |" in result.output
    for name in ("predictions.parquet", "metrics.json", "report.md", "plots/ndcg_per_query.png"):
        assert (out / name).is_file(), name
    for baseline in ("random", "bm25", "bi-encoder"):
        assert (out / "baselines" / baseline / "metrics.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["gains"] == "esci"
    assert metrics["relevant_labels"] == ["E"]


def test_evaluate_options_reach_the_metrics(tiny_checkpoint, split_path, tmp_path) -> None:
    out = tmp_path / "eval"
    options = ["--gains", "official-script", "--relevant", "E,S", "--baselines", "none", "--no-progress"]
    evaluate(tiny_checkpoint, split_path, out, *options)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["gains"] == "official-script"
    assert metrics["relevant_labels"] == ["E", "S"]
    assert not (out / "baselines").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gains", "linear"], "Unknown gains 'linear'"),
        (["--relevant", "E,X"], "subset of E, S, C, I"),
        (["--baselines", "random,splade"], "baselines: unknown ['splade']"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--precision", "fp16"], "--precision: precision='fp16'; expected 'auto' or one of"),
    ],
)
def test_evaluate_bad_options(tiny_checkpoint, split_path, tmp_path, extra, message) -> None:
    args = [
        "evaluate",
        "--model",
        str(tiny_checkpoint),
        "--data",
        str(split_path),
        "--out",
        str(tmp_path / "o"),
    ]
    result = runner.invoke(app, args + extra)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "o").exists()


def test_evaluate_missing_inputs(tiny_checkpoint, split_path, tmp_path) -> None:
    result = runner.invoke(
        app,
        ["evaluate", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "x.parquet"), "--out", "o"],
    )
    assert result.exit_code == 2
    assert "no file at" in result.output
    result = runner.invoke(
        app, ["evaluate", "--model", str(tmp_path / "no-model"), "--data", str(split_path), "--out", "o"]
    )
    assert result.exit_code == 2
    assert "--model" in result.output


def test_baseline_command(split_path, tmp_path) -> None:
    out = tmp_path / "bm25"
    result = runner.invoke(app, ["baseline", "bm25", "--data", str(split_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| bm25 |" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["name"] == "bm25"
    assert metrics["task1"]["mrr"] == 1.0
    assert (out / "predictions.parquet").is_file()


def test_baseline_random_options(split_path, tmp_path) -> None:
    args = ["baseline", "random", "--data", str(split_path), "--out", str(tmp_path), "--seeds", "4"]
    result = runner.invoke(app, [*args, "--relevant", "E,S", "--gains", "official-script"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_seeds"] == 4
    assert metrics["relevant_labels"] == ["E", "S"]
    assert metrics["gains"] == "official-script"


def test_baseline_bad_name_and_data(split_path, tmp_path) -> None:
    result = runner.invoke(app, ["baseline", "tfidf", "--data", str(split_path), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "expected one of random, bm25, bi-encoder" in result.output
    result = runner.invoke(
        app, ["baseline", "bm25", "--data", str(tmp_path / "x.parquet"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "no file at" in result.output
