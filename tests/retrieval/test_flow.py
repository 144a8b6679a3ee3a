"""The search flow end to end on a tiny catalogue: retrieval, reranking, kinds, the written report,
and catalogue negatives inside a stacked training."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from esci_reranker.eval.flow import judged_index, product_kinds
from esci_reranker.reranker import Reranker
from esci_reranker.retrieval.flow import (
    CatalogueFlow,
    build_catalogue,
    evaluate_flow,
    flow_run,
    retrieve_ids,
    retrieve_lists,
)


@pytest.fixture(scope="module")
def splits(small_splits) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(small_splits / f"{name}.parquet") for name in ("train", "val", "test")}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, splits, tiny_retriever):
    frame = pd.concat(splits.values(), ignore_index=True)
    return build_catalogue(frame, tmp_path_factory.mktemp("flow") / "index", retriever=tiny_retriever)


def test_flow_run_marks_every_result_and_scores_it_as_the_reranker_does(
    catalogue, splits, tiny_stacked_checkpoint
):
    reranker = Reranker.from_pretrained(tiny_stacked_checkpoint)
    test = splits["test"]
    labelled = pd.concat(splits.values(), ignore_index=True)
    lists = retrieve_lists(catalogue, test, n=15)
    judged = judged_index(labelled)
    run = flow_run(reranker, test, lists, judged, test)
    assert len(run) == sum(len(v) for v in lists.values())
    label_of = test.set_index(["query_id", "product_id"])["esci_label"]
    for qid, rows in run.groupby("query_id"):
        query = test.loc[test["query_id"] == qid, "query"].iloc[0]
        assert rows["kind"].tolist() == product_kinds(qid, query, rows["product_id"].tolist(), judged)
        for row in rows[rows["kind"] == "judged"].itertuples():
            assert row.esci_label == label_of[(qid, row.product_id)]
        assert rows.loc[rows["kind"] != "judged", "esci_label"].isna().all()
        # the same labels as ranking the retrieved list through Reranker.rerank
        fields = [{"product_id": r.product_id, **r.fields} for r in lists[qid]]
        ranked = {c.product_id: c.esci_class for c in reranker.rerank(query, fields)}
        assert dict(zip(rows["product_id"], rows["esci_pred"], strict=True)) == ranked


def test_id_lists_for_mining_are_the_flows_lists_without_their_fields(tmp_path, catalogue, splits):
    """``retrieve_ids`` (batched keys, ids read on lookup) against ``retrieve_lists``, and a
    ``CatalogueFlow``'s mining lists with and without the flow's lists retrieved first."""
    import shutil

    from esci_reranker.train.config import load_config

    frame = pd.concat([splits["train"], splits["val"]], ignore_index=True)
    full = retrieve_lists(catalogue, frame, n=30)
    ids = retrieve_ids(catalogue, frame, n=30)
    assert list(ids) == list(full)
    assert {q: list(ids[q]) for q in ids} == {q: [r.product_id for r in v] for q, v in full.items()}
    assert {q: list(v) for q, v in retrieve_ids(catalogue, frame, n=30, keep=7).items()} == {
        q: [r.product_id for r in v[:7]] for q, v in full.items()
    }

    cfg = load_config(None, ["stack.encoder_negatives=3", "stack.negatives_retrieve=20"])
    shutil.copytree(catalogue.folder, tmp_path / "catalogue")
    bare = CatalogueFlow(cfg, frame, log=lambda _: None)
    with_lists = CatalogueFlow(cfg, frame, log=lambda _: None)
    with_lists.lists(tmp_path)
    assert not bare._lists
    assert with_lists._lists
    mined = bare.ranked_ids(tmp_path)
    assert {q: list(mined[q]) for q in mined} == dict(with_lists.ranked_ids(tmp_path))
    assert max(len(v) for v in with_lists.ranked_ids(tmp_path).values()) == 20
    held = frozenset(frame["query_id"].unique()[:2].tolist())
    negatives = bare.encoder_negatives(tmp_path, held)
    assert negatives is not None
    assert len(negatives) > 0
    assert not set(negatives["query_id"]) & held
    pd.testing.assert_frame_equal(negatives, with_lists.encoder_negatives(tmp_path, held))


def test_evaluate_flow_writes_metrics_plot_and_one_report_section(
    tmp_path, catalogue, splits, tiny_stacked_checkpoint
):
    reranker = Reranker.from_pretrained(tiny_stacked_checkpoint)
    labelled = pd.concat(splits.values(), ignore_index=True)
    (tmp_path / "report.md").write_text("# Evaluation\n\nearlier sections\n")
    for _ in range(2):  # evaluated twice: the section is replaced, not repeated
        metrics = evaluate_flow(reranker, catalogue, splits["test"], labelled, tmp_path, retrieve=12)
    saved = json.loads((tmp_path / "flow" / "metrics.json").read_text())
    assert (
        saved["overall"]["results"]
        == metrics["overall"]["results"]
        == len(pd.read_parquet(tmp_path / "flow" / "predictions.parquet"))
    )
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Evaluation")
    assert "earlier sections" in report
    assert report.count("## Search flow") == 1
    assert (tmp_path / "plots" / "calibration.png").is_file()


def test_stacked_training_learns_from_catalogue_negatives_and_measures_the_flow(
    tmp_path, small_splits, tiny_backbone, tiny_retriever
):
    from esci_reranker.stack.stacker import Stacker
    from esci_reranker.stack.train import train_stacked
    from esci_reranker.train.config import load_config
    from tests.stack.test_train import STACKED

    cfg = load_config(
        None,
        [
            f"model.backbone={tiny_backbone}",
            *STACKED,
            "stack.negatives_per_query=4",
            "stack.encoder_negatives=3",
            "stack.negative_rule=unjudged",
            "stack.class_features=pointwise",
            "stack.calibrate=true",
            f"data.dir={small_splits}",
            f"output.save_path={tmp_path / 'model'}",
        ],
    )
    frame = pd.concat(
        [pd.read_parquet(small_splits / f"{n}.parquet") for n in ("train", "val")], ignore_index=True
    )
    catalogue = CatalogueFlow(cfg, frame, log=lambda _: None, retriever=tiny_retriever)
    result = train_stacked(
        cfg,
        progress=False,
        log=lambda _: None,
        negatives=catalogue.negatives,
        on_fold=catalogue.on_fold,
        train_rows=catalogue.encoder_negatives,
    )
    folds = tmp_path / "train" / "folds"
    (cache,) = folds.glob("negatives_*.parquet")
    negatives = pd.read_parquet(cache)
    test_products = set(pd.read_parquet(small_splits / "test.parquet")["product_id"])
    assert len(negatives) > 0
    assert not set(negatives["product_id"]) & test_products
    assert not set(zip(negatives["query_id"], negatives["product_id"], strict=True)) & set(
        zip(frame["query_id"], frame["product_id"], strict=True)
    )
    # the cross-encoders learnt from catalogue negatives too: never a held-out query's product
    judged = set(zip(frame["query_id"], frame["product_id"], strict=True))
    for fold_data in sorted(folds.glob("fold*/data")):
        train, val = (pd.read_parquet(fold_data / f"{n}.parquet") for n in ("train", "val"))
        extra = train[
            [pair not in judged for pair in zip(train["query_id"], train["product_id"], strict=True)]
        ]
        assert len(extra) > 0
        assert (extra["esci_label"] == "I").all()
        assert not set(extra["product_id"]) & (set(val["product_id"]) | test_products)
        assert not set(extra["query_id"]) & set(val["query_id"])
    final_rows = pd.read_parquet(tmp_path / "train" / "train_all.parquet")
    assert len(final_rows) > len(frame)
    entries = json.loads((folds / "stack_cv.json").read_text())["entries"]
    assert all("flow" in e and "title_only" in e for e in entries)
    assert "flow" in result.cv["overall"]
    stacker = Stacker.load(tmp_path / "model" / "stacker")
    assert stacker.info["negative_rows"] == len(negatives)
    assert stacker.calibration is not None
    assert not any(n.endswith(("_rank", "_z", "_gap")) for n in stacker.features_of("classifier"))


def test_flow_run_names_an_empty_retrieval(splits, tiny_stacked_checkpoint):
    reranker = Reranker.from_pretrained(tiny_stacked_checkpoint)
    test = splits["test"]
    with pytest.raises(ValueError, match="none of the 3 queries retrieved"):
        flow_run(reranker, test, {}, judged_index(test), test)


def test_catalogue_lists_never_hold_a_product_judged_for_a_test_query(tmp_path, tiny_retriever):
    from esci_reranker.retrieval.flow import catalogue_lists
    from esci_reranker.retrieval.index import CatalogueIndex
    from tests.conftest import write_small_splits

    data = write_small_splits(tmp_path / "data")
    train, test = (pd.read_parquet(data / f"{n}.parquet") for n in ("train", "test"))
    # a product judged for a test query and for a train query: it must stay out all the same
    shared = test.iloc[[0]].copy()
    shared[["query_id", "query"]] = train.iloc[0][["query_id", "query"]].to_numpy()
    pd.concat([train, shared], ignore_index=True).to_parquet(data / "train.parquet", index=False)
    test_products = set(test["product_id"].astype(str))
    queries = pd.concat([train, test])[["query_id", "query"]]  # test queries too: the worst case
    folder = tmp_path / "catalogue"
    lists = catalogue_lists(data, queries, 10_000, folder, retriever=tiny_retriever, log=lambda _: None)
    assert set(lists) == set(queries["query_id"])
    assert not test_products & set(CatalogueIndex.open(folder).live_ids())
    assert not test_products & {p for ranked in lists.values() for p in ranked}
    # the catalogue is reused from its folder: the same lists again
    assert catalogue_lists(data, queries, 10_000, folder, log=lambda _: None) == lists
    # a catalogue that holds a test product (here: one of every split's products) is refused
    everything = pd.concat([train, test], ignore_index=True)
    build_catalogue(everything, tmp_path / "all", retriever=tiny_retriever)
    with pytest.raises(ValueError, match=r"holds \d+ product\(s\) judged for a test query"):
        catalogue_lists(data, queries, 10, tmp_path / "all", log=lambda _: None)


def test_stacked_inputs_keep_the_training_columns_once_the_catalogue_is_built(
    tmp_path, small_splits, tiny_retriever
):
    """What a stacked training holds while its cross-encoders train: the training columns; the
    catalogue, built first from the whole table, keeps every product field the trees read. The
    flow (which reads product text from the table) keeps the whole table."""
    from esci_reranker.retrieval.flow import stacked_inputs
    from esci_reranker.retrieval.index import CatalogueIndex
    from esci_reranker.train.config import load_config
    from esci_reranker.train.loop import read_train_val, training_columns

    cfg = load_config(
        None,
        [
            "stack.encoder_negatives=2",
            f"data.dir={small_splits}",
            f"output.save_path={tmp_path / 'model'}",
            f"output.run_dir={tmp_path / 'run'}",
        ],
    )
    frame, catalogue = stacked_inputs(cfg, False, lambda _: None, retriever=tiny_retriever)
    assert catalogue is not None
    assert set(frame.columns) <= set(training_columns(cfg.model.text_fields))
    assert "product_description" not in frame.columns
    assert catalogue.frame is frame
    index = CatalogueIndex.open(tmp_path / "run" / "folds" / "catalogue")  # built before training
    assert "description" in index.stored_fields
    whole = read_train_val(small_splits)
    assert frame["product_id"].tolist() == whole["product_id"].tolist()
    negatives = catalogue.encoder_negatives(tmp_path / "run" / "folds", frozenset())
    assert negatives is not None
    assert list(negatives.columns) == list(frame.columns)
    measured, flow = stacked_inputs(cfg, True, lambda _: None, retriever=tiny_retriever)
    assert flow is not None
    assert "product_description" in flow.frame.columns
    assert "product_description" not in measured.columns


def test_catalogue_lists_keep_only_foreign_products_when_asked(tmp_path, tiny_retriever):
    """``rule="foreign"`` is ``rule="top"`` with every product that is not foreign to the query
    (judged for it, or for a query sharing a word with it) left out, in the same order."""
    from esci_reranker.eval.flow import is_foreign
    from esci_reranker.retrieval.flow import catalogue_lists
    from tests.conftest import write_small_splits

    data = write_small_splits(tmp_path / "data")
    frame = pd.concat([pd.read_parquet(data / f"{n}.parquet") for n in ("train", "val")], ignore_index=True)
    queries = frame[["query_id", "query"]].drop_duplicates("query_id")
    folder = tmp_path / "catalogue"
    quiet = {"retriever": tiny_retriever, "log": lambda _: None}
    top = catalogue_lists(data, queries, 10_000, folder, **quiet)
    foreign = catalogue_lists(data, queries, 10_000, folder, rule="foreign", **quiet)
    judged = judged_index(frame)
    text = dict(zip(queries["query_id"], queries["query"], strict=True))
    assert set(foreign) == set(top)
    kept = 0
    for qid, ids in top.items():
        expected = [p for p in ids if is_foreign(text[qid], judged[p].values())]
        assert foreign[qid] == expected
        own = set(frame.loc[frame["query_id"] == qid, "product_id"])
        assert not own & set(foreign[qid])  # never a product judged for the query itself
        kept += len(expected)
    assert 0 < kept < sum(len(ids) for ids in top.values())  # the rule keeps some, not all
    with pytest.raises(ValueError, match=r"retrieved rule 'near'; expected one of \['top', 'foreign'\]"):
        catalogue_lists(data, queries, 10, folder, rule="near", **quiet)


def test_compare_in_flow_runs_every_model_on_the_same_lists_and_counts_agreement(
    catalogue, splits, tiny_stacked_checkpoint, tiny_checkpoint
):
    from esci_reranker.eval.flow import flow_summary, ideal_gains
    from esci_reranker.retrieval.flow import compare_in_flow

    test = splits["test"]
    labelled = pd.concat(splits.values(), ignore_index=True)
    stacked, plain = (
        Reranker.from_pretrained(tiny_stacked_checkpoint),
        Reranker.from_pretrained(tiny_checkpoint),
    )
    result = compare_in_flow({"teacher": stacked, "student": plain}, catalogue, test, labelled, retrieve=15)
    assert result["reference"] == "teacher"
    assert set(result["agreement"]) == {"student"}
    # each model's figures are its own flow run's
    lists = retrieve_lists(catalogue, test, n=15)
    runs = {
        name: flow_run(m, test, lists, judged_index(labelled), test)
        for name, m in (("t", stacked), ("s", plain))
    }
    for name, key, model in (("t", "teacher", stacked), ("s", "student", plain)):
        expected = flow_summary(runs[name], ideal_gains(test), threshold=model.substitute_threshold)
        assert result["models"][key]["foreign"] == expected["foreign"]
        assert result["models"][key]["ndcg@10_e2e"] == expected["ndcg@10_e2e"]
    same = runs["t"]["esci_pred"].to_numpy() == runs["s"]["esci_pred"].to_numpy()
    kinds = runs["t"]["kind"].to_numpy()
    agreement = result["agreement"]["student"]
    assert agreement["all"] == pytest.approx(same.mean())
    for kind in ("judged", "foreign", "unjudged"):
        if (kinds == kind).any():
            assert agreement[kind] == pytest.approx(same[kinds == kind].mean())
    # a model against itself agrees everywhere
    itself = compare_in_flow({"a": plain, "b": plain}, catalogue, test, labelled, retrieve=15)
    assert itself["agreement"]["b"]["all"] == 1.0
    with pytest.raises(ValueError, match="no model to run"):
        compare_in_flow({}, catalogue, test, labelled)


def test_evaluate_flow_of_a_model_without_class_heads_reports_its_ranking(
    tmp_path, catalogue, splits, tiny_single_task_checkpoint
):
    """A score-only model (a single-task cross-encoder, student-score) goes through the flow:
    end-to-end nDCG is measured, its label figures are absent (NaN, null in the JSON)."""
    reranker = Reranker.from_pretrained(tiny_single_task_checkpoint)
    labelled = pd.concat(splits.values(), ignore_index=True)
    metrics = evaluate_flow(reranker, catalogue, splits["test"], labelled, tmp_path, retrieve=12)
    overall = metrics["overall"]
    assert 0.0 <= overall["ndcg@10_e2e"] <= 1.0
    assert np.isnan(overall["share_E_all"])
    assert np.isnan(overall["judged_I_recall"])
    saved = json.loads((tmp_path / "flow" / "metrics.json").read_text())
    assert saved["overall"]["share_E_all"] is None
    assert not (tmp_path / "plots" / "calibration.png").exists()
    assert "## Search flow" in (tmp_path / "report.md").read_text()
