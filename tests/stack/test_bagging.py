"""Bagged fold cross-encoders against one cross-encoder as the stacker's first stage (nested CV)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from esci_reranker.stack.bagging import mean_outputs
from tests.cli.helpers import assert_fails, run
from tests.stack.test_train import STACKED


def _outputs(score: list[float], prob_e: list[float]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "query_id": [1, 1, 2],
            "product_id": ["a", "b", "c"],
            "ce_score": score,
            "ce_p_E": prob_e,
            "esci_label": ["E", "I", "S"],
        }
    )


def test_mean_outputs_averages_the_model_columns_row_by_row():
    mean = mean_outputs(
        [_outputs([1.0, 2.0, 3.0], [0.2, 0.4, 0.6]), _outputs([3.0, 0.0, 1.0], [0.4, 0.0, 0.2])]
    )
    assert mean["ce_score"].tolist() == [2.0, 1.0, 2.0]
    assert mean["ce_p_E"].tolist() == pytest.approx([0.3, 0.2, 0.4])
    assert mean["esci_label"].tolist() == ["E", "I", "S"]  # ids and labels carried, not averaged


def test_mean_outputs_refuses_tables_of_other_rows():
    other = _outputs([1.0, 2.0, 3.0], [0.2, 0.4, 0.6]).iloc[::-1]
    with pytest.raises(ValueError, match="different rows"):
        mean_outputs([_outputs([1.0, 2.0, 3.0], [0.2, 0.4, 0.6]), other])


@pytest.fixture(scope="module")
def bagging_cv(tmp_path_factory, small_splits, tiny_backbone):
    out = tmp_path_factory.mktemp("bagging") / "cv"
    args = ["cv", "--data", small_splits, "--out", out, "--folds", "3", "--baselines", "none", "--bagging"]
    for item in (f"model.backbone={tiny_backbone}", *STACKED):
        args += ["--set", item]
    result = run(*args)
    assert result.exit_code == 0, result.output
    return out, args, result.output


def test_bagging_cv_compares_both_first_stages_under_the_same_trees(bagging_cv, small_splits):
    out, _, output = bagging_cv
    report = json.loads((out / "bagging.json").read_text())
    entries = report["entries"]
    assert [e["fold"] for e in entries] == [0, 1, 2]
    for name in ("stacker_one_model", "stacker_bagged", "cross_encoder_one_model", "cross_encoder_bagged"):
        assert name in report["summary"]["overall"]
        assert f"| {name} | 0." in output
    # the one-model first stage is the ordinary out-of-fold model: its numbers are stack_cv's
    stack_cv = json.loads((out / "stack_cv.json").read_text())["entries"]
    for entry, ordinary in zip(entries, stack_cv, strict=True):
        assert entry["cross_encoder_one_model"]["ndcg"] == pytest.approx(ordinary["cross_encoder"]["ndcg"])
    gains = report["summary"]["bagged_minus_one_model_ndcg"]["per_run"]
    expected = [e["stacker_bagged"]["ndcg"] - e["stacker_one_model"]["ndcg"] for e in entries]
    assert gains == pytest.approx(expected)
    assert "stacker nDCG, bagged - one model, per fold: " in output


def test_no_inner_model_trains_on_its_outer_or_inner_held_out_queries(bagging_cv):
    out, _, _ = bagging_cv
    folds = (
        pd.read_parquet(out / "oof.parquet")
        .groupby("fold")["query_id"]
        .apply(lambda q: set(q.tolist()))
        .to_dict()
    )
    models = sorted((out / "bagging").glob("f*g*"))
    assert len(models) == 6  # 3 outer folds x 2 inner models
    for folder in models:
        f, g = (int(x) for x in folder.name[1:].split("g"))
        trained_on = set(pd.read_parquet(folder / "train.parquet")["query_id"])
        assert trained_on, folder
        assert not trained_on & folds[f], folder.name
        assert not trained_on & folds[g], folder.name
        assert trained_on == set().union(*folds.values()) - folds[f] - folds[g]
        assert (folder / "model" / "config.json").is_file()


def test_bagging_reuses_an_oof_table_and_checks_it(bagging_cv, tmp_path, small_splits):
    out, args, _ = bagging_cv
    reuse = [*args]
    reuse[reuse.index("--out") + 1] = tmp_path / "again"
    result = run(*reuse, "--oof", out / "oof.parquet")
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "again").glob("fold*"))  # the fold models were not trained again
    first = json.loads((out / "bagging.json").read_text())["entries"]
    again = json.loads((tmp_path / "again" / "bagging.json").read_text())["entries"]
    for a, b in zip(first, again, strict=True):
        assert a["cross_encoder_one_model"] == b["cross_encoder_one_model"]

    # an oof table of other folds, another seed, or a config without a stacker: clear errors
    oof = pd.read_parquet(out / "oof.parquet")
    shuffled = oof.assign(fold=np.roll(oof["fold"].to_numpy(), 7))
    shuffled.to_parquet(tmp_path / "other.parquet")
    assert_fails(run(*reuse, "--oof", tmp_path / "other.parquet"), "does not hold the queries")
    assert_fails(
        run(*reuse, "--seeds", "5", "--oof", out / "oof.parquet"),
        "oof table: seed 5 has no out-of-fold outputs",
    )
    assert_fails(run(*reuse, "--set", "model.stacker=none"), "the config has no stacker")
    assert_fails(run(*reuse, "--oof", tmp_path / "missing.parquet"), "missing.parquet: no such file")


def test_cv_of_the_trees_alone_on_an_earlier_oof_table(bagging_cv, tmp_path):
    out, args, _ = bagging_cv
    trees = [a for a in args if a != "--bagging"]
    trees[trees.index("--out") + 1] = tmp_path / "trees"
    result = run(*trees, "--oof", out / "oof.parquet")
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "trees").glob("fold*"))
    assert not (tmp_path / "trees" / "bagging.json").exists()
    first = json.loads((out / "stack_cv.json").read_text())["entries"]
    again = json.loads((tmp_path / "trees" / "stack_cv.json").read_text())["entries"]
    for a, b in zip(first, again, strict=True):  # the same out-of-fold rows and trees: the same numbers
        assert b["cross_encoder"] == a["cross_encoder"]
        assert b["stacker"]["ndcg"] == pytest.approx(a["stacker"]["ndcg"])
    # a feature left out reaches the trees (the log names how many they read)
    count = int(result.output.split("folds (")[1].split(" features")[0])
    fewer = run(*trees, "--oof", out / "oof.parquet", "--set", "stack.exclude_features=[ce_score]")
    assert fewer.exit_code == 0, fewer.output
    assert f"on the 3 folds ({count - 1} features)" in fewer.output
    broken = pd.read_parquet(out / "oof.parquet").drop(columns=["fold"])
    broken.to_parquet(tmp_path / "broken.parquet")
    assert_fails(run(*trees, "--oof", tmp_path / "broken.parquet"), "no column(s) ['fold']")


def test_inner_models_get_the_extra_training_rows_of_their_held_out_queries(
    bagging_cv, tmp_path, small_splits, tiny_backbone
):
    from esci_reranker.stack.bagging import cross_validate_bagging
    from esci_reranker.train.config import load_config

    out, _, _ = bagging_cv
    cfg = load_config(None, [f"model.backbone={tiny_backbone}", *STACKED])
    frame = pd.concat(
        [pd.read_parquet(small_splits / f"{n}.parquet") for n in ("train", "val")], ignore_index=True
    )
    asked: list[frozenset[int]] = []

    def negatives(held_out: frozenset[int]) -> pd.DataFrame:
        # one catalogue-negative-like row for the first query the inner model trains on
        asked.append(held_out)
        row = frame[~frame["query_id"].isin(held_out)].head(1).copy()
        return row.assign(product_id="negative-product", esci_label="I", gain=0.0)

    oof = pd.read_parquet(out / "oof.parquet")
    seed = int(oof["seed"].iloc[0])
    cross_validate_bagging(
        cfg, frame, oof, tmp_path / "bag", 3, seed, log=lambda _: None, train_rows=negatives
    )
    folds = oof.groupby("fold")["query_id"].apply(lambda q: frozenset(q.tolist())).to_dict()
    assert sorted(asked, key=sorted) == sorted(
        (folds[f] | folds[g] for f in folds for g in folds if f != g), key=sorted
    )
    for folder in sorted((tmp_path / "bag").glob("f*g*")):
        trained = pd.read_parquet(folder / "train.parquet")
        extra = trained[trained["product_id"] == "negative-product"]
        assert len(extra) == 1
        f, g = (int(x) for x in folder.name[1:].split("g"))
        assert extra["query_id"].iloc[0] not in folds[f] | folds[g]
