"""Catalogue negatives, per-task features and calibration in the stacker."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esci_reranker.retrieval.index import Retrieved
from esci_reranker.stack.calibration import ClassCalibration, fit_calibration
from esci_reranker.stack.cv import fold_stackers, outer_split
from esci_reranker.stack.features import is_list_relative
from esci_reranker.stack.stacker import Stacker, fit_stacker
from tests.stack.test_stacker import SMALL, synthetic_table


def with_negatives(table: pd.DataFrame, folds: int = 3, seed: int = 1) -> pd.DataFrame:
    """``table`` with a fold per query and two negatives per query, one of them a product judged
    for a query of another fold (so an outer fold's held-out product)."""
    rng = np.random.default_rng(seed)
    table = table.copy()
    table["fold"] = table["query_id"] % folds
    table["is_negative"], table["weight"] = 0, 1.0
    products = table["product_id"].to_numpy()
    rows = []
    for qid, fold in table.groupby("query_id")["fold"].first().items():
        other = table[(table["fold"] != fold)]["product_id"].to_numpy()
        for pid in (str(rng.choice(other)), f"unseen-{qid}"):
            rows.append(
                {
                    "query_id": qid,
                    "product_id": pid,
                    "esci_label": "I",
                    "signal": rng.normal(-2.0, 0.3),
                    "noise": rng.normal(),
                    "fold": fold,
                    "is_negative": 1,
                    "weight": 0.5,
                }
            )
    assert len(set(products)) == len(products)
    return pd.concat([table, pd.DataFrame(rows)], ignore_index=True)


def test_no_held_out_product_is_ever_a_training_negative():
    table = with_negatives(synthetic_table(queries=12, per_query=8))
    for fold in range(3):
        train, test = outer_split(table, fold)
        held_products = set(table.loc[(table["fold"] == fold) & (table["is_negative"] == 0), "product_id"])
        train_negatives = set(train.loc[train["is_negative"] == 1, "product_id"])
        assert not train_negatives & held_products
        assert (test["is_negative"] == 0).all()
        assert (test["fold"] == fold).all()
        assert not set(train["query_id"]) & set(test["query_id"])
        # only the leaking negatives were dropped: every other negative of the training folds stays
        kept = table[(table["fold"] != fold) & (table["is_negative"] == 1)]
        expected = kept[~kept["product_id"].isin(held_products)]
        assert len(train[train["is_negative"] == 1]) == len(expected) > 0


def test_fold_stackers_train_without_held_out_products():
    table = with_negatives(synthetic_table(queries=12, per_query=8))
    for fold, stacker, test in fold_stackers(table, SMALL, ["signal", "noise"]):
        train, _ = outer_split(table, fold)
        assert stacker.info["negative_rows"] == int(train["is_negative"].sum())
        assert stacker.info["rows"] == len(train)
        assert len(test) == int(((table["fold"] == fold) & (table["is_negative"] == 0)).sum())


def test_negatives_teach_the_classes_but_not_the_ranker_by_default():
    table = with_negatives(synthetic_table(queries=12, per_query=8))
    stacker, oof = fit_stacker(table, SMALL, features=["signal", "noise"])
    negative = table["is_negative"].to_numpy(bool)
    assert np.isnan(oof["score"][negative]).all()
    assert np.isfinite(oof["score"][~negative]).all()
    # the negatives sit far below every judged row on 'signal': the classifier calls them I
    probs = stacker.predict(table[negative])["probs"]
    assert (probs.argmax(axis=1) == 3).mean() > 0.9
    _ranked, oof_ranked = fit_stacker(table, SMALL, features=["signal", "noise"], rank_negatives=True)
    assert np.isfinite(oof_ranked["score"]).all()


def test_negatives_can_teach_the_ranker_alone():
    """``class_negatives=False`` (with ``rank_negatives``): the ranker reads the negatives, the
    class and substitute trees are the ones the judged rows alone give."""
    table = with_negatives(synthetic_table(queries=12, per_query=8))
    negative = table["is_negative"].to_numpy(bool)
    ranker_only, oof = fit_stacker(
        table, SMALL, features=["signal", "noise"], rank_negatives=True, class_negatives=False
    )
    assert np.isfinite(oof["score"]).all()
    assert np.isnan(oof["probs"][negative]).all()
    assert np.isnan(oof["substitute_prob"][negative]).all()
    assert np.isfinite(oof["probs"][~negative]).all()
    judged_only, _ = fit_stacker(
        table[~negative].drop(columns=["is_negative", "weight"]), SMALL, features=["signal", "noise"]
    )
    judged = table[~negative]
    for key in ("probs", "substitute_prob"):
        np.testing.assert_allclose(ranker_only.predict(judged)[key], judged_only.predict(judged)[key])
    assert ranker_only.rules == judged_only.rules
    both, _ = fit_stacker(table, SMALL, features=["signal", "noise"], rank_negatives=True)
    assert not np.allclose(both.predict(judged)["probs"], judged_only.predict(judged)["probs"])
    np.testing.assert_allclose(ranker_only.predict(table)["score"], both.predict(table)["score"])
    with pytest.raises(ValueError, match=r"rules_on='all'.*class_negatives=False"):
        fit_stacker(table, SMALL, features=["signal", "noise"], class_negatives=False, rules_on="all")


def test_each_task_reads_its_own_features_and_they_survive_a_save(tmp_path):
    table = synthetic_table(queries=12, per_query=8)
    stacker, _ = fit_stacker(table, SMALL, features=["signal", "noise"], class_features=["signal"])
    assert stacker.features_of("ranker") == ["signal", "noise"]
    assert stacker.features_of("classifier") == ["signal"] == stacker.features_of("substitute")
    before = stacker.predict(table)
    loaded = Stacker.load(stacker.save(tmp_path / "stacker"))
    after = loaded.predict(table)
    assert loaded.task_features == stacker.task_features
    np.testing.assert_allclose(after["probs"], before["probs"])
    # the classes never read 'noise': changing it moves the ranker only
    shuffled = table.assign(noise=table["noise"].to_numpy()[::-1])
    np.testing.assert_allclose(loaded.predict(shuffled)["probs"], before["probs"])


def test_calibration_is_fitted_saved_and_applied(tmp_path):
    table = synthetic_table(queries=12, per_query=8)
    plain, _ = fit_stacker(table, SMALL, features=["signal", "noise"])
    calibrated, oof = fit_stacker(table, SMALL, features=["signal", "noise"], calibrate=True)
    assert plain.calibration is None
    assert calibrated.calibration is not None
    raw = plain.predict(table)["probs"]
    np.testing.assert_allclose(
        calibrated.predict(table)["probs"], calibrated.calibration.apply(raw), rtol=1e-6
    )
    loaded = Stacker.load(calibrated.save(tmp_path / "stacker"))
    assert loaded.calibration == calibrated.calibration
    np.testing.assert_allclose(oof["probs"].sum(axis=1), 1.0)


def test_fit_calibration_recovers_a_known_temperature_and_bias():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(4000, 4))
    true_probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in true_probs])
    # the model is overconfident (logits x 2) and biased against class I
    shown = ClassCalibration(0.5, [0.0, 0.0, 0.0, -1.0]).apply(true_probs)
    fitted = fit_calibration(shown, labels)
    assert fitted.temperature == pytest.approx(2.0, rel=0.1)
    # softmax(2 log p + b) / 2 = log p + b / 2 + const: the inverse bias is -b / 2 = +0.5 for I
    assert fitted.bias[3] == pytest.approx(0.5, abs=0.15)


