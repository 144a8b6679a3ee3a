"""A stacked model end to end: out-of-fold cross-encoders, trees, final model, loading and serving."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from esci_reranker.model.config import CheckpointError
from esci_reranker.reranker import Reranker
from esci_reranker.stack.cv import stack_table
from esci_reranker.stack.stacker import Stacker
from esci_reranker.stack.train import train_stacked
from esci_reranker.train.config import ConfigError, load_config

STACKED = [
    "model.max_length=32",
    "model.prior=cosine",
    "model.lexical=true",
    "model.stacker=gbdt",
    "optim.max_steps=2",
    "stack.folds=2",
    "stack.max_rounds=10",
    "stack.min_data_in_leaf=5",
    "stack.inner_folds=2",
]


@pytest.fixture(scope="module")
def stacked(tmp_path_factory, small_splits, tiny_backbone):
    root = tmp_path_factory.mktemp("stacked")
    cfg = load_config(
        None,
        [
            f"model.backbone={tiny_backbone}",
            *STACKED,
            "stack.bags=2",  # each tree model two fits, saved and loaded with the checkpoint
            f"data.dir={small_splits}",
            f"output.save_path={root / 'model'}",
        ],
    )
    lines: list[str] = []
    result = train_stacked(cfg, progress=False, log=lines.append)
    return result, root, lines


def test_training_writes_one_model_with_its_stacker_and_the_cv(stacked):
    _result, root, lines = stacked
    assert (root / "model" / "config.json").is_file()
    assert sorted(p.name for p in (root / "model" / "stacker").iterdir()) == [
        "classifier.1.txt",
        "classifier.txt",
        "ranker.1.txt",
        "ranker.txt",
        "stacker.json",
        "substitute.1.txt",
        "substitute.txt",
    ]
    cv = json.loads((root / "train" / "folds" / "stack_cv.json").read_text())
    assert [(e["fold"], e["seed"]) for e in cv["entries"]] == [(0, 0), (1, 0)]
    overall = cv["summary"]["overall"]
    assert set(overall) == {"stacker", "cross_encoder", "bm25", "bi-encoder"}
    assert {"ndcg", "task2_micro_f1", "task3_auc"} <= set(overall["stacker"])
    ndcgs = [e["stacker"]["ndcg"] for e in cv["entries"]]
    assert overall["stacker"]["ndcg"]["mean"] == pytest.approx(np.mean(ndcgs))
    # the calibration of the stacker's P(E), its folds pooled: the ECE of every out-of-fold row
    from esci_reranker.eval.calibration import pooled_ece

    pooled = pooled_ece(e["calibration"]["E"] for e in cv["entries"])
    assert cv["summary"]["pooled"]["ece_E"] == {"mean": pytest.approx(pooled), "std": 0.0}
    assert cv["summary"]["pooled"]["seeds"] == 1
    from esci_reranker.stack.cv import cv_tables

    assert f"pooled (one seed): ECE of P(E) {pooled:.3f}," in cv_tables(cv["summary"])
    oof = pd.read_parquet(root / "train" / "folds" / "oof.parquet")
    assert sum(sum(e["calibration"]["E"]["rows"]) for e in cv["entries"]) == len(oof)  # every row, once
    assert cv["entries"][0]["stacker_by_type"]  # the sample's queries have a type
    assert set(cv["summary"]["by_type"]) == {t for e in cv["entries"] for t in e["stacker_by_type"]}
    # progress says which fold runs
    assert any("fold 1/2" in line for line in lines)
    assert any("fold 2/2" in line for line in lines)
    assert any("final model" in line for line in lines)
    # the final cross-encoder trained on every train+val query
    trained = pd.read_parquet(root / "train" / "train_all.parquet")
    assert trained["query_id"].nunique() == 9


def test_the_cv_keeps_every_held_out_prediction_of_the_stacker(stacked):
    """``stack_oof.parquet``: each judged out-of-fold row once, with the stacker's probabilities
    before its fold's class offsets and the label after them; the CV's figures come from it."""
    from esci_reranker.labels import ESCI_LABELS
    from esci_reranker.stack.rules import DecisionRules

    _result, root, _ = stacked
    folds = root / "train" / "folds"
    cv = json.loads((folds / "stack_cv.json").read_text())
    oof = pd.read_parquet(folds / "oof.parquet")
    pred = pd.read_parquet(folds / "stack_oof.parquet")
    assert list(pred.columns[:2]) == ["seed", "fold"]
    assert len(pred) == len(oof)
    assert not pred.duplicated(["seed", "query_id", "product_id"]).any()
    assert set(zip(pred["query_id"], pred["product_id"], strict=True)) == set(
        zip(oof["query_id"], oof["product_id"], strict=True)
    )
    columns = [f"p_{label}" for label in ESCI_LABELS]
    np.testing.assert_allclose(pred[columns].sum(axis=1), 1.0, atol=1e-6)
    assert set(pred["esci_label"]) <= set(ESCI_LABELS)
    for entry in cv["entries"]:
        rows = pred[(pred["seed"] == entry["seed"]) & (pred["fold"] == entry["fold"])]
        assert len(rows) > 0
        rules = DecisionRules.from_dict(entry["rules"])
        labels = np.asarray(ESCI_LABELS)[rules.classes(rows[columns].to_numpy())]
        assert labels.tolist() == rows["esci_pred"].tolist()
        micro = float(np.mean(rows["esci_pred"] == rows["esci_label"]))
        assert micro == pytest.approx(entry["stacker"]["task2_micro_f1"])


def test_loaded_model_scores_with_the_stacker(stacked, small_splits):
    result, root, _ = stacked
    reranker = Reranker.from_pretrained(root / "model")
    assert reranker.stacker is not None
    frame = pd.read_parquet(small_splits / "test.parquet")
    preds = reranker.predict_frame(frame, progress=False)
    # the same as the stacker on the features of the cross-encoder's outputs
    plain = Reranker.from_pretrained(root / "model", stacked=False)
    assert plain.stacker is None
    from esci_reranker.stack.outputs import frame_outputs

    ce = frame_outputs(plain, frame)
    np.testing.assert_allclose(preds.regression_scores, ce["ce_score"], rtol=1e-5, atol=1e-6)
    table = stack_table(frame, {c: ce[c].to_numpy() for c in ce.columns if c.startswith("ce_")})
    direct = reranker.stacker.predict(table)
    np.testing.assert_allclose(preds.scores, direct["score"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(preds.esci_probs, direct["probs"], rtol=1e-5, atol=1e-6)
    assert preds.substitute_threshold == reranker.stacker.rules.substitute_threshold
    assert reranker.info()["stacker"]["rounds"] == result.rounds
    assert reranker.info()["stacker"]["bags"] == len(reranker.stacker.boosters["ranker"].members) == 2


def test_rerank_applies_the_decision_rules(stacked):
    _, root, _ = stacked
    reranker = Reranker.from_pretrained(root / "model")
    candidates = [
        {"product_id": "a", "title": "Nike running shoe", "brand": "Nike", "color": "Red"},
        {"product_id": "b", "title": "Shoe polish kit"},
        ("c", "Red running socks"),
    ]
    reranker.stacker.rules.class_offsets = [0.0, 0.0, 100.0, 0.0]  # everything becomes C
    reranker.stacker.rules.substitute_threshold = 0.0  # everything is a substitute
    ranked = reranker.rerank("red running shoes", candidates)
    assert {r.esci_class for r in ranked} == {"C"}
    assert all(r.is_substitute for r in ranked)
    reranker.stacker.rules.substitute_threshold = 1.0 + 1e-9
    assert not any(r.is_substitute for r in reranker.rerank("red running shoes", candidates))


def test_service_answers_with_the_rules(stacked, monkeypatch):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from esci_reranker.serve import create_app, load_settings
    from esci_reranker.serve.settings import Settings

    for name in Settings.model_fields:  # the developer's API_KEY, RATE_LIMIT, ... stay out
        monkeypatch.delenv(name.upper(), raising=False)
    _, root, _ = stacked
    reranker = Reranker.from_pretrained(root / "model", device="cpu")
    reranker.stacker.rules.class_offsets = [0.0, 0.0, 0.0, 100.0]  # everything becomes I
    reranker.stacker.rules.substitute_threshold = 0.0
    body = {
        "query": "red running shoes",
        "candidates": [
            {"product_id": "a", "title": "Nike running shoe", "brand": "Nike"},
            {"product_id": "b", "text": "Shoe polish kit"},
        ],
    }
    for batching in (0, 5):  # the direct path and the dynamic batcher
        app = create_app(load_settings(batch_wait_ms=batching, cache_size=0), reranker)
        with TestClient(app) as client:
            check_answers(client, reranker, body)


def check_answers(client, reranker, body):
    """/classify and /substitute follow the rules; /rerank orders as ``Reranker.rerank`` does."""
    classified = client.post("/classify", json=body).json()["results"]
    assert [r["esci_class"] for r in classified] == ["I", "I"]
    subs = client.post("/substitute", json=body).json()["results"]
    assert [r["is_substitute"] for r in subs] == [True, True]
    ranked = client.post("/rerank", json=body).json()["ranked"]
    direct = reranker.rerank(body["query"], body["candidates"])
    assert [r["product_id"] for r in ranked] == [r.product_id for r in direct]
    assert [r["score"] for r in ranked] == pytest.approx([r.score for r in direct], rel=1e-5)


def test_a_checkpoint_without_a_stacker_loads_as_before(tiny_prior_checkpoint):
    reranker = Reranker.from_pretrained(tiny_prior_checkpoint)
    assert reranker.stacker is None
    assert reranker.info()["stacker"] is None
    preds = reranker.predict([("red shoes", "Nike Air | Nike | Red")])
    assert preds.substitute_threshold == 0.5


def test_stacked_checkpoint_refuses_the_onnx_backend_with_a_clear_error(stacked):
    from esci_reranker.reranker import _load_stacker

    _, root, _ = stacked
    config = Reranker.from_pretrained(root / "model", stacked=False).config
    with pytest.raises(CheckpointError, match="runs on the torch backend"):
        _load_stacker(root / "model", "onnx", config)
    assert isinstance(_load_stacker(root / "model", "torch", config), Stacker)


def test_config_rejects_a_stacker_without_the_heads_it_reads():
    with pytest.raises(ConfigError, match=r"model\.stacker: gbdt reads the cross-encoder"):
        load_config(None, ["model.stacker=gbdt", "model.type=single_task"])


def test_soup_final_model_is_the_mean_of_the_fold_models(tmp_path, small_splits, tiny_backbone):
    from safetensors.torch import load_file

    from esci_reranker.model.config import WEIGHTS_NAME
    from esci_reranker.train.cv import fold_model_dir

    cfg = load_config(
        None,
        [
            f"model.backbone={tiny_backbone}",
            *STACKED,
            "stack.final_model=soup",
            f"data.dir={small_splits}",
            f"output.save_path={tmp_path / 'model'}",
        ],
    )
    lines: list[str] = []
    train_stacked(cfg, progress=False, log=lines.append)
    assert any("mean of the 2 fold models" in line for line in lines)
    assert not (tmp_path / "train" / "train_all.parquet").exists()  # no fifth training
    folds = [load_file(fold_model_dir(tmp_path / "train" / "folds", f, 0) / WEIGHTS_NAME) for f in (0, 1)]
    soup = load_file(tmp_path / "model" / WEIGHTS_NAME)
    assert any(not torch.equal(folds[0][n], folds[1][n]) for n in soup)  # the folds trained apart
    for name, tensor in soup.items():
        torch.testing.assert_close(tensor, (folds[0][name] + folds[1][name]) / 2, rtol=0, atol=1e-6)
    reranker = Reranker.from_pretrained(tmp_path / "model")
    assert reranker.stacker is not None
    assert len(reranker.rerank("red running shoes", [("a", "Red running shoe"), ("b", "Shoe polish")])) == 2


def test_the_trees_read_every_product_field_though_the_training_held_fewer(stacked, small_splits, tmp_path):
    """``train_stacked`` keeps the training columns while its cross-encoders train; its trees
    still learn from every field (``stack_frame`` reads them again): their CV is the one the
    whole table gives."""
    from esci_reranker.stack.train import cross_validate_trees, stack_frame
    from esci_reranker.train.loop import read_train_val, training_frame

    _result, root, _ = stacked
    trained = pd.read_parquet(root / "train" / "train_all.parquet")
    assert "product_description" not in trained.columns
    cfg = load_config(None, [*STACKED, "stack.bags=2", f"data.dir={small_splits}"])  # as `stacked`
    full = read_train_val(small_splits)
    assert full["product_description"].str.len().gt(0).any()
    slim = training_frame(full, cfg.model.text_fields)
    pd.testing.assert_frame_equal(stack_frame(cfg, slim), full)
    assert stack_frame(cfg, full) is full
    oof = pd.read_parquet(root / "train" / "folds" / "oof.parquet")
    again = cross_validate_trees(cfg, full, oof, tmp_path, (0,), ("bm25", "bi-encoder"), lambda _: None)
    recorded = json.loads((root / "train" / "folds" / "stack_cv.json").read_text())["entries"]
    assert [e["stacker"] for e in again.entries] == [e["stacker"] for e in recorded]
    # and not the one the training columns alone would give
    alone = cross_validate_trees(
        cfg, slim, oof, tmp_path / "slim", (0,), ("bm25", "bi-encoder"), lambda _: None
    )
    assert [e["stacker"] for e in alone.entries] != [e["stacker"] for e in recorded]
    # the splits changed under a running training: said, not trained on
    changed = tmp_path / "changed"
    changed.mkdir()
    train = pd.read_parquet(small_splits / "train.parquet")
    train.iloc[1:].to_parquet(changed / "train.parquet")
    pd.read_parquet(small_splits / "val.parquet").to_parquet(changed / "val.parquet")
    moved = load_config(None, [*STACKED, f"data.dir={changed}"])
    with pytest.raises(ValueError, match="changed while the stacked model trained"):
        stack_frame(moved, slim)


def test_a_pointwise_ranker_reads_no_list_feature_and_the_classes_keep_theirs():
    """``stack.rank_features: pointwise``: the ranker's score of a pair does not depend on the
    list it is in; the class and substitute trees still read every feature."""
    from esci_reranker.stack.features import is_list_relative
    from esci_reranker.stack.train import fit_config_stacker, rank_features
    from tests.stack.test_stacker import synthetic_table

    table = synthetic_table(queries=12, per_query=8)
    # a list-relative column: the 'signal' rank within its query
    table["ce_score_rank"] = table.groupby("query_id")["signal"].rank(ascending=False)
    assert is_list_relative("ce_score_rank")
    names = ["signal", "noise", "ce_score_rank"]
    options = ["stack.max_rounds=30", "stack.inner_folds=3", "stack.min_data_in_leaf=5"]
    pointwise = load_config(None, [*STACKED, *options, "stack.rank_features=pointwise"])
    assert rank_features(pointwise, names) == ["signal", "noise"]
    assert rank_features(load_config(None, [*STACKED, *options]), names) == names
    stacker = fit_config_stacker(pointwise, table[["query_id", "product_id", "esci_label", *names]], seed=0)
    assert stacker.features_of("ranker") == ["signal", "noise"]
    assert stacker.features_of("classifier") == names == stacker.features_of("substitute")
    # the same pair scores the same in another list (its rank there differs)
    moved = table.assign(ce_score_rank=1.0)
    np.testing.assert_allclose(stacker.predict(moved)["score"], stacker.predict(table)["score"])
    with pytest.raises(ConfigError):
        load_config(None, [*STACKED, "stack.rank_features=listwise"])


def test_features_excluded_from_the_class_trees_stay_with_the_ranker():
    """``stack.class_exclude_features``: the ranker reads the named columns, the class and
    substitute trees do not (so their labels cannot depend on them); an unknown name is refused."""
    from esci_reranker.stack.train import class_features, fit_config_stacker, is_stack_feature
    from tests.stack.test_stacker import synthetic_table

    table = synthetic_table(queries=12, per_query=8)
    table["ce_p_I_rank"] = table.groupby("query_id")["signal"].rank(ascending=False)
    names = ["signal", "noise", "ce_p_I_rank"]
    options = ["stack.max_rounds=30", "stack.inner_folds=3", "stack.min_data_in_leaf=5"]
    cfg = load_config(None, [*STACKED, *options, "stack.class_exclude_features=[ce_p_I_rank,ce_p_I_z]"])
    # ce_p_I_z is not in this table but a list feature a table can have: accepted, nothing to drop
    assert class_features(cfg, names) == ["signal", "noise"]
    stacker = fit_config_stacker(cfg, table[["query_id", "product_id", "esci_label", *names]], seed=0)
    assert stacker.features_of("ranker") == names
    assert stacker.features_of("classifier") == ["signal", "noise"] == stacker.features_of("substitute")
    # the labels do not move with the excluded column; the ranker reads it
    moved = table.assign(ce_p_I_rank=1.0)
    before, after = stacker.predict(table), stacker.predict(moved)
    np.testing.assert_allclose(after["probs"], before["probs"])
    assert not np.allclose(after["score"], before["score"])
    assert is_stack_feature("ce_p_I_gap")
    assert is_stack_feature("ce_p_S")
    assert not is_stack_feature("ce_p_X_rank")
    typo = load_config(None, [*STACKED, "stack.class_exclude_features=[ce_p_I_rnak]"])
    with pytest.raises(ValueError, match=r"stack.class_exclude_features: \['ce_p_I_rnak'\]"):
        class_features(typo, names)


def test_the_default_ranker_reads_the_list_features_of_p_i_and_its_labels_do_not():
    """configs/multi_task.yaml: P(I)'s rank, z-score and gap are list features of every table,
    read by the ranker alone."""
    from esci_reranker.stack.features import LIST_SCORES, is_list_relative
    from esci_reranker.stack.train import class_features, rank_features

    cfg = load_config(Path("configs/multi_task.yaml"))
    listed = [f"ce_p_I_{kind}" for kind in ("rank", "z", "gap")]
    assert "ce_p_I" in LIST_SCORES
    assert all(is_list_relative(n) for n in listed)
    names = ["ce_score", "ce_p_I", "ce_score_rank", *listed]
    assert rank_features(cfg, names) == names
    assert class_features(cfg, names) == ["ce_score", "ce_p_I", "ce_score_rank"]
