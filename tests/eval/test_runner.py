"""The model path: predictions_frame and run_evaluation with a tiny random checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from esci_reranker.eval.runner import EvaluationOptions, predictions_frame, read_split, run_evaluation
from esci_reranker.reranker import Reranker


@pytest.fixture(scope="module")
def reranker(tiny_checkpoint) -> Reranker:
    return Reranker.from_pretrained(tiny_checkpoint, device="cpu", batch_size=4)


def test_predictions_frame_columns_and_order(reranker: Reranker, split: pd.DataFrame) -> None:
    shuffled = split.sample(frac=1.0, random_state=0)
    preds = predictions_frame(reranker, shuffled, progress=False)
    assert list(preds.columns) == [
        "query_id",
        "product_id",
        "esci_label",
        "esci_query_source",
        "score",
        "expected_gain",
        "esci_pred",
        "esci_probs",
        "substitute_prob",
    ]
    assert preds["product_id"].tolist() == shuffled["product_id"].tolist()
    probs = np.stack(preds["esci_probs"].to_numpy())
    assert probs.shape == (len(split), 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(preds["expected_gain"], probs @ [1.0, 0.1, 0.01, 0.0], atol=1e-5)
    assert set(preds["esci_pred"]) <= set("ESCI")
    # Row order does not change a pair's score (batches are length-sorted inside the Reranker).
    again = predictions_frame(reranker, split, progress=False).set_index("product_id")
    np.testing.assert_allclose(
        again.loc[preds["product_id"], "score"].to_numpy(), preds["score"].to_numpy(), atol=1e-5
    )


def test_single_task_model_has_no_class_columns(tiny_single_task_checkpoint, split: pd.DataFrame) -> None:
    single = Reranker.from_pretrained(tiny_single_task_checkpoint, device="cpu")
    preds = predictions_frame(single, split, progress=False)
    assert list(preds.columns) == ["query_id", "product_id", "esci_label", "esci_query_source", "score"]


def test_run_evaluation_writes_and_returns(reranker: Reranker, split: pd.DataFrame, tmp_path) -> None:
    result = run_evaluation(
        reranker, split, tmp_path, EvaluationOptions(baselines=("bm25",), gains="esci", progress=False)
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == result.metrics
    assert metrics["name"] == reranker.name
    assert {"task1", "task1_expected_gain", "task2", "task3", "task1_by_query_source"} <= set(metrics)
    assert (metrics["num_queries"], metrics["num_pairs"]) == (3, 10)
    assert list(result.baseline_metrics) == ["bm25"]
    assert "| bm25 |" in result.table
    assert (tmp_path / "report.md").is_file()
    assert (tmp_path / "plots/confusion_matrix.png").is_file()
    preds = pd.read_parquet(tmp_path / "predictions.parquet")
    assert len(preds) == len(split)


def test_run_evaluation_rejects_bad_input_before_scoring(
    reranker: Reranker, split: pd.DataFrame, tmp_path
) -> None:
    with pytest.raises(ValueError, match=r"missing column\(s\) \['query'\]"):
        run_evaluation(reranker, split.drop(columns="query"), tmp_path / "a")
    with pytest.raises(ValueError, match="baselines: unknown"):
        run_evaluation(reranker, split, tmp_path / "b", EvaluationOptions(baselines="bm26"))
    assert not any(tmp_path.iterdir())


def test_read_split(split_path, tmp_path) -> None:
    assert len(read_split(split_path)) == 10
    with pytest.raises(FileNotFoundError, match="no file at"):
        read_split(tmp_path / "nope.parquet")
    pd.DataFrame({"query_id": [1]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="missing column"):
        read_split(tmp_path / "bad.parquet")