def test_calibration_from_dict_names_bad_fields():
    with pytest.raises(ValueError, match="bias"):
        ClassCalibration.from_dict({"temperature": 1.0, "bias": {"E": 0.0}})
    with pytest.raises(ValueError, match="temperature"):
        ClassCalibration.from_dict({"temperature": -1.0, "bias": dict.fromkeys("ESCI", 0.0)})


@pytest.mark.parametrize(
    ("name", "relative"),
    [
        ("ce_score_rank", True),
        ("ce_p_E_z", True),
        ("cov_all_gap", True),
        ("bm25_title", True),
        ("list_size", True),
        ("other_brand_named", True),
        ("ce_score", False),
        ("ce_p_E", False),
        ("cov_all", False),
        ("unit_conflict", False),
    ],
)
def test_list_relative_features(name, relative):
    assert is_list_relative(name) is relative


def test_mine_negatives_takes_foreign_products_only():
    from esci_reranker.retrieval.flow import mine_negatives

    frame = pd.DataFrame(
        {
            "query_id": [1, 1, 2, 3],
            "query": ["usb lunch box", "usb lunch box", "android tv streaming", "insulated lunch bag"],
            "product_id": ["a", "b", "c", "d"],
            "esci_label": ["E", "I", "E", "E"],
            "product_title": ["lunch box", "usb cable", "tv stick", "lunch bag"],
            "fold": [0, 0, 1, 1],
        }
    )

    lists = {1: ["a", "d", "c", "b", "zz"], 2: ["c", "a", "d"]}  # product ids in retrieval order
    foreign = mine_negatives(frame, lists, per_query=5, rule="foreign", weight=0.25)
    # query 1: a, b judged for it; d judged for a related query; zz judged for none -> only c
    assert foreign[foreign["query_id"] == 1]["product_id"].tolist() == ["c"]
    assert foreign[foreign["query_id"] == 2]["product_id"].tolist() == ["a", "d"]
    assert (foreign["weight"] == 0.25).all()
    assert foreign.set_index("product_id").loc["c", "product_title"] == "tv stick"
    assert foreign.set_index("product_id").loc["c", "fold"] == 0  # the query's fold, not the product's
    bare = mine_negatives(frame, lists, per_query=5, rule="foreign", weight=0.25, with_text=False)
    assert "product_title" not in bare.columns
    pd.testing.assert_frame_equal(bare, foreign[bare.columns])
    unjudged = mine_negatives(frame, lists, per_query=1, rule="unjudged")
    assert unjudged[unjudged["query_id"] == 1]["product_id"].tolist() == ["d"]
    with pytest.raises(ValueError, match="negative_rule"):
        mine_negatives(frame, lists, per_query=1, rule="nearby")


