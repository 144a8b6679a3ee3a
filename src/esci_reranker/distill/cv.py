"""Cross-validation of a student against its teacher, over the query folds of the teacher's CV.

The teacher's out-of-fold outputs (``teacher_oof_table``) give, for every train+val pair, the
teacher's outputs from a model that never trained on its query: the cross-encoder's columns of
``oof.parquet`` (``esci-reranker cv``, ``make run``'s ``train/folds/``), or for a stacked teacher
the trees fitted on the other folds' rows over those columns (``stack.cv.fold_stackers``, the
stacker's own CV), with that fold's decision rules.

``cross_validate_student`` then trains, for each fold f and seed, a student on the pairs of the
other folds with their out-of-fold teacher outputs as targets (early stopping on a share of
those queries), and scores fold f's pairs with it; the teacher's own out-of-fold outputs on
fold f are scored beside it, so every comparison is paired by fold. Neither ever reads the test
split; train+val rows whose product or query is in the test split are left out of training
(``distill.data.drop_test_overlap``).

**Unlabelled pairs**, as in the shipped recipe (``distill.data``): with
``data.unlabelled_per_query`` > 0, each fold's student also learns from unlabelled pairs made
from the other folds' queries and products only (``fold_unlabelled_outputs``), scored by that
fold's teacher: the cross-encoder cv trained without the fold (saved beside ``oof.parquet``)
with, for a stacked teacher, the fold's stacker (fitted on the other folds' out-of-fold rows),
their candidate lists laid out as ``distill.teacher`` does. The scores are cached in the output
folder. As in the stacker's own CV, the models whose outputs are a fold's *labelled* training
targets did train on the held-out fold (only the held-out fold's own outputs are out of fold);
the unlabelled pairs' teacher never did. Either way the student never sees the held-out queries,
their products' text or their labels. With ``model.init: teacher`` a fold's student starts
from the encoder of that fold's cross-encoder, as the shipped student starts from the teacher's.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from esci_reranker.data.text import DEFAULT_LONG_FIELD_CHARS, DEFAULT_TEXT_FIELDS
from esci_reranker.distill.config import DistillConfig
from esci_reranker.distill.data import (
    LABELLED,
    PAIR_KEY,
    RetrievedLists,
    drop_test_overlap,
    validation_queries,
)
from esci_reranker.distill.teacher import PROB_COLUMNS, rule_probs
from esci_reranker.labels import ESCI_GAINS, ESCI_LABELS, gain_vector
from esci_reranker.train.cv import config_sha256, read_resumable

if TYPE_CHECKING:
    from esci_reranker.stack.stacker import Stacker

#: Models of a distillation CV entry, in table order (baselines follow when present).
DISTILL_CV_MODELS: tuple[str, ...] = ("student", "teacher", "bm25", "bi-encoder")


def teacher_oof_table(
    frame: pd.DataFrame, oof: pd.DataFrame, stacker: Stacker | None = None, seed: int = 0
) -> pd.DataFrame:
    """Every train+val pair's out-of-fold teacher outputs (``distill.teacher.TEACHER_COLUMNS``).

    Args:
        frame: the train+val rows (prepared splits).
        oof: an ``oof.parquet`` of ``esci-reranker cv`` (fold, seed, ids, cross-encoder columns).
        stacker: the teacher's stacker (for its features, LightGBM settings and rule objectives),
            or None for a cross-encoder teacher (its columns are the outputs, threshold 0.5).
        seed: which seed of ``oof`` to use.

    Returns:
        ``fold``, ``query_id``, ``product_id``, the teacher columns and ``t_threshold`` (the Task
        3 threshold of the fold's teacher), one row per row of ``frame``.
    """
    return teacher_oof_and_stackers(frame, oof, stacker, seed)[0]


def teacher_oof_and_stackers(
    frame: pd.DataFrame, oof: pd.DataFrame, stacker: Stacker | None = None, seed: int = 0
) -> tuple[pd.DataFrame, dict[int, Stacker]]:
    """``teacher_oof_table`` and, for a stacked teacher, each fold's stacker (fold -> the trees
    fitted on the other folds' rows, whose outputs on the fold are the table's); ``{}`` for a
    cross-encoder teacher."""
    from esci_reranker.stack.cv import fold_stackers, oof_stack_table

    part = oof[oof["seed"] == seed]
    if part.empty:
        raise ValueError(f"oof table: no rows for seed {seed} (seeds: {sorted(oof['seed'].unique())}).")
    if stacker is None:
        rows = frame[list(PAIR_KEY)].merge(part, on=list(PAIR_KEY), how="left", validate="one_to_one")
        if rows["fold"].isna().any():
            missing = rows.loc[rows["fold"].isna(), "query_id"].unique()[:3].tolist()
            raise ValueError(f"oof table: seed {seed} has no out-of-fold outputs for queries {missing}.")
        has_classes = "ce_p_E" in rows.columns
        probs = (
            rows[[f"ce_p_{c}" for c in ESCI_LABELS]].to_numpy(np.float64)
            if has_classes
            else np.full((len(rows), len(ESCI_LABELS)), np.nan)
        )
        sub = rows["ce_sub"].to_numpy(np.float64) if "ce_sub" in rows.columns else np.full(len(rows), np.nan)
        return _teacher_frame(
            rows, rows["fold"], rows["ce_score"], probs, np.zeros(len(ESCI_LABELS)), sub, 0.5
        ), {}
    table = oof_stack_table(frame, oof, seed)
    params = dataclasses.replace(stacker.params, seed=seed)
    parts = []
    stackers: dict[int, Stacker] = {}
    # the teacher's own recipe: each task's features and the calibration (its catalogue negatives
    # need a catalogue and the fold models' scores of them, which this table does not hold)
    for fold, fold_stacker, rows in fold_stackers(
        table,
        params,
        stacker.features_of("ranker"),
        stacker.rules.task2_objective,
        stacker.rules.task3_objective,
        class_features=stacker.features_of("classifier"),
        calibrate=stacker.calibration is not None,
        macro_weight=stacker.rules.macro_weight,
        min_irrelevant_recall=stacker.rules.min_irrelevant_recall,
    ):
        stackers[fold] = fold_stacker
        out = fold_stacker.predict(rows)
        rules = fold_stacker.rules
        parts.append(
            _teacher_frame(
                rows,
                rows["fold"],
                out["score"],
                out["probs"],
                np.asarray(rules.class_offsets),
                out["substitute_prob"],
                rules.substitute_threshold,
            )
        )
    return pd.concat(parts, ignore_index=True), stackers


def _teacher_frame(
    rows: pd.DataFrame,
    folds: Any,
    score: Any,
    probs: np.ndarray,
    offsets: np.ndarray,
    sub: Any,
    threshold: float,
) -> pd.DataFrame:
    adjusted = rule_probs(probs, offsets)
    out = pd.DataFrame({"fold": np.asarray(folds).astype(int)})
    out["query_id"] = rows["query_id"].to_numpy()
    out["product_id"] = rows["product_id"].to_numpy()
    out["t_score"] = np.asarray(score, dtype=np.float64)
    for i, name in enumerate(PROB_COLUMNS):
        out[name] = adjusted[:, i]
    out["t_sub"] = np.asarray(sub, dtype=np.float64)
    out["t_is_sub"] = out["t_sub"].to_numpy() >= threshold
    finite = np.isfinite(adjusted).all(axis=1)
    out["t_class"] = np.where(finite, np.asarray(ESCI_LABELS)[np.nan_to_num(adjusted).argmax(axis=1)], "")
    out["t_threshold"] = float(threshold)
    return out


def teacher_run(rows: pd.DataFrame) -> pd.DataFrame:
    """A run frame (``eval.evaluator``) of the teacher's out-of-fold outputs (rows of a
    ``teacher_oof_table`` merged with the split's ``esci_label`` and query type)."""
    columns = [c for c in ("query_id", "product_id", "esci_label", "esci_query_source") if c in rows]
    run = rows[columns].reset_index(drop=True).copy()
    run["score"] = rows["t_score"].to_numpy()
    probs = rows[list(PROB_COLUMNS)].to_numpy(np.float64)
    if np.isfinite(probs).all():
        run["expected_gain"] = probs @ gain_vector(ESCI_GAINS)
        run["esci_pred"] = rows["t_class"].to_numpy()
        run["esci_probs"] = list(probs)
        run["substitute_prob"] = rows["t_sub"].to_numpy()
    return run


