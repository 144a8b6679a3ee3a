"""Task 1 metrics: worked examples from the formulas, edge cases, and parity with trec_eval."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import pytrec_eval

from esci_reranker.eval.ranking import (
    average_precision,
    dcg,
    ndcg,
    parse_relevant,
    per_query_ranking_metrics,
    precision_at_k,
    rank_order,
    ranking_metrics,
    recall_at_k,
    reciprocal_rank,
)
from esci_reranker.labels import ESCI_LABELS, gain_table


def run_frame(rows: list[tuple[int, str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["query_id", "product_id", "esci_label", "score"])


# One query, three candidates: ranked d2 (S), d3 (I), d1 (E).
THREE = run_frame([(1, "d1", "E", 0.2), (1, "d2", "S", 0.9), (1, "d3", "I", 0.5)])


def test_three_doc_query_by_hand() -> None:
    m = ranking_metrics(THREE, cutoff=2)
    dcg_run = 0.1 / math.log2(2) + 0.0 / math.log2(3) + 1.0 / math.log2(4)
    dcg_ideal = 1.0 / math.log2(2) + 0.1 / math.log2(3) + 0.0
    assert m["ndcg"] == pytest.approx(dcg_run / dcg_ideal)  # 0.6 / 1.0631 = 0.5644
    assert m["ndcg@2"] == pytest.approx(0.1 / (1.0 + 0.1 / math.log2(3)))
    assert m["mrr"] == pytest.approx(1 / 3)
    assert m["map"] == pytest.approx(1 / 3)
    assert m["recall@2"] == 0.0
    assert m["precision@2"] == 0.0


def test_three_doc_query_with_substitutes_relevant() -> None:
    m = ranking_metrics(THREE, relevant=("E", "S"), cutoff=2)
    assert m["mrr"] == 1.0
    assert m["map"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert m["recall@2"] == pytest.approx(1 / 2)
    assert m["precision@2"] == pytest.approx(1 / 2)


def test_official_script_gains_swap_s_and_c() -> None:
    m = ranking_metrics(THREE, gains="official-script")
    assert m["ndcg"] == pytest.approx((0.01 + 1.0 / 2) / (1.0 + 0.01 / math.log2(3)))


def test_mean_is_over_queries() -> None:
    run = pd.concat([THREE, run_frame([(2, "x", "E", 1.0), (2, "y", "I", 0.0)])])
    per_query = per_query_ranking_metrics(run)
    assert per_query["query_id"].tolist() == [1, 2]
    assert per_query["num_candidates"].tolist() == [3, 2]
    assert ranking_metrics(run)["ndcg"] == pytest.approx((per_query["ndcg"].iloc[0] + 1.0) / 2)


def test_scalar_functions() -> None:
    assert dcg(np.array([3.0, 2.0, 1.0])) == pytest.approx(3 + 2 / math.log2(3) + 1 / 2)
    assert dcg(np.array([3.0, 2.0, 1.0]), k=1) == 3.0
    assert ndcg(np.array([0.0, 1.0])) == pytest.approx(1 / math.log2(3))
    assert reciprocal_rank(np.array([0, 0, 1, 1])) == pytest.approx(1 / 3)
    assert average_precision(np.array([1, 0, 1])) == pytest.approx((1 + 2 / 3) / 2)
    assert recall_at_k(np.array([1, 0, 1, 1]), 2) == pytest.approx(1 / 3)
    # Precision divides by k even when the list is shorter than k (trec_eval's P_k).
    assert precision_at_k(np.array([1, 1]), 10) == pytest.approx(0.2)


def test_ties_broken_by_product_id_descending() -> None:
    # Equal scores: "b" ranks above "a" whatever the row order.
    assert rank_order(np.array([1.0, 1.0]), ["a", "b"]).tolist() == [1, 0]
    assert rank_order(np.array([1.0, 1.0, 2.0]), ["b", "a", "c"]).tolist() == [2, 0, 1]
    good = run_frame([(1, "a", "I", 0.5), (1, "b", "E", 0.5)])
    bad = run_frame([(1, "a", "E", 0.5), (1, "b", "I", 0.5)])
    assert ranking_metrics(good)["ndcg"] == 1.0
    assert ranking_metrics(bad)["ndcg"] == pytest.approx(1 / math.log2(3))
    assert ranking_metrics(good.iloc[::-1])["ndcg"] == 1.0


def test_single_candidate() -> None:
    m = ranking_metrics(run_frame([(7, "only", "E", -3.0)]))
    assert m == {
        "ndcg": 1.0,
        "ndcg@10": 1.0,
        "mrr": 1.0,
        "map": 1.0,
        "recall@10": 1.0,
        "precision@10": pytest.approx(0.1),
    }


def test_query_without_relevant_or_gain_scores_zero_and_counts() -> None:
    no_gain = run_frame([(1, "a", "I", 0.3), (1, "b", "I", 0.1)])
    m = ranking_metrics(no_gain)
    assert m == dict.fromkeys(m, 0.0)
    # Only S: nDCG is 1 (the ideal order), but nothing is relevant when relevant = E.
    only_s = run_frame([(2, "a", "S", 0.3), (2, "b", "I", 0.1)])
    m = ranking_metrics(pd.concat([no_gain, only_s]))
    assert m["ndcg"] == pytest.approx(0.5)  # (0 + 1) / 2: the zero-gain query stays in the mean
    assert m["mrr"] == 0.0


def test_empty_run_is_zero_not_nan() -> None:
    m = ranking_metrics(run_frame([]))
    assert len(m) == 6
    assert m == dict.fromkeys(m, 0.0)
    assert per_query_ranking_metrics(run_frame([])).empty


def test_input_is_not_modified() -> None:
    run = THREE.copy()
    ranking_metrics(run, relevant="E,S")
    pd.testing.assert_frame_equal(run, THREE)


@pytest.mark.parametrize(
    ("run", "message"),
    [
        (run_frame([(1, "a", "X", 0.1)]), "unknown esci_label"),
        (run_frame([(1, "a", "E", float("nan"))]), "NaN"),
        (run_frame([(1, "a", "E", 0.1), (1, "a", "I", 0.2)]), "more than once"),
        (THREE.drop(columns="score"), "missing column"),
    ],
)
def test_bad_runs_raise_with_message(run: pd.DataFrame, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ranking_metrics(run)


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="Unknown gains"):
        ranking_metrics(THREE, gains="linear")
    with pytest.raises(ValueError, match="cutoff"):
        ranking_metrics(THREE, cutoff=0)
    with pytest.raises(ValueError, match="subset of E, S, C, I"):
        parse_relevant("E,X")
    assert parse_relevant("s, e") == ("E", "S")


# ---------------------------------------------------------------------------------------------
# parity with trec_eval (pytrec_eval)
# ---------------------------------------------------------------------------------------------


def random_run(seed: int, num_queries: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    alphabet = np.array(list("AB01z"))
    for q in range(num_queries):
        n = int(rng.integers(1, 30))
        ids: set[str] = set()
        while len(ids) < n:
            ids.add("".join(rng.choice(alphabet, size=int(rng.integers(1, 5)))))
        probs = rng.dirichlet(np.ones(4))
        labels = rng.choice(list(ESCI_LABELS), size=n, p=probs)
        # Half the queries score from 3 values only, so ties are everywhere.
        scores = rng.integers(0, 3, size=n) / 2 if q % 2 else rng.normal(size=n)
        rows += [(q, pid, lab, float(s)) for pid, lab, s in zip(sorted(ids), labels, scores, strict=True)]
    return run_frame(rows)


@pytest.mark.parametrize("gains", ["esci", "official-script"])
@pytest.mark.parametrize("relevant", [("E",), ("E", "S")])
def test_parity_with_trec_eval(gains: str, relevant: tuple[str, ...]) -> None:
    run = random_run(seed=len(gains) + len(relevant))
    table = gain_table(gains)
    graded: dict[str, dict[str, int]] = {}
    binary: dict[str, dict[str, int]] = {}
    scores: dict[str, dict[str, float]] = {}
    for row in run.itertuples():
        q = str(row.query_id)
        graded.setdefault(q, {})[row.product_id] = round(100 * table[row.esci_label])
        binary.setdefault(q, {})[row.product_id] = int(row.esci_label in relevant)
        scores.setdefault(q, {})[row.product_id] = row.score
    ref_graded = pytrec_eval.RelevanceEvaluator(graded, {"ndcg", "ndcg_cut_10"}).evaluate(scores)
    ref_binary = pytrec_eval.RelevanceEvaluator(binary, {"recip_rank", "map", "recall_10", "P_10"}).evaluate(
        scores
    )

    ours = per_query_ranking_metrics(run, gains=gains, relevant=relevant).set_index("query_id")
    pairs = {
        "ndcg": ("ndcg", ref_graded),
        "ndcg@10": ("ndcg_cut_10", ref_graded),
        "mrr": ("recip_rank", ref_binary),
        "map": ("map", ref_binary),
        "recall@10": ("recall_10", ref_binary),
        "precision@10": ("P_10", ref_binary),
    }
    assert len(ref_graded) == len(ours) == 300
    for name, (measure, ref) in pairs.items():
        expected = np.array([ref[str(q)][measure] for q in ours.index])
        np.testing.assert_allclose(ours[name].to_numpy(), expected, atol=1e-6, err_msg=name)
    means = ranking_metrics(run, gains=gains, relevant=relevant)
    assert means["ndcg"] == pytest.approx(np.mean([v["ndcg"] for v in ref_graded.values()]), abs=1e-6)


def _one_query_at_a_time(run: pd.DataFrame, cutoff: int, relevant: tuple[str, ...]) -> pd.DataFrame:
    """The per-query metrics from the one-query functions, a query at a time (the reference)."""
    table = gain_table("esci")
    rows = []
    for qid, part in sorted(run.groupby("query_id"), key=lambda item: item[0]):
        ranked = rank_order(part["score"].to_numpy(), part["product_id"].astype(str).to_numpy())
        labels = part["esci_label"].to_numpy()[ranked]
        g = np.array([table[label] for label in labels])
        r = np.isin(labels, relevant)
        rows.append(
            (qid, len(part), ndcg(g), ndcg(g, cutoff), reciprocal_rank(r), average_precision(r),
             recall_at_k(r, cutoff), precision_at_k(r, cutoff))
        )  # fmt: skip
    columns = ["query_id", "num_candidates", "ndcg", f"ndcg@{cutoff}", "mrr", "map", f"recall@{cutoff}",
               f"precision@{cutoff}"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


@pytest.mark.parametrize(("cutoff", "relevant"), [(10, ("E",)), (3, ("E", "S")), (1, ("E",))])
def test_all_queries_at_once_equal_the_one_query_functions_to_the_last_bit(cutoff, relevant):
    # per_query_ranking_metrics scores all queries together (blocks of equal list length); on
    # random runs with tied scores, lists of 1..40 and queries without a relevant candidate, it
    # gives the one-query functions' numbers exactly, whatever the row order
    rng = np.random.default_rng(11)
    sizes = rng.integers(1, 41, size=60)
    n = int(sizes.sum())
    run = pd.DataFrame(
        {
            "query_id": np.repeat(rng.permutation(1000)[:60], sizes),
            "product_id": [f"P{i:04d}" for i in rng.permutation(n)],
            "esci_label": rng.choice(list(ESCI_LABELS), size=n, p=[0.5, 0.2, 0.05, 0.25]),
            "score": np.round(rng.normal(size=n), 1),  # many ties: the product id decides
        }
    ).sample(frac=1.0, random_state=0)
    got = per_query_ranking_metrics(run, cutoff=cutoff, relevant=relevant)
    pd.testing.assert_frame_equal(got, _one_query_at_a_time(run, cutoff, relevant), check_exact=True)
