"""Teacher outputs: grouped per candidate list, the decision rules applied, cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from esci_reranker.distill.config import DistillData, TeacherSection
from esci_reranker.distill.data import LABELLED, SYNTHETIC, UNLABELLED, distillation_pairs
from esci_reranker.distill.teacher import (
    CACHE_NAME,
    PROB_COLUMNS,
    TEACHER_COLUMNS,
    list_layout,
    query_chunks,
    rule_probs,
    score_pairs,
    teacher_outputs,
)
from esci_reranker.labels import ESCI_LABELS
from esci_reranker.reranker import Reranker


@pytest.fixture(scope="module")
def pairs(distill_data: Path) -> pd.DataFrame:
    return distillation_pairs(distill_data, DistillData(unlabelled_per_query=5, similar_queries=3)).frame


@pytest.fixture(scope="module")
def teacher(stacked_teacher: Path) -> Reranker:
    return Reranker.from_pretrained(stacked_teacher, device="cpu")


@pytest.fixture(scope="module")
def scored(teacher: Reranker, pairs: pd.DataFrame) -> pd.DataFrame:
    return score_pairs(teacher, pairs, list_size=2)


def test_rule_probs_move_the_argmax_as_the_rules_do():
    probs = np.array([[0.5, 0.3, 0.1, 0.1], [0.4, 0.1, 0.25, 0.25]])
    offsets = np.array([0.0, 0.6, 0.0, 0.0])
    adjusted = rule_probs(probs, offsets)
    np.testing.assert_allclose(adjusted.sum(axis=1), 1.0)
    # by hand: softmax(log p + o) of row 0 = p * e^o / sum(p * e^o)
    expected = probs[0] * np.exp(offsets) / (probs[0] * np.exp(offsets)).sum()
    np.testing.assert_allclose(adjusted[0], expected)
    assert adjusted.argmax(axis=1).tolist() == [1, 0]  # 0.3 e^0.6 = 0.547 > 0.5; 0.1 e^0.6 = 0.18 < 0.4
    np.testing.assert_allclose(rule_probs(probs, np.zeros(4)), probs)


def test_list_layout_keeps_every_pair_once_beside_its_querys_labelled_candidates():
    pairs = pd.DataFrame(
        {
            "query_id": [1, 1, 1, 2, 2, 1, 1, 1, 2],
            "source": [LABELLED] * 5 + [UNLABELLED] * 4,
        }
    )
    rows, groups, keep = list_layout(pairs, list_size=2)
    assert sorted(rows[keep].tolist()) == list(range(9))  # each pair's own output is its own row
    lists = [rows[groups == g].tolist() for g in np.unique(groups)]
    # query 1: its labelled list, then chunks of 2 and 1 unlabelled pairs beside it
    assert lists[:3] == [[0, 1, 2], [0, 1, 2, 5, 6], [0, 1, 2, 7]]
    assert lists[3:] == [[3, 4], [3, 4, 8]]
    # labelled pairs keep their output from the labelled list itself
    assert keep[:3].tolist() == [0, 1, 2]


def test_a_synthetic_querys_search_results_are_one_list():
    pairs = pd.DataFrame(
        {
            "query_id": [1, 1, -1, -1, -1, 1],
            "source": [LABELLED, LABELLED, SYNTHETIC, SYNTHETIC, SYNTHETIC, UNLABELLED],
        }
    )
    rows, groups, keep = list_layout(pairs, list_size=2)
    lists = [rows[groups == g].tolist() for g in np.unique(groups)]
    assert lists == [[0, 1], [0, 1, 5], [2, 3, 4]]
    assert keep.tolist() == [0, 1, 5, 6, 7, 4]


def test_labelled_pairs_score_as_in_their_own_list(
    teacher: Reranker, pairs: pd.DataFrame, scored: pd.DataFrame
):
    labelled = pairs[pairs["source"] == LABELLED].reset_index(drop=True)
    # the teacher on the labelled candidates alone, grouped by query: its own evaluation path
    reference = teacher.predict_frame(labelled, progress=False)
    mine = scored[(pairs["source"] == LABELLED).to_numpy()].reset_index(drop=True)
    np.testing.assert_allclose(mine["t_score"], reference.scores, atol=1e-6)
    np.testing.assert_allclose(mine["t_sub"], reference.substitute_probs, atol=1e-6)
    # the class probabilities carry the rules: their argmax is the teacher's decided class
    assert mine["t_class"].tolist() == reference.esci_classes.tolist()
    assert (
        mine[list(PROB_COLUMNS)].to_numpy().argmax(axis=1) == [ESCI_LABELS.index(c) for c in mine["t_class"]]
    ).all()
    offsets = np.asarray(teacher.stacker.rules.class_offsets)
    np.testing.assert_allclose(mine[list(PROB_COLUMNS)], rule_probs(reference.esci_probs, offsets), atol=1e-6)
    assert (mine["t_is_sub"] == reference.is_substitute).all()


def test_unlabelled_pairs_score_in_a_list_with_the_labelled_candidates(
    teacher: Reranker, pairs: pd.DataFrame, scored: pd.DataFrame
):
    qid = pairs.loc[pairs["source"] == UNLABELLED, "query_id"].iloc[0]
    query = pairs[pairs["query_id"] == qid]
    extra = query[query["source"] == UNLABELLED].iloc[:2]  # the first chunk of list_size=2
    listed = pd.concat([query[query["source"] == LABELLED], extra])
    reference = teacher.predict_frame(listed.reset_index(drop=True), progress=False)
    np.testing.assert_allclose(scored.loc[extra.index, "t_score"], reference.scores[-2:], atol=1e-6)
    # and not what a list of the unlabelled pairs alone would give
    alone = teacher.predict_frame(extra.reset_index(drop=True), progress=False)
    assert not np.allclose(alone.scores, reference.scores[-2:])


def test_outputs_are_cached_and_rescored_when_the_settings_change(
    stacked_teacher: Path, pairs: pd.DataFrame, tmp_path: Path
):
    pairs = pairs[pairs["query_id"].isin(pairs["query_id"].unique()[:2])]  # two queries: quick
    lines: list[str] = []
    cfg = TeacherSection(list_size=2, batch_size=32)
    first = teacher_outputs(stacked_teacher, pairs, cfg, tmp_path, log=lines.append)
    assert not first.cached
    assert (tmp_path / CACHE_NAME).is_file()
    assert first.info["stacked"]
    assert first.info["class_offsets"]["S"] == pytest.approx(0.6)
    again = teacher_outputs(stacked_teacher, pairs, cfg, tmp_path, log=lines.append)
    assert again.cached
    assert "read from" in lines[-1]
    pd.testing.assert_frame_equal(again.frame, first.frame)
    other = teacher_outputs(stacked_teacher, pairs, TeacherSection(list_size=3), tmp_path, log=lines.append)
    assert not other.cached
    fewer = teacher_outputs(stacked_teacher, pairs.iloc[:-3], TeacherSection(list_size=3), tmp_path)
    assert not fewer.cached


def test_a_single_task_teacher_gives_scores_without_classes(
    tiny_single_task_checkpoint: Path, pairs: pd.DataFrame
):
    out = score_pairs(Reranker.from_pretrained(tiny_single_task_checkpoint), pairs.head(20), list_size=8)
    assert out["t_score"].notna().all()
    assert out[list(PROB_COLUMNS)].isna().all().all()
    assert (out["t_class"] == "").all()


def _spelled_out(reranker: Reranker, pairs: pd.DataFrame, list_size: int) -> pd.DataFrame:
    """The teacher's outputs the straightforward way: every list entry a row of its own, with
    its product's fields as a mapping, scored through ``Reranker.finish`` as one call."""
    from esci_reranker.train.texts import frame_texts

    pairs = pairs.reset_index(drop=True)
    queries = pairs["query"].astype(str).tolist()
    texts = frame_texts(pairs, reranker.config)
    encoded = reranker.pair_encoder.encode(queries, texts)
    out = reranker.run_encoded(encoded)
    rows, groups, keep = list_layout(pairs, list_size)
    product_columns = [c for c in pairs.columns if c.startswith("product_")]
    preds = reranker.finish(
        {k: np.asarray(v)[rows] for k, v in out.items()},
        np.asarray(encoded.truncated, dtype=bool)[rows],
        [queries[i] for i in rows],
        [texts[i] for i in rows],
        records=pairs[product_columns].iloc[rows].to_dict(orient="records"),
        groups=groups.tolist(),
    )
    probs = rule_probs(preds.esci_probs[keep], np.asarray(reranker.stacker.rules.class_offsets))
    frame = pairs[["query_id", "product_id"]].copy()
    frame["t_score"] = preds.scores[keep].astype(np.float64)
    for i, name in enumerate(PROB_COLUMNS):
        frame[name] = probs[:, i]
    frame["t_sub"] = preds.substitute_probs[keep].astype(np.float64)
    frame["t_is_sub"] = preds.is_substitute[keep]
    frame["t_class"] = np.asarray(ESCI_LABELS)[probs.argmax(axis=1)]
    return frame