def fold_unlabelled_outputs(
    teacher_oof: pd.DataFrame,
    frame: pd.DataFrame,
    cfg: DistillConfig,
    fold_models: Mapping[int, Path],
    stackers: Mapping[int, Stacker],
    out_dir: str | Path,
    teacher_key: str = "",
    test: pd.DataFrame | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    retrieved: RetrievedLists | None = None,
) -> dict[int, pd.DataFrame]:
    """Per fold f: unlabelled pairs for fold f's student, with fold f's teacher's outputs.

    The pairs are ``distill.data.sample_unlabelled`` over the other folds' rows (their queries
    with their products: nothing of fold f), scored by fold f's cross-encoder (``fold_models``,
    trained without fold f) and, for a stacked teacher, fold f's stacker (``stackers``), in lists
    laid out as ``distill.teacher.score_pairs`` does (beside the query's labelled candidates).

    Args:
        teacher_oof: a ``teacher_oof_table`` (its ``fold`` column defines the folds).
        frame: the train+val rows it covers (prepared splits); those whose product or query is
            in ``test`` are left out (``distill.data.drop_test_overlap``).
        cfg: the student's config (``data`` for the sampling, ``teacher`` for the scoring).
        fold_models: fold -> the checkpoint of the cross-encoder trained without that fold.
        stackers: fold -> that fold's stacker (``teacher_oof_and_stackers``); empty for a
            cross-encoder teacher.
        out_dir: where the scores are cached (``distill.teacher.teacher_outputs``'s cache, as
            ``fold<f>_teacher_outputs.parquet`` and ``.json``: read back when the fold model's
            files, the pairs, the settings and ``teacher_key`` match).
        teacher_key: what else identifies the teacher (the out-of-fold table's hash, which fixes
            the fold stackers).
        test: the test split; every set is checked against it (``check_no_test_leak``).
        retrieved: query id -> product ids retrieved from the train+val catalogue, for
            ``cfg.data.retrieved_share``. One catalogue serves every fold, as the teacher's
            catalogue negatives do: ``sample_unlabelled`` takes only products of its pool (the
            other folds' rows), so a fold's own products are skipped wherever they rank.

    Returns:
        fold -> rows with the query and product columns, ``source`` (``unlabelled``, or
        ``synthetic`` for a synthetic query's pairs), no label,
        the teacher columns (``distill.teacher.TEACHER_COLUMNS``) and ``t_threshold``.

    Raises:
        FileNotFoundError: a fold's cross-encoder checkpoint is missing.
        TestLeakError: a set would hold test data (a last check, never expected).
    """
    from esci_reranker.distill.data import check_no_test_leak, sample_unlabelled
    from esci_reranker.distill.teacher import teacher_outputs

    out = Path(out_dir)
    result: dict[int, pd.DataFrame] = {}
    trainable = frame.merge(teacher_oof[["fold", *PAIR_KEY]], on=list(PAIR_KEY), how="inner")
    if test is not None:
        trainable = drop_test_overlap(trainable, test)[0]
    teacher_cols = [c for c in trainable.columns if c.startswith("t_") or c == "fold"]
    for fold in sorted(int(f) for f in trainable["fold"].unique()):
        folder = Path(fold_models[fold]) if fold in fold_models else None
        if folder is None or not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"fold {fold}: no cross-encoder checkpoint ({folder}) to score the fold's unlabelled pairs "
                "with (distill-cv finds them beside --oof: FOLDS/fold<f>/seed<s>/model); or set "
                "data.unlabelled_per_query=0 to cross-validate on the labelled pairs only."
            )
        pool = trainable[trainable["fold"] != fold].drop(columns=teacher_cols).assign(source=LABELLED)
        unlabelled = sample_unlabelled(
            pool, cfg.data, retrieved, avoid_queries=() if test is None else test["query"].astype(str)
        ).drop(columns="draw")
        if unlabelled.empty:
            continue
        pairs = pd.concat(
            [pool, unlabelled[[c for c in unlabelled.columns if c in pool.columns]]], ignore_index=True
        )
        if test is not None:
            check_no_test_leak(pairs, test)
        stacker = stackers.get(fold)
        log(
            f"distill cv: fold {fold}: {len(unlabelled)} unlabelled pairs (in lists with {len(pool)} labelled "
            f"ones) for the fold's teacher ({folder}{' + its stacker' if stacker is not None else ''})"
        )
        outputs = teacher_outputs(
            folder,
            pairs,
            cfg.teacher,
            out,
            progress=progress,
            log=log,
            stacker=stacker,  # the fold's trees: the fold's teacher is never the shipped one
            cache_stem=f"fold{fold}_teacher_outputs",
            key_extra=f"{teacher_key}|{stacker is not None}",
        )
        scored = outputs.frame[(pairs["source"] != LABELLED).to_numpy()].assign(
            t_threshold=float(outputs.info["substitute_threshold"])
        )
        rows = unlabelled.merge(scored, on=list(PAIR_KEY), how="left", validate="one_to_one")
        if rows["t_score"].isna().any():
            raise RuntimeError(f"fold {fold}: unlabelled pairs without teacher outputs (this is a bug).")
        result[fold] = rows.assign(fold=-1)  # its source: unlabelled, or synthetic
    return result


