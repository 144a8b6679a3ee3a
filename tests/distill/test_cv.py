"""Students cross-validated against the teacher's out-of-fold outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import esci_reranker.distill.student as student_module
from esci_reranker.distill import (
    DISTILL_CV_MODELS,
    cross_validate_student,
    load_distill_config,
    teacher_oof_table,
)
from esci_reranker.distill.cv import teacher_run
from esci_reranker.distill.data import read_labelled_and_test
from esci_reranker.distill.teacher import PROB_COLUMNS, TEACHER_COLUMNS
from esci_reranker.eval.evaluator import evaluate_run
from esci_reranker.stack.cv import cv_summary
from esci_reranker.stack.stacker import STACKER_DIR, Stacker
from esci_reranker.train.cv import fold_model_dir


@pytest.fixture(scope="module")
def splits(distill_data: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return read_labelled_and_test(distill_data)


def test_cross_encoder_teacher_table_is_the_oof_columns(splits, oof_parquet: Path):
    frame, _ = splits
    oof = pd.read_parquet(oof_parquet)
    table = teacher_oof_table(frame, oof, stacker=None, seed=0)
    assert len(table) == len(frame)
    assert set(TEACHER_COLUMNS) <= set(table.columns)
    merged = table.merge(oof, on=["query_id", "product_id"], suffixes=("", "_oof"))
    np.testing.assert_allclose(merged["t_score"], merged["ce_score"])
    np.testing.assert_allclose(merged["t_prob_S"], merged["ce_p_S"])  # no rules: the raw probabilities
    assert (merged["t_threshold"] == 0.5).all()
    with pytest.raises(ValueError, match="no rows for seed 3"):
        teacher_oof_table(frame, oof, seed=3)


def test_stacked_teacher_outputs_of_a_fold_never_come_from_trees_that_saw_it(
    splits, oof_parquet: Path, stacked_teacher: Path
):
    frame, _ = splits
    oof = pd.read_parquet(oof_parquet)
    stacker = Stacker.load(stacked_teacher / STACKER_DIR)
    table = teacher_oof_table(frame, oof, stacker, seed=0)
    assert len(table) == len(frame)
    assert not table.duplicated(["query_id", "product_id"]).any()
    # the rules' offsets are applied: the class is the argmax of the adjusted probabilities
    assert (table[list(PROB_COLUMNS)].to_numpy().argmax(1) == table["t_class"].map("ESCI".index)).all()
    # the proof: change every label of fold 0; fold 0's teacher outputs stay as they were, since
    # the trees that score fold 0 were fitted on fold 1 only (fold 1's outputs do change)
    fold0 = set(oof.loc[oof["fold"] == 0, "query_id"])
    relabelled = frame.copy()
    shift = {"E": "I", "S": "C", "C": "S", "I": "E"}
    relabelled.loc[relabelled["query_id"].isin(fold0), "esci_label"] = relabelled["esci_label"].map(shift)
    again = teacher_oof_table(relabelled, oof, stacker, seed=0)
    key = ["query_id", "product_id"]
    before = table.set_index(key).sort_index()
    after = again.set_index(key).sort_index()
    in_fold0 = before.index.get_level_values("query_id").isin(fold0)
    pd.testing.assert_frame_equal(before[in_fold0], after[in_fold0])
    assert not np.allclose(before.loc[~in_fold0, "t_score"], after.loc[~in_fold0, "t_score"])


def test_cross_validation_trains_without_the_held_out_fold_and_scores_both(
    splits, oof_parquet: Path, tiny_student_overrides: list[str], monkeypatch: pytest.MonkeyPatch
):
    frame, test = splits
    table = teacher_oof_table(frame, pd.read_parquet(oof_parquet), stacker=None, seed=0)
    calls: list[tuple[set, set, set]] = []
    real = student_module.train_student

    def recording(cfg, train, val, **kwargs):
        calls.append((set(train["query_id"]), set(val["query_id"]), set(train["product_id"])))
        return real(cfg, train, val, **kwargs)

    monkeypatch.setattr(student_module, "train_student", recording)
    cfg = load_distill_config("configs/distill_esci.yaml", tiny_student_overrides)
    with pytest.raises(
        ValueError, match=r"model.init=teacher: no cross-encoder checkpoint for fold\(s\) \[0, 1\]"
    ):
        cross_validate_student(table, frame, cfg, seeds=(0,), test=test, log=lambda _line: None)
    encoders = {f: fold_model_dir(oof_parquet.parent, f, 0) for f in (0, 1)}
    entries = cross_validate_student(
        table, frame, cfg, seeds=(0, 1), test=test, log=lambda _line: None, fold_encoders=encoders
    )
    assert [(e["fold"], e["seed"]) for e in entries] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for entry, (trained, validated, products) in zip(entries, calls, strict=True):
        held_out = set(table.loc[table["fold"] == entry["fold"], "query_id"])
        assert not (trained | validated) & held_out  # the held-out fold never trains or stops the student
        assert not trained & validated
        assert not products & set(test["product_id"])  # nor does the test split
        assert {"ndcg", "task2_micro_f1", "task2_macro_f1"} <= set(entry["student"])
        # the teacher's numbers are its out-of-fold outputs on the fold, evaluated as any run
        rows = frame.merge(table[table["fold"] == entry["fold"]], on=["query_id", "product_id"])
        metrics = evaluate_run(teacher_run(rows))
        assert entry["teacher"]["ndcg"] == pytest.approx(metrics["task1"]["ndcg"])
        assert entry["teacher"]["task2_micro_f1"] == pytest.approx(metrics["task2"]["micro_f1"])
    summary = cv_summary(entries, models=DISTILL_CV_MODELS)
    assert list(summary["overall"]) == ["student", "teacher"]
    assert summary["overall"]["student"]["ndcg"]["mean"] == pytest.approx(
        np.mean([e["student"]["ndcg"] for e in entries])
    )


def test_the_untrained_student_is_never_the_kept_one(
    splits, oof_parquet: Path, tiny_student_overrides: list[str], monkeypatch: pytest.MonkeyPatch
):
    """Even when its validation loss is the lowest (an overfitting seed in CV did this)."""
    frame, _test = splits
    table = teacher_oof_table(frame, pd.read_parquet(oof_parquet), stacker=None, seed=0)
    data = frame.merge(table, on=["query_id", "product_id"]).assign(source="labelled")
    val_ids = set(data["query_id"].unique()[:2])
    calls: list[int] = []

    def worse_after_training(*_args, **_kwargs):
        calls.append(len(calls))
        return {"val_loss": 0.0 if len(calls) == 1 else 1.0 + len(calls)}  # step 0 lowest, then rising

    monkeypatch.setattr(student_module, "_validate", worse_after_training)
    cfg = load_distill_config("configs/distill_score.yaml", [*tiny_student_overrides, "model.init=backbone"])
    result = student_module.train_student(
        cfg, data[~data["query_id"].isin(val_ids)], data[data["query_id"].isin(val_ids)],
        ("title",), 300, progress=False,
    )  # fmt: skip
    assert result.history[0]["step"] == 0
    assert result.best_step == 2  # the first trained validation, not the untrained student
    assert result.best_val_loss == pytest.approx(3.0)


def test_each_folds_unlabelled_pairs_come_from_the_other_folds_scored_by_that_folds_teacher(
    splits, oof_parquet: Path, stacked_teacher: Path, tiny_student_overrides: list[str], tmp_path: Path
):
    from esci_reranker.distill.cv import fold_unlabelled_outputs, teacher_oof_and_stackers
    from esci_reranker.model import save_checkpoint
    from tests.conftest import build_tiny_model

    frame, test = splits
    stacker = Stacker.load(stacked_teacher / STACKER_DIR)
    table, stackers = teacher_oof_and_stackers(frame, pd.read_parquet(oof_parquet), stacker, seed=0)
    assert sorted(stackers) == [0, 1]
    cfg = load_distill_config("configs/distill_score.yaml", tiny_student_overrides)
    models = {f: fold_model_dir(oof_parquet.parent, f, 0) for f in (0, 1)}
    lines: list[str] = []
    first = fold_unlabelled_outputs(
        table, frame, cfg, models, stackers, tmp_path, "k", test, log=lines.append
    )
    for fold, rows in first.items():
        others = frame[frame["query_id"].isin(set(table.loc[table["fold"] != fold, "query_id"]))]
        assert len(rows)
        assert (rows["source"] == "unlabelled").all()
        assert rows["esci_label"].isna().all()
        assert set(rows["query_id"]) <= set(others["query_id"])  # nothing of the fold itself
        assert set(rows["product_id"]) <= set(others["product_id"])
        assert not set(rows["product_id"]) & set(test["product_id"])
        assert not rows.merge(others, on=["query_id", "product_id"]).size  # never a labelled pair
        assert np.isfinite(rows[["t_score", *PROB_COLUMNS]].to_numpy(float)).all()
        assert (rows["t_threshold"] == stackers[fold].rules.substitute_threshold).all()
    # cached: the same call reads the scores back
    again = fold_unlabelled_outputs(
        table, frame, cfg, models, stackers, tmp_path, "k", test, log=lines.append
    )
    assert sum("read from" in line for line in lines) == 2
    for fold in (0, 1):
        pd.testing.assert_frame_equal(first[fold], again[fold])
    # the proof that fold f's own teacher scores them: another cross-encoder for fold 1 changes
    # fold 1's outputs (and is scored afresh), fold 0's stay
    other, tokenizer = build_tiny_model(prior="cosine", lexical=True, seed=11)
    models[1] = save_checkpoint(other, tokenizer, tmp_path / "other")
    swapped = fold_unlabelled_outputs(
        table, frame, cfg, models, stackers, tmp_path, "k", test, log=lines.append
    )
    pd.testing.assert_frame_equal(first[0], swapped[0])
    assert not np.allclose(first[1]["t_score"], swapped[1]["t_score"])
    with pytest.raises(FileNotFoundError, match="fold 0: no cross-encoder checkpoint"):
        fold_unlabelled_outputs(table, frame, cfg, {1: models[1]}, stackers, tmp_path, "k", test)


def test_each_folds_retrieved_pairs_skip_the_folds_own_products(
    splits, oof_parquet: Path, tiny_student_overrides: list[str], tmp_path: Path
):
    from esci_reranker.distill.cv import fold_unlabelled_outputs

    frame, test = splits
    table = teacher_oof_table(frame, pd.read_parquet(oof_parquet), stacker=None, seed=0)
    cfg = load_distill_config(
        "configs/distill_score.yaml", [*tiny_student_overrides, "data.retrieved_share=0.4"]
    )
    models = {f: fold_model_dir(oof_parquet.parent, f, 0) for f in (0, 1)}
    # one catalogue for every fold: each list starts with test products and every fold's products
    ranked = [*test["product_id"].astype(str).unique(), *frame["product_id"].astype(str).unique()]
    lists = dict.fromkeys(frame["query_id"].unique(), ranked)
    out = fold_unlabelled_outputs(
        table, frame, cfg, models, {}, tmp_path, "k", test, log=lambda _l: None, retrieved=lists
    )
    for fold, rows in out.items():
        others = frame[frame["query_id"].isin(set(table.loc[table["fold"] != fold, "query_id"]))]
        assert set(rows["product_id"]) <= set(others["product_id"])
        assert not set(rows["product_id"]) & set(test["product_id"])
        assert "draw" not in rows.columns


def test_each_folds_synthetic_queries_are_made_from_and_search_the_other_folds_products(
    splits, oof_parquet: Path, tiny_student_overrides: list[str], tmp_path: Path
):
    from esci_reranker.distill.cv import fold_unlabelled_outputs
    from esci_reranker.distill.data import SYNTHETIC, normalise_query, title_words

    frame, test = splits
    table = teacher_oof_table(frame, pd.read_parquet(oof_parquet), stacker=None, seed=0)
    overrides = [*tiny_student_overrides, "data.synthetic_queries=6", "data.synthetic_per_query=3"]
    cfg = load_distill_config("configs/distill_score.yaml", overrides)
    models = {f: fold_model_dir(oof_parquet.parent, f, 0) for f in (0, 1)}
    out = fold_unlabelled_outputs(table, frame, cfg, models, {}, tmp_path, "k", test, log=lambda _l: None)
    for fold, rows in out.items():
        others = frame[frame["query_id"].isin(set(table.loc[table["fold"] != fold, "query_id"]))]
        synthetic = rows[rows["source"] == SYNTHETIC]
        assert synthetic["query_id"].nunique() == 6
        assert set(synthetic["product_id"]) <= set(others["product_id"])  # nothing of the fold
        # each query's words come from a title of the other folds' products
        words = {w for t in others["product_title"] for w in title_words(t)}
        assert all(set(q.split()) <= words for q in synthetic["query"].map(normalise_query))
        assert not set(synthetic["query"].map(normalise_query)) & set(test["query"].map(normalise_query))
        assert np.isfinite(synthetic["t_score"].to_numpy(float)).all()
        assert not set(synthetic["query_id"]) & set(frame["query_id"])


def test_cross_validation_adds_each_folds_unlabelled_pairs_to_its_students_training(
    splits,
    oof_parquet: Path,
    tiny_student_overrides: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    from esci_reranker.distill.cv import fold_unlabelled_outputs

    frame, test = splits
    table = teacher_oof_table(frame, pd.read_parquet(oof_parquet), stacker=None, seed=0)
    cfg = load_distill_config("configs/distill_score.yaml", [*tiny_student_overrides, "model.init=backbone"])
    models = {f: fold_model_dir(oof_parquet.parent, f, 0) for f in (0, 1)}
    unlabelled = fold_unlabelled_outputs(
        table, frame, cfg, models, {}, tmp_path, "k", test, log=lambda _l: None
    )
    seen: list[pd.DataFrame] = []
    real = student_module.train_student

    def recording(cfg, train, val, **kwargs):
        seen.append(pd.concat([train, val]))
        return real(cfg, train, val, **kwargs)

    monkeypatch.setattr(student_module, "train_student", recording)
    entries = cross_validate_student(
        table, frame, cfg, seeds=(0,), test=test, log=lambda _line: None, unlabelled=unlabelled
    )
    for entry, pairs in zip(entries, seen, strict=True):
        fold = entry["fold"]
        extra = pairs[pairs["source"] == "unlabelled"]
        assert len(extra) == len(unlabelled[fold])
        assert set(zip(extra["query_id"], extra["product_id"], strict=True)) == set(
            zip(unlabelled[fold]["query_id"], unlabelled[fold]["product_id"], strict=True)
        )
        assert not set(pairs["query_id"]) & set(table.loc[table["fold"] == fold, "query_id"])
    # a fold's unlabelled pairs holding that fold's queries are refused, not trained on
    wrong = {0: unlabelled[1], 1: unlabelled[0]}
    with pytest.raises(ValueError, match="fold 0: its unlabelled pairs hold the fold's own queries"):
        cross_validate_student(
            table, frame, cfg, seeds=(0,), test=test, log=lambda _line: None, unlabelled=wrong
        )