def test_outputs_equal_every_list_entry_spelled_out(teacher: Reranker, pairs: pd.DataFrame):
    # one chunk: the cross-encoder sees the same batches, so every output is the same to the bit
    mine = score_pairs(teacher, pairs, list_size=2, chunk_pairs=len(pairs))
    pd.testing.assert_frame_equal(mine, _spelled_out(teacher, pairs, list_size=2), check_exact=True)


@pytest.mark.parametrize("chunk_pairs", [1, 7, 40])
def test_outputs_in_chunks_equal_the_outputs_in_one_chunk(
    stacked_teacher: Path, pairs: pd.DataFrame, chunk_pairs: int
):
    # One pair per forward pass, so the cross-encoder's outputs do not depend on what else is in
    # its batch; then scoring a chunk of queries at a time changes no bit of the outputs (with
    # larger batches the cross-encoder's own outputs move in the last float bits: padding)
    teacher = Reranker.from_pretrained(stacked_teacher, device="cpu", batch_size=1)
    shuffled = pairs.sample(frac=1.0, random_state=0)  # queries' pairs interleaved
    whole = score_pairs(teacher, shuffled, list_size=2, chunk_pairs=len(pairs))
    chunked = score_pairs(teacher, shuffled, list_size=2, chunk_pairs=chunk_pairs)
    assert list(chunked.columns) == ["query_id", "product_id", *TEACHER_COLUMNS]
    pd.testing.assert_frame_equal(chunked, whole, check_exact=True)


def test_query_chunks_hold_whole_queries():
    query_ids = pd.Series([5, 5, 3, 5, 8, 3, 9, 9, 9, 9])
    chunks = [c.tolist() for c in query_chunks(query_ids, chunk_pairs=5)]
    # 5 (3 pairs) + 3 (2 pairs) fill the first chunk; 8 and 9 (5 pairs) the second
    assert chunks == [[0, 1, 2, 3, 5], [4, 6, 7, 8, 9]]
    # a query larger than a chunk is a chunk of its own
    assert [c.tolist() for c in query_chunks(query_ids, chunk_pairs=2)] == [
        [0, 1, 3],
        [2, 5],
        [4],
        [6, 7, 8, 9],
    ]
    with pytest.raises(ValueError, match="chunk_pairs=0"):
        list(query_chunks(query_ids, chunk_pairs=0))
    with pytest.raises(ValueError, match="1 pairs have no query_id"):
        list(query_chunks(pd.Series([1.0, None, 1.0]), chunk_pairs=5))
