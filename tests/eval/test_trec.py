"""TREC files written from predictions reproduce metrics.json's Task 1 numbers under pytrec_eval."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import pytrec_eval

from esci_reranker.eval.evaluator import evaluate_run
from esci_reranker.eval.trec import main, trec_qrels, write_trec_files, write_trec_run

MEASURES = {  # ours -> trec_eval
    "ndcg": "ndcg",
    "ndcg@10": "ndcg_cut_10",
    "mrr": "recip_rank",
    "map": "map",
    "recall@10": "recall_10",
    "precision@10": "P_10",
}


def predictions(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 25, size=40)
    qids = np.repeat(np.arange(1000, 1040), sizes)
    n = len(qids)
    return pd.DataFrame(
        {
            "query_id": qids.astype("int64"),
            "product_id": [f"B{i:05d}" for i in rng.permutation(n)],
            "esci_label": rng.choice(list("ESCI"), size=n, p=[0.5, 0.25, 0.05, 0.2]),
            # float32 like a model's output, with ties
            "score": np.round(rng.normal(size=n), 1).astype(np.float32).astype(np.float64),
            "expected_gain": rng.random(n),
        }
    )


def pytrec_means(folder, files) -> dict[str, float]:
    with open(files["run"]) as f:
        run = pytrec_eval.parse_run(f)
    with open(files["qrels_graded"]) as f:
        graded = pytrec_eval.parse_qrel(f)
    with open(files["qrels_binary"]) as f:
        binary = pytrec_eval.parse_qrel(f)
    out_graded = pytrec_eval.RelevanceEvaluator(graded, {"ndcg", "ndcg_cut_10"}).evaluate(run)
    out_binary = pytrec_eval.RelevanceEvaluator(binary, {"recip_rank", "map", "recall_10", "P_10"}).evaluate(
        run
    )
    means = {}
    for ours, theirs in MEASURES.items():
        source = out_graded if theirs.startswith("ndcg") else out_binary
        means[ours] = float(np.mean([q[theirs] for q in source.values()]))
    return means


@pytest.mark.parametrize(("gains", "relevant"), [("esci", "E"), ("official-script", "E,S")])
def test_trec_files_reproduce_metrics_json(tmp_path, gains: str, relevant: str) -> None:
    preds = predictions()
    metrics = evaluate_run(preds, gains=gains, relevant=relevant)
    preds.to_parquet(tmp_path / "predictions.parquet", index=False)
    reread = pd.read_parquet(tmp_path / "predictions.parquet")
    for column, key in (("score", "task1"), ("expected_gain", "task1_expected_gain")):
        files = write_trec_files(reread, tmp_path / column, gains, relevant, column)
        means = pytrec_means(tmp_path, files)
        for name, value in means.items():
            assert metrics[key][name] == pytest.approx(value, abs=1e-6), (column, name)


def test_file_formats(tmp_path) -> None:
    preds = pd.DataFrame(
        {"query_id": [7, 7], "product_id": ["a", "b"], "esci_label": ["S", "E"], "score": [0.5, 0.5]}
    )
    path = write_trec_run(preds, tmp_path / "run.txt", tag="t")
    # Tie: "b" ranks above "a" (product_id descending).
    assert path.read_text().splitlines() == ["7 Q0 b 1 0.5 t", "7 Q0 a 2 0.5 t"]
    assert trec_qrels(preds) == {"7": {"a": 10, "b": 100}}
    assert trec_qrels(preds, "official-script") == {"7": {"a": 1, "b": 100}}
    assert trec_qrels(preds, relevant="E") == {"7": {"a": 0, "b": 1}}


def test_whitespace_in_ids_is_rejected() -> None:
    preds = pd.DataFrame({"query_id": [1], "product_id": ["a b"], "esci_label": ["E"], "score": [1.0]})
    with pytest.raises(ValueError, match="whitespace"):
        trec_qrels(preds)


def test_module_entry_point(tmp_path, capsys) -> None:
    predictions().to_parquet(tmp_path / "p.parquet", index=False)
    main([str(tmp_path / "p.parquet"), str(tmp_path / "trec"), "--relevant", "E,S"])
    assert sorted(p.name for p in (tmp_path / "trec").iterdir()) == [
        "qrels.binary.txt",
        "qrels.graded.txt",
        "run.txt",
    ]
    assert "run.txt" in capsys.readouterr().out