def test_encoder_negatives_never_hold_a_held_out_query_or_its_products(tmp_path):
    from pathlib import Path

    from esci_reranker.retrieval.flow import CatalogueFlow
    from esci_reranker.train.config import load_config
    from esci_reranker.train.cv import write_fold_splits

    frame = pd.DataFrame(
        {
            "query_id": [1, 2, 3, 3, 4],
            "query": ["usb lunch box", "android tv streaming", "garden hose", "garden hose", "desk lamp"],
            "product_id": ["a", "c", "h", "k", "l"],
            "esci_label": ["E", "E", "E", "S", "E"],
            "gain": [1.0, 1.0, 1.0, 0.1, 1.0],
            "product_title": ["lunch box", "tv stick", "hose", "hose reel", "lamp"],
            "product_brand": ["x", "y", "z", "z", "w"],
            "esci_query_source": ["negations", "other", "other", "other", "other"],
        }
    )

    def hit(pid: str) -> Retrieved:
        return Retrieved(key=0, product_id=pid, fields={}, score=1.0, bm25_rank=1, dense_rank=None)

    cfg = load_config(None, ["stack.encoder_negatives=2"])
    flow = CatalogueFlow(cfg, frame, log=lambda _: None)
    # the retrieved lists, as the catalogue would give them (in retrieval order)
    flow._lists[Path(tmp_path) / "catalogue"] = {
        1: [hit(p) for p in ("a", "h", "c", "l", "k")],
        2: [hit(p) for p in ("k", "l", "a")],
        3: [hit(p) for p in ("c", "a")],
        4: [hit(p) for p in ("h", "c")],
    }
    held = frozenset({3})
    rows = flow.encoder_negatives(tmp_path, held)
    assert rows is not None
    # query 3 is held out; its products h and k are never negatives; two per query, in order
    pairs = list(zip(rows["query_id"], rows["product_id"], strict=True))
    assert pairs == [(1, "c"), (1, "l"), (2, "l"), (2, "a"), (4, "c")]
    assert (rows["esci_label"] == "I").all()
    assert (rows["gain"] == 0.0).all()
    assert rows.set_index("product_id").loc["l", "product_title"].tolist() == ["lamp", "lamp"]
    assert rows.loc[rows["query_id"] == 1, "esci_query_source"].eq("negations").all()
    assert list(rows.columns) == list(frame.columns)
    # the final model (nothing held out) may take the held-out fold's products
    final = flow.encoder_negatives(tmp_path, frozenset())
    assert final is not None
    assert {"h", "k"} & set(final["product_id"])
    # the fold's training split holds them; its validation split only the judged rows
    folder = write_fold_splits(frame, {3}, tmp_path / "fold", rows)
    train = pd.read_parquet(folder / "train.parquet")
    assert len(train) == 3 + len(rows)  # three judged rows outside the fold
    assert pd.read_parquet(folder / "val.parquet")["product_id"].tolist() == ["h", "k"]
    with pytest.raises(ValueError, match="held-out query"):
        write_fold_splits(frame, {1}, tmp_path / "bad", rows)
    # none asked: none made
    off = CatalogueFlow(load_config(None, []), frame, log=lambda _: None)
    assert off.encoder_negatives(tmp_path, held) is None
