"""Cross-validation over query folds."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from esci_reranker.train.config import load_config
from esci_reranker.train.cv import cross_validate, query_folds


def test_query_folds_are_disjoint_cover_every_query_and_are_seeded():
    ids = np.repeat(np.arange(10), 3)
    folds = query_folds(ids, 3)
    assert sorted(len(f) for f in folds) == [3, 3, 4]
    assert set().union(*folds) == set(range(10))
    assert sum(len(f) for f in folds) == 10
    assert folds == query_folds(ids, 3)
    assert folds != query_folds(ids, 3, seed=7)


def test_query_folds_reject_too_few_queries_or_folds():
    with pytest.raises(ValueError, match="at least 2"):
        query_folds(np.arange(5), 1)
    with pytest.raises(ValueError, match="3 queries cannot make 4 folds"):
        query_folds(np.arange(3), 4)


def test_cross_validate_trains_each_fold_without_a_test_split(tmp_path, small_splits, tiny_backbone):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train", "val"):  # no test.parquet: cross-validation must not need one
        shutil.copy(small_splits / f"{name}.parquet", data / f"{name}.parquet")
    cfg = load_config(
        None,
        [f"model.backbone={tiny_backbone}", "model.max_length=32", "optim.max_steps=2", "eval.every_steps=1"],
    )
    result = cross_validate(cfg, data, tmp_path / "cv", folds=3, seeds=(0, 1))
    assert [(r.fold, r.seed) for r in result.runs] == [(f, s) for f in range(3) for s in (0, 1)]
    saved = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert saved["summary"]["runs"] == 6
    assert saved["summary"]["mean"] == pytest.approx(np.mean([r.best_metric for r in result.runs]))
    for run in result.runs:
        assert run.best_metric >= run.start_metric  # the untrained model is the floor
