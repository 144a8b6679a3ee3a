"""Search-flow metrics and the foreign rule, on hand-made rows with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from esci_reranker.eval.calibration import (
    calibration_counts,
    expected_calibration_error,
    pooled_ece,
    reliability,
)
from esci_reranker.eval.flow import (
    FLOW_COLUMNS,
    flow_metrics,
    flow_summary,
    ideal_gains,
    is_foreign,
    judged_index,
    product_kinds,
)


@pytest.mark.parametrize(
    ("query", "judged_for", "foreign"),
    [
        # nothing in common: a lunch box is not a TV box
        ("usb lunch box", ["android tv streaming device"], True),
        # one shared content word ("box") is enough to be related
        ("usb lunch box", ["android tv box"], False),
        # words match on their first four letters: shoes / shoe, womens / women
        ("womens running shoes", ["shoe rack"], False),
        ("womens running shoes", ["women sandals"], False),
        # stopwords never count as shared
        ("shoes for the beach", ["cables for the tv"], True),
        # related to any one of its queries -> not foreign
        ("ez carafe", ["leadership book", "glass carafe"], False),
        # judged for no other query: nothing says what it is about
        ("ez carafe", [], False),
    ],
)
def test_foreign_rule_on_hand_made_rows(query, judged_for, foreign):
    assert is_foreign(query, judged_for) is foreign


def test_product_kinds_tell_judged_foreign_and_unjudged():
    labelled = pd.DataFrame(
        {
            "query_id": [1, 1, 2, 3],
            "query": ["usb lunch box", "usb lunch box", "android tv streaming", "insulated lunch bag"],
            "product_id": ["a", "b", "c", "d"],
        }
    )
    judged = judged_index(labelled)
    kinds = product_kinds(1, "usb lunch box", ["a", "c", "d", "zz"], judged)
    # a: judged for the query; c: judged only for an unrelated query; d: judged for a related
    # query ("lunch"); zz: judged for nothing
    assert kinds == ["judged", "foreign", "unjudged", "unjudged"]


def _run() -> pd.DataFrame:
    """Two queries, four results each, with hand-set labels and predictions."""
    p = {
        "E": [0.7, 0.1, 0.1, 0.1],
        "S": [0.2, 0.6, 0.1, 0.1],
        "I": [0.1, 0.1, 0.1, 0.7],
    }
    rows = [
        # query 1: judged E (pred E), judged I (pred E), foreign (pred I), unjudged (pred E)
        (1, "a", "judged", "E", 4.0, "E", p["E"], 0.1),
        (1, "b", "judged", "I", 3.0, "E", p["E"], 0.1),
        (1, "c", "foreign", None, 2.0, "I", p["I"], 0.1),
        (1, "d", "unjudged", None, 1.0, "E", p["E"], 0.1),
        # query 2: foreign (pred E) ranked first, judged S (pred S), judged I (pred I), foreign (pred I)
        (2, "e", "foreign", None, 4.0, "E", p["E"], 0.1),
        (2, "f", "judged", "S", 3.0, "S", p["S"], 0.9),
        (2, "g", "judged", "I", 2.0, "I", p["I"], 0.1),
        (2, "h", "foreign", None, 1.0, "I", p["I"], 0.1),
    ]
    run = pd.DataFrame(
        rows,
        columns=list(FLOW_COLUMNS),
    )
    run["esci_probs"] = [np.array(v) for v in run["esci_probs"]]
    run["esci_query_source"] = ["other"] * 4 + ["negations"] * 4
    return run


def _ideal() -> dict[object, np.ndarray]:
    # query 1's whole judged list: E, I and one E that was never retrieved; query 2: S, I
    return {1: np.array([1.0, 0.0, 1.0]), 2: np.array([0.1, 0.0])}


def test_flow_summary_hand_computed():
    out = flow_summary(_run(), _ideal(), top_k=2)
    assert out["num_queries"] == 2
    assert out["results"] == 8
    assert (out["judged_returned"], out["foreign_returned"], out["unjudged_returned"]) == (4, 3, 1)
    assert out["share_E_all"] == pytest.approx(4 / 8)  # a, b, d, e
    assert out["share_E_top2"] == pytest.approx(3 / 4)  # top 2: a, b (E, E); e, f (E, S)
    # foreign: c -> I, e -> E, h -> I
    assert out["foreign"]["share_E"] == pytest.approx(1 / 3)
    assert out["foreign"]["share_I"] == pytest.approx(2 / 3)
    # judged irrelevant: b (pred E), g (pred I) -> recall 1/2; called E among judged: a (E), b (I) -> 1/2
    assert out["judged_I_recall"] == pytest.approx(0.5)
    assert out["E_precision"] == pytest.approx(0.5)
    # end-to-end nDCG@10, gains in score order: q1 [1, 0, 0, 0] vs ideal [1, 1, 0];
    # q2 [0, 0.1, 0, 0] vs ideal [0.1, 0]
    q1 = 1.0 / (1.0 + 1.0 / math.log2(3))
    q2 = (0.1 / math.log2(3)) / 0.1
    assert out["ndcg@10_e2e"] == pytest.approx((q1 + q2) / 2)
    matrix = np.asarray(out["judged"]["confusion_matrix"])
    assert matrix[0, 0] == 1
    assert matrix[3, 0] == 1
    assert matrix[1, 1] == 1
    assert matrix[3, 3] == 1
    assert matrix.sum() == 4


def test_flow_metrics_by_type_and_reliability():
    metrics = flow_metrics(_run(), _ideal(), top_k=2)
    assert set(metrics["by_type"]) == {"other", "negations"}
    assert metrics["by_type"]["negations"]["foreign"]["share_E"] == pytest.approx(1 / 2)
    assert set(metrics["reliability"]) == {"E", "S"}
    # judged P(E): a 0.7 (E), b 0.7 (I), f 0.2 (S), g 0.1 (I) -> bins 7: observed 1/2; 2: 0; 1: 0
    rel = metrics["reliability"]["E"]
    assert rel["bin"] == [1.0, 2.0, 7.0]
    assert rel["observed"] == pytest.approx([0.0, 0.0, 0.5])


def test_flow_summary_names_a_missing_column():
    with pytest.raises(ValueError, match="kind"):
        flow_summary(_run().drop(columns=["kind"]), _ideal())


def test_ideal_gains_per_query():
    frame = pd.DataFrame({"query_id": [1, 1, 2], "esci_label": ["E", "C", "S"]})
    ideal = ideal_gains(frame)
    assert ideal[1].tolist() == [1.0, 0.01]
    assert ideal[2].tolist() == [0.1]


def test_expected_calibration_error_hand_computed():
    probs = np.array([0.05, 0.15, 0.95, 0.85])
    truth = np.array([0, 0, 1, 0])
    # bins 0, 1, 9, 8, one row each: |0 - .05| + |0 - .15| + |1 - .95| + |0 - .85|, each a quarter
    assert expected_calibration_error(probs, truth) == pytest.approx((0.05 + 0.15 + 0.05 + 0.85) / 4)
    assert reliability(probs, truth)["bin"] == [0.0, 1.0, 8.0, 9.0]
    assert math.isnan(expected_calibration_error(np.array([]), np.array([])))


def test_pooled_ece_equals_the_ece_of_the_rows_together():
    rng = np.random.default_rng(0)
    parts = [(rng.random(n), rng.random(n) < 0.4) for n in (50, 120, 7)]
    pooled = pooled_ece(calibration_counts(p, t) for p, t in parts)
    together = expected_calibration_error(
        np.concatenate([p for p, _ in parts]), np.concatenate([t for _, t in parts])
    )
    assert pooled == pytest.approx(together, abs=1e-12)
    # pooling is not the mean of the parts' own ECEs, which carry each part's binning noise
    assert pooled != pytest.approx(np.mean([expected_calibration_error(p, t) for p, t in parts]), abs=1e-3)
    counts = calibration_counts(np.array([0.05, 0.95, 0.97]), np.array([0, 1, 0]))
    assert counts["rows"] == [1.0] + [0.0] * 8 + [2.0]
    assert counts["sum_observed"][9] == 1.0
    assert math.isnan(pooled_ece([]))


def test_flow_report_rows_line_up_with_the_header():
    from esci_reranker.eval.report import render_flow_section

    section = render_flow_section(flow_metrics(_run(), _ideal(), top_k=2), [], top_k=2, retrieved=5)
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = lines[start : lines.index("", start)]  # the first table: the metrics by query type
    widths = {line.count("|") for line in table}
    assert len(widths) == 1, table
    # the first data row starts with the number of queries, then the results
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[:2] == ["all queries", "2"]


def test_a_model_without_class_heads_is_measured_on_ranking_alone():
    """A score-only model (e.g. student-score) labels nothing: its label figures are NaN, not 0,
    the ranking's are computed, and the report has no confusion matrix or calibration."""
    from esci_reranker.eval.report import render_flow_section

    run = _run().assign(esci_pred="", substitute_prob=np.nan)
    run["esci_probs"] = [np.full(4, np.nan) for _ in range(len(run))]
    metrics = flow_metrics(run, _ideal(), top_k=2)
    out = metrics["overall"]
    for key in ("share_E_all", "share_E_top2", "judged_I_recall", "E_precision", "ece_E", "ece_S"):
        assert math.isnan(out[key]), key
    assert all(math.isnan(v) for v in out["foreign"].values())
    assert out["ndcg@10_e2e"] == pytest.approx(flow_summary(_run(), _ideal(), top_k=2)["ndcg@10_e2e"])
    assert math.isnan(out["judged"]["task2_micro_f1"])
    assert "confusion_matrix" not in out["judged"]
    assert "reliability" not in metrics
    section = render_flow_section(metrics, [], top_k=2, retrieved=5)
    assert "true \\ predicted" not in section


def test_calibration_leaves_out_rows_without_a_probability():
    probs, truth = np.array([0.05, np.nan, 0.95]), np.array([0, 1, 1])
    assert expected_calibration_error(probs, truth) == pytest.approx(
        expected_calibration_error(probs[[0, 2]], truth[[0, 2]])
    )
    assert math.isnan(expected_calibration_error(np.full(3, np.nan), truth))