def cross_validate_student(
    teacher_oof: pd.DataFrame,
    frame: pd.DataFrame,
    cfg: DistillConfig,
    seeds: Sequence[int] = (0,),
    test: pd.DataFrame | None = None,
    baseline_runs: Mapping[str, pd.DataFrame] | None = None,
    text_fields: Sequence[str] = DEFAULT_TEXT_FIELDS,
    long_field_chars: int = DEFAULT_LONG_FIELD_CHARS,
    progress: bool = False,
    log: Callable[[str], None] = print,
    done: Mapping[tuple[int, int], dict[str, Any]] | None = None,
    on_entry: Callable[[list[dict[str, Any]]], None] | None = None,
    fold_encoders: Mapping[int, Path] | None = None,
    unlabelled: Mapping[int, pd.DataFrame] | None = None,
) -> list[dict[str, Any]]:
    """Per (fold, seed): the student's and the teacher's metrics on the fold's pairs.

    Args:
        teacher_oof: a ``teacher_oof_table`` (its ``fold`` column defines the folds).
        frame: the train+val rows it covers (prepared splits: product columns, labels).
        cfg: the student's distillation config (``cfg.seed`` is replaced by each of ``seeds``).
        seeds: student training seeds.
        test: the test split, whose products and queries are kept out of every training set.
        baseline_runs: name -> run frame over ``frame``'s rows, evaluated per fold as well.
        text_fields, long_field_chars: the teacher's product text settings (the student's
            unless ``cfg.model`` sets its own).
        done: (fold, seed) -> an entry an earlier, interrupted call finished; kept, not retrained.
        on_entry: called with the entries so far after each (fold, seed), e.g. to save them so
            that an interrupted run can resume.
        fold_encoders: fold -> the checkpoint of the cross-encoder that fold's out-of-fold
            outputs came from (it never saw the fold); the student starts from its encoder when
            ``cfg.model.init`` is ``teacher`` (required then).
        unlabelled: fold -> unlabelled pairs with that fold's teacher's outputs
            (``fold_unlabelled_outputs``), added to the fold's student's training and early
            stopping pairs (by query, as the labelled ones); none = labelled pairs only.

    Returns:
        Entries shaped like the stacker CV's (``stack.cv.cv_summary`` summarises them with
        ``models=DISTILL_CV_MODELS``): ``fold``, ``seed``, ``student``, ``teacher``, each
        ``*_by_type``, the baselines, and the student's ``best_step`` and threshold.
    """
    from esci_reranker.distill.student import student_reranker, train_student
    from esci_reranker.eval.runner import predictions_frame
    from esci_reranker.stack.cv import add_run

    data = frame.merge(teacher_oof, on=list(PAIR_KEY), how="left", validate="one_to_one")
    if data["fold"].isna().any():
        missing = data.loc[data["fold"].isna(), "query_id"].unique()[:3].tolist()
        raise ValueError(f"teacher_oof: no out-of-fold teacher outputs for queries {missing}.")
    folds = sorted(int(f) for f in data["fold"].unique())
    if cfg.model.init == "teacher":
        missing_folds = [f for f in folds if f not in (fold_encoders or {})]
        if missing_folds:
            raise ValueError(
                f"model.init=teacher: no cross-encoder checkpoint for fold(s) {missing_folds} to start "
                "the students from (distill-cv finds them beside --oof: FOLDS/fold<f>/seed<s>/model)."
            )
    trainable = data if test is None else drop_test_overlap(data, test)[0]
    trainable = trainable.assign(source=LABELLED)
    entries: list[dict[str, Any]] = []
    for fold in folds:
        held_out = data[data["fold"] == fold].reset_index(drop=True)
        pool = trainable[trainable["fold"] != fold]
        extra = (unlabelled or {}).get(fold)
        if extra is not None and len(extra):
            if extra["query_id"].isin(set(held_out["query_id"])).any():  # never expected: a last check
                raise ValueError(f"fold {fold}: its unlabelled pairs hold the fold's own queries.")
            pool = pd.concat(
                [pool, extra[[c for c in extra.columns if c in pool.columns]]], ignore_index=True
            )
        for seed in seeds:
            if done and (fold, int(seed)) in done:
                log(
                    f"distill cv: fold {fold + 1}/{len(folds)}, seed {seed}: finished earlier, kept (--resume)"
                )
                entries.append(done[fold, int(seed)])
                continue
            run_cfg = cfg.model_copy(update={"seed": seed}, deep=True)
            val_ids = validation_queries(pool, cfg.data.val_share, cfg.data.seed + seed)
            is_val = pool["query_id"].isin(val_ids)
            log(
                f"distill cv: fold {fold + 1}/{len(folds)}, seed {seed}: student-{cfg.student} on "
                f"{int((~is_val).sum())} pairs ({int((pool['source'] != LABELLED).sum())} unlabelled in "
                f"all; +{int(is_val.sum())} for early stopping), "
                f"scored on {len(held_out)}"
            )
            result = train_student(
                run_cfg,
                pool[~is_val],
                pool[is_val],
                text_fields=tuple(text_fields),
                long_field_chars=long_field_chars,
                progress=progress,
                teacher_encoder=(fold_encoders or {}).get(fold) if cfg.model.init == "teacher" else None,
            )
            reranker = student_reranker(result.model, result.tokenizer, batch_size=cfg.eval.batch_size)
            entry: dict[str, Any] = {
                "fold": fold,
                "seed": int(seed),
                "best_step": result.best_step,
                "substitute_threshold": reranker.substitute_threshold,
                "decision_rules": result.decision_rules,
            }
            add_run(
                entry,
                "student",
                predictions_frame(reranker, held_out, progress=False),
                reranker.substitute_threshold,
            )
            add_run(entry, "teacher", teacher_run(held_out), float(held_out["t_threshold"].iloc[0]))
            fold_queries = set(held_out["query_id"])
            for name, run in (baseline_runs or {}).items():
                add_run(entry, name, run[run["query_id"].isin(fold_queries)].reset_index(drop=True))
            entries.append(entry)
            if on_entry is not None:
                on_entry(entries)
    return entries


