"""The LightGBM stacker: fitting with inner query folds, predicting, saving and loading."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from esci_reranker.labels import ESCI_LABELS
from esci_reranker.stack.stacker import (
    BAG_SEED_STEP,
    GBDTParams,
    Stacker,
    feature_columns,
    fit_stacker,
    inner_query_folds,
)

SMALL = GBDTParams(
    max_rounds=40, learning_rate=0.3, min_data_in_leaf=5, inner_folds=3, num_leaves=4, lambda_l2=0.0
)


def synthetic_table(queries: int = 24, per_query: int = 10, seed: int = 0) -> pd.DataFrame:
    """Labels that follow a 'signal' feature (E high, I low) plus a pure-noise feature."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(queries):
        for p in range(per_query):
            label = "ESCI"[rng.integers(4)]
            signal = {"E": 3.0, "S": 2.0, "C": 1.0, "I": 0.0}[label] + rng.normal(0, 0.3)
            rows.append(
                {
                    "query_id": q,
                    "product_id": f"p{q}-{p}",
                    "esci_label": label,
                    "signal": signal,
                    "noise": rng.normal(),
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def fitted() -> tuple[Stacker, dict, pd.DataFrame]:
    table = synthetic_table()
    stacker, oof = fit_stacker(table, SMALL)
    return stacker, oof, table


def test_feature_columns_leave_out_ids_labels_and_excluded():
    table = synthetic_table(2, 2).assign(fold=0, esci_query_source="other")
    assert feature_columns(table) == ["signal", "noise"]
    assert feature_columns(table, exclude=["noise"]) == ["signal"]


def test_inner_folds_are_query_disjoint_and_cover_every_row():
    groups = np.repeat(np.arange(7), 3)
    folds = inner_query_folds(groups, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(21))
    for a in range(3):
        for b in range(a + 1, 3):
            assert not set(groups[folds[a]]) & set(groups[folds[b]])
    with pytest.raises(ValueError, match="7 queries cannot make 8 inner folds"):
        inner_query_folds(groups, 8, seed=0)


def test_fit_learns_the_signal_for_all_three_tasks(fitted):
    stacker, oof, table = fitted
    out = stacker.predict(table)
    labels = table["esci_label"].to_numpy()
    # the ranker orders E above I; the classifier recovers the class from the signal
    assert out["score"][labels == "E"].mean() > out["score"][labels == "I"].mean()
    assert np.mean(np.array(list("ESCI"))[out["classes"]] == labels) > 0.8
    np.testing.assert_allclose(out["probs"].sum(axis=1), 1.0, rtol=1e-6)
    assert out["substitute_prob"][labels == "S"].mean() > out["substitute_prob"][labels != "S"].mean()
    # the rounds came from the inner CV and the out-of-fold predictions cover every row
    assert set(stacker.rounds) == {"ranker", "classifier", "substitute"}
    assert all(1 <= r <= SMALL.max_rounds for r in stacker.rounds.values())
    assert oof["probs"].shape == (len(table), 4)
    assert oof["score"].shape == (len(table),)
    assert stacker.feature_names == ["signal", "noise"]


def test_save_load_round_trip_predicts_the_same(fitted, tmp_path):
    stacker, _, table = fitted
    folder = stacker.save(tmp_path / "stacker")
    assert sorted(p.name for p in folder.iterdir()) == [
        "classifier.txt",
        "ranker.txt",
        "stacker.json",
        "substitute.txt",
    ]
    loaded = Stacker.load(folder)
    a, b = stacker.predict(table), loaded.predict(table)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert loaded.rules == stacker.rules
    assert loaded.rounds == stacker.rounds
    # a missing feature column is treated as missing values, not an error
    partial = loaded.predict(table.drop(columns=["noise"]))
    np.testing.assert_array_equal(partial["score"], loaded.predict(table.assign(noise=np.nan))["score"])


def test_load_names_what_is_wrong(fitted, tmp_path):
    stacker, _, _ = fitted
    folder = stacker.save(tmp_path / "stacker")
    manifest = json.loads((folder / "stacker.json").read_text())
    (folder / "stacker.json").write_text(json.dumps(manifest | {"feature_names": ["signal", "other"]}))
    with pytest.raises(ValueError, match=r"ranker\.txt: its features differ"):
        Stacker.load(folder)
    (folder / "stacker.json").write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        Stacker.load(folder)
    (folder / "stacker.json").write_text(json.dumps(manifest))
    (folder / "substitute.txt").unlink()
    with pytest.raises(ValueError, match=r"substitute\.txt: missing"):
        Stacker.load(folder)
    with pytest.raises(ValueError, match="cannot read the stacker manifest"):
        Stacker.load(tmp_path / "nowhere")


def test_named_columns_predict_like_the_frame(fitted):
    """The serving path passes ``feature_arrays`` (a dict) instead of a frame: same outputs,
    a missing column still counts as missing values, and a large table (several threads)
    predicts like a request-sized one (one thread)."""
    stacker, _, table = fitted
    columns = {name: table[name].to_numpy() for name in ("signal", "noise")}
    a, b = stacker.predict(table), stacker.predict(columns)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    partial = stacker.predict({"signal": columns["signal"]})
    np.testing.assert_array_equal(partial["score"], stacker.predict(table.assign(noise=np.nan))["score"])
    big = pd.concat([table] * 12, ignore_index=True)  # > 2048 rows: LightGBM's own thread count
    np.testing.assert_allclose(stacker.predict(big)["score"][: len(table)], a["score"], rtol=1e-12)


def test_inner_folds_fitted_side_by_side_give_the_sequential_trees(monkeypatch):
    """The inner-fold boosters train on threads (one a core); each is single-threaded and
    deterministic, so the trees, rounds, curves and out-of-fold predictions are those of one
    fold after the other."""
    from esci_reranker.stack import stacker as stacker_module

    table = synthetic_table(seed=3)
    fits = {}
    for workers in (1, 3):
        monkeypatch.setattr(stacker_module, "tree_workers", lambda workers=workers: workers)
        fits[workers] = fit_stacker(table, SMALL)
    (one, oof_one), (many, oof_many) = fits[1], fits[3]
    assert set(one.boosters) == set(many.boosters) == {"ranker", "classifier", "substitute"}
    for task, bag in one.boosters.items():
        assert [m.model_to_string() for m in bag.members] == [
            m.model_to_string() for m in many.boosters[task].members
        ], task
    assert one.rounds == many.rounds
    for key, value in oof_one.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(oof_many[key]), err_msg=key)


def test_a_bag_predicts_the_mean_of_fits_with_other_seeds_and_saves_every_member(tmp_path):
    """``bags=3``: each task is three fits, with seeds ``seed``, ``seed + BAG_SEED_STEP``, ...;
    it predicts their mean, the rules are fitted on the mean of their out-of-fold predictions,
    and the folder holds and reloads every member."""
    from dataclasses import replace

    table = synthetic_table(seed=5)
    params = replace(SMALL, seed=7, bags=3)
    bagged, oof = fit_stacker(table, params)
    single = [fit_stacker(table, replace(SMALL, seed=7 + BAG_SEED_STEP * i)) for i in range(3)]
    x = bagged.matrix(table)
    for task in ("ranker", "classifier", "substitute"):
        members = bagged.boosters[task].members
        assert len(members) == 3
        # the members are the single fits of those seeds, and they differ from each other
        strings = [m.model_to_string() for m in members]
        assert strings == [s.boosters[task].members[0].model_to_string() for s, _ in single]
        assert len(set(strings)) == 3
        np.testing.assert_allclose(
            bagged.boosters[task].predict(x), np.mean([m.predict(x) for m in members], axis=0), rtol=1e-12
        )
    np.testing.assert_allclose(oof["probs"], np.mean([o["probs"] for _, o in single], axis=0), rtol=1e-12)
    out = bagged.predict(table)
    np.testing.assert_allclose(out["probs"].sum(axis=1), 1.0, rtol=1e-9)
    assert bagged.info["member_rounds"]["ranker"] == [s.rounds["ranker"] for s, _ in single]

    folder = bagged.save(tmp_path / "stacker")
    assert {p.name for p in folder.iterdir()} == {"stacker.json"} | {
        name
        for task in ("ranker", "classifier", "substitute")
        for name in (f"{task}.txt", f"{task}.1.txt", f"{task}.2.txt")
    }
    assert json.loads((folder / "stacker.json").read_text())["format_version"] == 3
    loaded = Stacker.load(folder)
    assert loaded.params.bags == 3
    again = loaded.predict(table)
    for key in out:
        np.testing.assert_array_equal(out[key], again[key])
    (folder / "classifier.2.txt").unlink()
    with pytest.raises(ValueError, match=r"classifier\.2\.txt: missing; .* a bag of 3 booster\(s\)"):
        Stacker.load(folder)
    with pytest.raises(ValueError, match="bags=0; expected at least 1"):
        fit_stacker(table, replace(SMALL, bags=0))


def test_a_folder_written_before_bags_loads_as_a_bag_of_one(fitted, tmp_path):
    stacker, _, table = fitted
    folder = stacker.save(tmp_path / "stacker")
    manifest = json.loads((folder / "stacker.json").read_text())
    del manifest["params"]["bags"]
    (folder / "stacker.json").write_text(json.dumps(manifest | {"format_version": 2}))
    loaded = Stacker.load(folder)
    assert loaded.params.bags == 1
    assert len(loaded.boosters["ranker"]) == 1
    np.testing.assert_array_equal(loaded.predict(table)["score"], stacker.predict(table)["score"])


def test_the_irrelevant_recall_floor_binds_the_rules_on_the_inner_out_of_fold_rows(tmp_path):
    """``min_irrelevant_recall``: the Task 2 offsets label I at least that share of the I rows of
    the predictions they are fitted on (the inner out-of-fold ones), and travel with the model."""
    table = synthetic_table(queries=30, per_query=10, seed=4)
    # the signal barely tells I from the rest, so F1 alone labels few rows I
    table["signal"] += np.random.default_rng(5).normal(0, 1.5, len(table))
    is_i = (table["esci_label"] == "I").to_numpy()

    def recall(stacker: Stacker, probs: np.ndarray) -> float:
        return float((stacker.rules.classes(probs)[is_i] == ESCI_LABELS.index("I")).mean())

    free, free_oof = fit_stacker(table, SMALL, task2_objective="micro_f1")
    floored, oof = fit_stacker(table, SMALL, task2_objective="micro_f1", min_irrelevant_recall=0.8)
    assert recall(free, free_oof["probs"]) < 0.8 <= recall(floored, oof["probs"])
    called_i = [int((s.rules.classes(o["probs"]) == 3).sum()) for s, o in ((free, free_oof), (floored, oof))]
    assert called_i[0] < called_i[1]
    assert Stacker.load(floored.save(tmp_path / "stacker")).rules.min_irrelevant_recall == 0.8
