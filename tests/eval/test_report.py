"""report.md text, the comparison table, and evaluate_predictions writing every file (no model)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from esci_reranker.eval.evaluator import evaluate_run
from esci_reranker.eval.report import comparison_table, describe_gains, markdown_table, render_report
from esci_reranker.eval.runner import EvaluationOptions, evaluate_predictions

PNG = b"\x89PNG\r\n\x1a\n"


def model_run(split: pd.DataFrame, multi_task: bool = True) -> pd.DataFrame:
    """A fake model's run on ``split``: scores follow the gains (a good model)."""
    rng = np.random.default_rng(0)
    run = split[["query_id", "product_id", "esci_label", "esci_query_source"]].copy()
    run["score"] = split["gain"] + rng.normal(scale=0.01, size=len(split))
    if multi_task:
        probs = rng.dirichlet(np.ones(4), size=len(split))
        run["expected_gain"] = probs @ np.array([1.0, 0.1, 0.01, 0.0])
        run["esci_pred"] = np.array(list("ESCI"))[probs.argmax(1)]
        run["esci_probs"] = list(probs)
        run["substitute_prob"] = probs[:, 1]
    return run


def test_markdown_table() -> None:
    assert markdown_table(["a", "b"], [["x", 0.5], ["y", None]]) == (
        "| a | b |\n|:---|---:|\n| x | 0.5000 |\n| y | – |"
    )


def test_comparison_table_rows(split: pd.DataFrame) -> None:
    model = evaluate_run(model_run(split))
    base = {"random": evaluate_run(model_run(split, False)) | {"num_seeds": 10}}
    table = comparison_table(model, base)
    lines = table.splitlines()
    assert lines[0] == "| run | nDCG | nDCG@10 | MRR | MAP | Recall@10 | P@10 |"
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| model (score)",
        "| model (expected gain)",
        "| random (mean of 10 seeds)",
    ]
    assert f"{model['task1']['ndcg']:.4f}" in lines[2]


def test_render_report_sections(split: pd.DataFrame) -> None:
    model = evaluate_run(model_run(split), gains="official-script", relevant="E,S")
    bm25 = evaluate_run(model_run(split, False), gains="official-script", relevant="E,S")
    text = render_report("my-model", model, {"bm25": bm25}, {"nDCG per query": "plots/ndcg_per_query.png"})
    assert text.startswith("# Evaluation: my-model\n")
    assert "official-script (E=1, S=0.01, C=0.1, I=0)" in text
    assert "Relevant for MRR, MAP, Recall@10 and P@10: E, S." in text
    assert "### nDCG by query type" in text
    assert "| parse_pattern | 2 |" in text
    assert "## Task 2" in text
    assert "## Task 3" in text
    assert "## Every task by query type" in text
    t = model["by_query_type"]["parse_pattern"]
    row = f"| parse_pattern | 2 | {t['task1']['ndcg']:.4f} |"
    assert row in text
    assert f"{t['task2']['macro_f1']:.4f} | {t['task3']['micro_f1']:.4f}" in text
    assert "![nDCG per query](plots/ndcg_per_query.png)" in text
    assert "Warning" not in text
    other_split = bm25 | {"num_pairs": 1}
    assert "Warning:** bm25 scored a different split" in render_report("m", model, {"bm25": other_split})


def test_report_without_class_heads_or_query_types(split: pd.DataFrame) -> None:
    run = model_run(split, multi_task=False).drop(columns="esci_query_source")
    text = render_report("single", evaluate_run(run), {})
    assert "Task 2" not in text
    assert "query type" not in text
    assert describe_gains("esci") == "esci (E=1, S=0.1, C=0.01, I=0)"


def test_evaluate_predictions_writes_every_file(tmp_path, split: pd.DataFrame) -> None:
    preds = model_run(split)
    result = evaluate_predictions(
        preds, split, tmp_path, name="fake", options=EvaluationOptions(baselines="random,bm25", seeds=2)
    )
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert names == [
        "baselines/bm25/metrics.json",
        "baselines/bm25/predictions.parquet",
        "baselines/random/metrics.json",
        "baselines/random/predictions.parquet",
        "metrics.json",
        "plots/confusion_matrix.png",
        "plots/expected_gain_distribution.png",
        "plots/ndcg_per_query.png",
        "plots/score_distribution.png",
        "predictions.parquet",
        "report.md",
    ]
    for png in tmp_path.glob("plots/*.png"):
        assert png.read_bytes().startswith(PNG)
    assert json.loads((tmp_path / "metrics.json").read_text()) == result.metrics
    assert result.metrics["name"] == "fake"
    assert list(result.baseline_metrics) == ["random", "bm25"]
    assert json.loads((tmp_path / "baselines/random/metrics.json").read_text())["num_seeds"] == 2
    assert result.table in (tmp_path / "report.md").read_text()
    reread = pd.read_parquet(tmp_path / "predictions.parquet")
    assert reread["esci_probs"].map(len).eq(4).all()
    assert set(result.files) >= {"predictions", "metrics", "report", "plot:confusion_matrix"}


def test_evaluate_predictions_without_baselines(tmp_path, split: pd.DataFrame) -> None:
    result = evaluate_predictions(
        model_run(split, False), split, tmp_path, options=EvaluationOptions(baselines="none")
    )
    assert result.baseline_metrics == {}
    assert not (tmp_path / "baselines").exists()
    assert not (tmp_path / "plots/confusion_matrix.png").exists()


def test_bad_options_fail_before_writing(tmp_path, split: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="subset of E, S, C, I"):
        evaluate_predictions(model_run(split), split, tmp_path / "x", options=EvaluationOptions(relevant="X"))
    assert not (tmp_path / "x").exists()
