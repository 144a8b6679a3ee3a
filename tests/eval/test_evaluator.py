"""evaluate_run: the metrics.json structure, which tasks appear, agreement with the metric functions."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from esci_reranker.eval.classification import esci_classification_metrics, substitute_metrics
from esci_reranker.eval.evaluator import average_metrics, check_run, evaluate_run
from esci_reranker.eval.ranking import ranking_metrics


def full_run(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 60
    labels = rng.choice(list("ESCI"), size=n)
    probs = rng.dirichlet(np.ones(4), size=n)
    return pd.DataFrame(
        {
            "query_id": np.repeat(np.arange(6), 10).astype("int64"),
            "product_id": [f"P{i:03d}" for i in range(n)],
            "esci_label": labels,
            "score": rng.normal(size=n),
            "expected_gain": probs @ np.array([1.0, 0.1, 0.01, 0.0]),
            "esci_pred": np.array(list("ESCI"))[probs.argmax(1)],
            "esci_probs": list(probs),
            "substitute_prob": rng.random(n),
            "esci_query_source": np.repeat(
                ["other", "negations", "other", "behavioral", "other", "other"], 10
            ),
        }
    )


def no_nan(value: object) -> bool:
    if isinstance(value, dict):
        return all(no_nan(v) for v in value.values())
    if isinstance(value, list):
        return all(no_nan(v) for v in value)
    return not (isinstance(value, float) and math.isnan(value))


def test_score_only_run_has_task1_only() -> None:
    run = full_run()[["query_id", "product_id", "esci_label", "score"]]
    m = evaluate_run(run)
    assert set(m) == {"gains", "relevant_labels", "cutoff", "num_queries", "num_pairs", "task1"}
    assert m["gains"] == "esci"
    assert m["relevant_labels"] == ["E"]
    assert (m["num_queries"], m["num_pairs"]) == (6, 60)
    assert set(m["task1"]) == {"ndcg", "ndcg@10", "mrr", "map", "recall@10", "precision@10"}
    assert m["task1"] == ranking_metrics(run)


def test_full_run_has_every_task_and_agrees_with_metric_functions() -> None:
    run = full_run()
    m = evaluate_run(run, gains="official-script", relevant="E,S")
    assert m["relevant_labels"] == ["E", "S"]
    assert m["task1_expected_gain"] == ranking_metrics(
        run, "expected_gain", gains="official-script", relevant=("E", "S")
    )
    task2 = esci_classification_metrics(run["esci_label"], run["esci_pred"])
    assert {k: m["task2"][k] for k in task2} == task2
    assert m["task2"]["labels"] == ["E", "S", "C", "I"]
    assert np.array(m["task2"]["confusion_matrix"]).sum() == 60
    assert set(m["task2"]["per_class"]) == {"E", "S", "C", "I"}
    assert m["task3"] == substitute_metrics(run["esci_label"], run["substitute_prob"]) | {"threshold": 0.5}
    by_source = m["task1_by_query_source"]
    assert sorted(by_source) == ["behavioral", "negations", "other"]
    assert by_source["other"]["num_queries"] == 4
    assert "task1_expected_gain_by_query_source" in m
    json.dumps(m)  # plain JSON types only
    assert no_nan(m)


def test_by_source_is_the_mean_of_its_queries() -> None:
    run = full_run()
    m = evaluate_run(run)
    only_negations = run[run["esci_query_source"] == "negations"]
    assert m["task1_by_query_source"]["negations"]["ndcg"] == pytest.approx(
        ranking_metrics(only_negations)["ndcg"]
    )


def test_by_query_type_holds_every_task_of_each_type() -> None:
    run = full_run()
    m = evaluate_run(run, threshold=0.3)
    assert sorted(m["by_query_type"]) == ["behavioral", "negations", "other"]
    other = run[run["esci_query_source"] == "other"]
    t = m["by_query_type"]["other"]
    assert (t["num_queries"], t["num_pairs"]) == (4, 40)
    assert t["task1"]["ndcg"] == pytest.approx(ranking_metrics(other)["ndcg"])
    true, pred = other["esci_label"], other["esci_pred"]
    assert t["task2"]["macro_f1"] == pytest.approx(esci_classification_metrics(true, pred)["macro_f1"])
    assert "confusion_matrix" not in t["task2"]
    # the model's threshold reaches the per-type Task 3 numbers too
    assert t["task3"]["f1"] == pytest.approx(substitute_metrics(true, other["substitute_prob"], 0.3)["f1"])
    assert "by_query_type" not in t


def test_empty_run_is_defined() -> None:
    m = evaluate_run(full_run().iloc[:0])
    assert m["num_queries"] == 0
    assert m["task1"] == dict.fromkeys(m["task1"], 0.0)
    assert "task2" not in m
    assert "task3" not in m
    assert no_nan(m)


def test_single_class_task3_and_single_candidate_queries() -> None:
    run = full_run().groupby("query_id").head(1).assign(esci_label="E")
    m = evaluate_run(run)
    assert m["task3"]["auc"] == 0.5
    assert m["task1"]["ndcg"] == 1.0
    assert no_nan(m)


def test_input_not_modified() -> None:
    run = full_run()
    before = run.copy()
    evaluate_run(run)
    pd.testing.assert_frame_equal(run, before)


def test_missing_column_message() -> None:
    with pytest.raises(ValueError, match=r"run: missing column\(s\) \['score'\]"):
        check_run(full_run().drop(columns="score"))
    with pytest.raises(ValueError, match="Unknown gains"):
        evaluate_run(full_run(), gains="exp")


def test_average_metrics() -> None:
    a, b = evaluate_run(full_run(0)), evaluate_run(full_run(1))
    mean = average_metrics([a, b])
    assert mean["task1"]["ndcg"] == pytest.approx((a["task1"]["ndcg"] + b["task1"]["ndcg"]) / 2)
    assert mean["num_queries"] == 6
    assert isinstance(mean["num_queries"], int)
    assert mean["gains"] == "esci"
    with pytest.raises(ValueError, match="no results"):
        average_metrics([])
