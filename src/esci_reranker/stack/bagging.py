"""Bagged fold cross-encoders against one cross-encoder as the stacker's first stage (nested CV).

The stacked default feeds its trees the outputs of one cross-encoder trained on all train+val
queries, while the trees learned from out-of-fold outputs of models that each saw 3/4 of them.
The alternative the KDD Cup 2022 winners used: keep the k fold models and feed the trees the
mean of their outputs (k times the inference cost). Which is better has to be measured without
letting a query score itself, which takes one more level of folds:

for each outer fold ``f`` (its queries are the test queries) and each other fold ``g``, a
cross-encoder ``M[f, g]`` trains on the folds that are neither ``f`` nor ``g`` (half the queries
with 4 folds), to the end of its schedule as the stacked default's fold models do. Its outputs on
fold ``g`` are the trees' out-of-fold training rows for outer fold ``f``; its outputs on fold
``f`` are averaged over ``g`` into the **bagged** test features. The **one model** test
features are those of ``M[f]``, the ordinary out-of-fold model trained on every fold but ``f``
(``oof.parquet`` of ``cv`` / ``pipeline``). The same trees score fold ``f`` from both, so the
comparison is paired: only the first stage differs. As in deployment, the trees meet a first
stage stronger than the one they learned from (there: the final model on all queries, or the
bag of fold models; here: ``M[f]`` on 3/4, or the bag of ``M[f, g]`` on 1/2).

Cost: ``k (k - 1)`` trainings on ``(k - 2) / k`` of the queries per seed (12 on half with k=4,
about twice the out-of-fold stage). The test split is never read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esci_reranker.stack.cv import add_run, cross_encoder_run, oof_stack_table, stacker_run
from esci_reranker.stack.outputs import CE_COLUMNS, frame_outputs
from esci_reranker.train.config import TrainConfig

#: The two first stages compared, as named in the entries.
FIRST_STAGES: tuple[str, ...] = ("one_model", "bagged")


def mean_outputs(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """The row-wise mean of the cross-encoder columns of several models' outputs on the same rows.

    Raises:
        ValueError: the tables do not hold the same (query, product) rows in the same order.
    """
    if not tables:
        raise ValueError("mean_outputs: no tables.")
    first = tables[0]
    keys = ["query_id", "product_id"]
    for other in tables[1:]:
        if not first[keys].reset_index(drop=True).equals(other[keys].reset_index(drop=True)):
            raise ValueError("mean_outputs: the tables hold different rows; score the same frame.")
    out = first.reset_index(drop=True).copy()
    for column in (c for c in CE_COLUMNS if c in first.columns):
        out[column] = np.mean([t[column].to_numpy(np.float64) for t in tables], axis=0)
    return out


def cross_validate_bagging(
    cfg: TrainConfig,
    frame: pd.DataFrame,
    oof: pd.DataFrame,
    out_dir: Path,
    folds: int,
    seed: int,
    log: Callable[[str], None] = print,
    train_rows: Callable[[frozenset[int]], pd.DataFrame | None] | None = None,
) -> list[dict[str, Any]]:
    """The nested comparison of the module docstring for one training seed.

    Args:
        cfg: a stacked training config (its cross-encoder and ``stack`` settings).
        frame: the train+val rows, as ``cross_validate`` folds them.
        oof: the out-of-fold outputs of ``cfg``'s fold models for ``seed`` (``oof.parquet``,
            with ``fold`` and ``seed`` columns): the one-model first stage.
        out_dir: where the inner fold models go (``f{f}g{g}/``).
        train_rows: the queries an inner cross-encoder holds out -> its extra training rows
            (the catalogue negatives of a config with ``stack.encoder_negatives``), as the
            one-model first stage's cross-encoders got them; None for none.

    Returns:
        One entry per outer fold: ``fold``, and per first stage ``stacker_<stage>`` and
        ``cross_encoder_<stage>`` (``stack.cv.summary_metrics``, with ``*_by_type``).

    Raises:
        ValueError: ``oof`` lacks ``seed`` or does not cover ``frame``'s queries with the folds
            ``cross_validate`` makes of them.
    """
    from esci_reranker.reranker import Reranker
    from esci_reranker.stack.train import fit_config_stacker, train_fixed
    from esci_reranker.train.cv import query_folds

    fold_sets = query_folds(frame["query_id"].to_numpy(), folds)
    part = oof[oof["seed"] == seed]
    if part.empty:
        raise ValueError(f"oof table: no rows for seed {seed}.")
    for f, queries in enumerate(fold_sets):
        if set(part.loc[part["fold"] == f, "query_id"]) != queries:
            raise ValueError(
                f"oof table: fold {f} of seed {seed} does not hold the queries cross_validate puts in "
                f"fold {f} of these {frame['query_id'].nunique()} queries; score them with the same folds."
            )
    entries: list[dict[str, Any]] = []
    for f, test_queries in enumerate(fold_sets):
        test = frame[frame["query_id"].isin(test_queries)].reset_index(drop=True)
        inner_rows, bag = [], []
        for g, held in enumerate(fold_sets):
            if g == f:
                continue
            log(f"      bagging: outer fold {f + 1}/{folds}, inner model without folds {f + 1} and {g + 1}")
            folder = out_dir / f"f{f}g{g}"
            rows = frame[~frame["query_id"].isin(test_queries | held)]
            extra = train_rows(frozenset(test_queries | held)) if train_rows is not None else None
            if extra is not None:
                rows = pd.concat([rows, extra], ignore_index=True)
            saved = train_fixed(cfg, rows, folder / "train.parquet", seed, folder / "model", folder / "train")
            model = Reranker.from_pretrained(saved, precision=cfg.eval.precision)
            rows = frame_outputs(model, frame[frame["query_id"].isin(held)])
            rows.insert(0, "fold", g)
            inner_rows.append(rows)
            bag.append(frame_outputs(model, test))
        inner = pd.concat(inner_rows, ignore_index=True)
        inner.insert(0, "seed", seed)
        train_table = oof_stack_table(frame[~frame["query_id"].isin(test_queries)], inner, seed)
        stacker = fit_config_stacker(cfg, train_table, seed)
        bagged = mean_outputs(bag)
        bagged.insert(0, "fold", f)
        bagged.insert(0, "seed", seed)
        first_stages = {"one_model": part[part["fold"] == f], "bagged": bagged}
        entry: dict[str, Any] = {"fold": f, "seed": seed, "rounds": stacker.rounds}
        for stage, outputs in first_stages.items():
            table = oof_stack_table(test, outputs, seed)
            add_run(
                entry, f"stacker_{stage}", stacker_run(stacker, table), stacker.rules.substitute_threshold
            )
            add_run(entry, f"cross_encoder_{stage}", cross_encoder_run(table))
        entries.append(entry)
    return entries