def cv_identity(cfg: DistillConfig, teacher_oof: pd.DataFrame, baselines: Sequence[str]) -> dict[str, Any]:
    """What must match for a resumed ``distill-cv`` to keep earlier entries: the student's
    config, the teacher's out-of-fold outputs (hence its folds) and the baselines ranked."""
    table = pd.util.hash_pandas_object(teacher_oof.sort_values(list(PAIR_KEY)), index=False)
    return {
        "config_sha256": config_sha256(cfg),
        # how the unlabelled pairs reach the students (earlier runs trained on labelled pairs only)
        "unlabelled_pairs": "fold teachers" if cfg.data.unlabelled_per_query else "none",
        "teacher_oof_sha256": hashlib.sha256(table.to_numpy().tobytes()).hexdigest(),
        "baselines": sorted(baselines),
    }


def finished_entries(
    path: Path, identity: Mapping[str, Any], seeds: Sequence[int]
) -> dict[tuple[int, int], dict[str, Any]]:
    """(fold, seed) -> entry of the ``distill_cv.json`` at ``path`` (none when it does not exist).

    Raises:
        ValueError: the file was written for another config, teacher or baselines, or holds
            seeds that ``seeds`` leaves out (the resumed run would drop them).
    """
    saved = read_resumable(path, identity, "distill-cv", seeds, "entries")
    if saved is None:
        return {}
    return {(int(e["fold"]), int(e["seed"])): e for e in saved.get("entries", [])}
