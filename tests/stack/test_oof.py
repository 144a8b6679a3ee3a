"""Out-of-fold cross-encoder outputs: every train+val pair is scored by a model that never saw its query."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from esci_reranker.reranker import Reranker
from esci_reranker.stack.outputs import CE_COLUMNS, frame_outputs
from esci_reranker.train.config import load_config
from esci_reranker.train.cv import cross_validate
from esci_reranker.train.loop import read_split

TINY = ["model.max_length=32", "model.prior=cosine", "model.lexical=true", "optim.max_steps=2"]


@pytest.fixture(scope="module")
def oof_run(tmp_path_factory, small_splits, tiny_backbone):
    root = tmp_path_factory.mktemp("oof")
    data = root / "data"
    data.mkdir()
    for name in ("train", "val"):
        shutil.copy(small_splits / f"{name}.parquet", data / f"{name}.parquet")
    cfg = load_config(
        None, [f"model.backbone={tiny_backbone}", *TINY, "eval.select=last", "eval.at_start=false"]
    )
    cross_validate(cfg, data, root / "cv", folds=3, seeds=(0,), baselines=(), oof=True)
    frame = pd.concat([read_split(data / "train.parquet", "train"), read_split(data / "val.parquet", "val")])
    return root / "cv", frame


def test_every_pair_gets_exactly_one_out_of_fold_row(oof_run):
    cv_dir, frame = oof_run
    oof = pd.read_parquet(cv_dir / "oof.parquet")
    assert len(oof) == len(frame)
    assert not oof.duplicated(["seed", "query_id", "product_id"]).any()
    assert set(zip(oof["query_id"], oof["product_id"], strict=True)) == set(
        zip(frame["query_id"], frame["product_id"], strict=True)
    )
    assert set(CE_COLUMNS) <= set(oof.columns)
    assert oof[list(CE_COLUMNS)].notna().all().all()
    # each query is in one fold only
    assert (oof.groupby("query_id")["fold"].nunique() == 1).all()


def test_a_query_is_scored_by_the_model_that_did_not_train_on_it(oof_run):
    cv_dir, _ = oof_run
    oof = pd.read_parquet(cv_dir / "oof.parquet")
    for fold, rows in oof.groupby("fold"):
        trained_on = set(pd.read_parquet(cv_dir / f"fold{fold}" / "data" / "train.parquet")["query_id"])
        # the rule: no out-of-fold row comes from a model whose training data held its query
        assert not set(rows["query_id"]) & trained_on
        # ... and the numbers are that fold model's: scoring the rows again with it, in the
        # config's arithmetic (eval.precision: auto), gives them back
        held_out = pd.read_parquet(cv_dir / f"fold{fold}" / "data" / "val.parquet")
        model = Reranker.from_pretrained(cv_dir / f"fold{fold}" / "seed0" / "model", precision="auto")
        again = frame_outputs(model, held_out)
        merged = rows.merge(again, on=["query_id", "product_id"], suffixes=("", "_again"))
        assert len(merged) == len(rows)
        np.testing.assert_allclose(merged["ce_score"], merged["ce_score_again"], rtol=1e-5, atol=1e-6)
        # a model that trained on these queries gives other numbers: the check can tell them apart
        other = (fold + 1) % 3
        wrong = frame_outputs(Reranker.from_pretrained(cv_dir / f"fold{other}" / "seed0" / "model"), held_out)
        assert not np.allclose(wrong["ce_score"].to_numpy(), again["ce_score"].to_numpy())


def test_fold_models_keep_the_end_of_training_not_a_chosen_step(oof_run):
    import json

    cv_dir, _ = oof_run
    log = [
        json.loads(x) for x in (cv_dir / "fold0" / "seed0" / "train" / "log.jsonl").read_text().splitlines()
    ]
    val_steps = [r["step"] for r in log if r["type"] == "val"]
    # no evaluation at the start and none at the end: the out-of-fold pass scores the final
    # model on the same queries, and nothing is chosen by it
    assert val_steps == []
    train_steps = [r["step"] for r in log if r["type"] == "train"]
    assert train_steps[-1] == 2  # trained to the end of its schedule
    from esci_reranker.eval.ranking import ranking_metrics
    from esci_reranker.stack.cv import cross_encoder_run

    run = json.loads((cv_dir / "cv.json").read_text())["runs"][0]
    oof = pd.read_parquet(cv_dir / "oof.parquet")
    fold0 = oof[oof["fold"] == 0].reset_index(drop=True)
    assert run["best_step"] == run["steps"] == 2
    assert run["end_metric"] == pytest.approx(ranking_metrics(cross_encoder_run(fold0))["ndcg"])
