"""Train a stacked model: out-of-fold cross-encoders, the trees on their outputs, the final cross-encoder.

``model.stacker: gbdt`` in a training config makes ``esci-reranker train`` and ``pipeline`` run
this instead of a single cross-encoder training:

1. the train+val queries are cut into ``stack.folds`` query folds; a cross-encoder is trained
   on all folds but one (to the end of its schedule: ``eval.select: last``, so no held-out
   query chooses its checkpoint) and scores the held-out fold. Every train+val pair thus gets
   cross-encoder outputs from a model that never saw its query (``oof.parquet``);
2. the stacker (``stack.stacker``) is cross-validated on the same folds (``stack_cv.json``:
   stacker against the cross-encoder alone, per fold and query type), then fitted on every
   out-of-fold row with its rounds and decision rules chosen by inner query folds;
3. the final cross-encoder is trained on all train+val queries with the same schedule and the
   stacker is saved inside its checkpoint (``stacker/``), so it loads as one model.

The test split is never read here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esci_reranker.train.config import TrainConfig

#: Validation steps for the fold and final models: none but the last (cheap, and only logged).
_NO_MIDWAY_EVAL = 10**9


@dataclass
class StackedTrainResult:
    """Where the stacked model is and what cross-validation said of it."""

    save_path: Path
    cv: list[dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)
    rounds: dict[str, int] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=dict)

    def cv_means(self) -> dict[str, dict[str, float]]:
        """Mean over folds of each model's headline metrics (``stack.cv.summary_metrics``)."""
        return cv_means(self.cv)


def cv_means(entries: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean over folds of ``stacker`` and ``cross_encoder`` metrics of ``cross_validate_stacker`` entries."""
    out: dict[str, dict[str, float]] = {}
    for model in ("stacker", "cross_encoder"):
        rows = [e[model] for e in entries if model in e]
        if rows:
            out[model] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return out


def _fixed_schedule(cfg: TrainConfig) -> TrainConfig:
    run = cfg.model_copy(deep=True)
    run.eval.select = "last"
    run.eval.at_start = False
    run.eval.every_steps = _NO_MIDWAY_EVAL
    return run


def train_stacked(
    cfg: TrainConfig, progress: bool = True, log: Callable[[str], None] = print
) -> StackedTrainResult:
    """Run the three stages of the module docstring for ``cfg`` (``model.stacker: gbdt``).

    Writes the model to ``cfg.output.save_path`` (cross-encoder + ``stacker/``) and the fold
    models, ``oof.parquet`` and ``stack_cv.json`` under the run directory.
    """
    from esci_reranker.fsutil import write_json
    from esci_reranker.reranker import Reranker
    from esci_reranker.stack.cv import cross_validate_stacker, oof_stack_table
    from esci_reranker.stack.stacker import STACKER_DIR, GBDTParams, feature_columns, fit_stacker
    from esci_reranker.train.cv import cross_validate
    from esci_reranker.train.loop import read_split, train

    if cfg.model.stacker != "gbdt":
        raise ValueError(f"train_stacked: model.stacker is {cfg.model.stacker!r}; expected 'gbdt'.")
    seconds: dict[str, float] = {}
    run_dir = cfg.output.resolved_run_dir()
    frame = pd.concat(
        [read_split(cfg.data.resolve("train"), "train"), read_split(cfg.data.resolve("val"), "val")],
        ignore_index=True,
    )
    fixed = _fixed_schedule(cfg)

    t = time.perf_counter()
    folds_dir = run_dir / "folds"
    cross_validate(
        fixed,
        folds_dir,
        folds_dir,
        folds=cfg.stack.folds,
        seeds=(cfg.seed,),
        progress=progress,
        baselines=(),
        oof=True,
        frame=frame,
        log=lambda line: log(f"      cross-encoder {line}"),
    )
    seconds["fold_models"] = time.perf_counter() - t

    t = time.perf_counter()
    oof = pd.read_parquet(folds_dir / "oof.parquet")
    table = oof_stack_table(frame, oof, cfg.seed)
    s = cfg.stack
    params = GBDTParams(
        num_leaves=s.num_leaves,
        learning_rate=s.learning_rate,
        min_data_in_leaf=s.min_data_in_leaf,
        feature_fraction=s.feature_fraction,
        bagging_fraction=s.bagging_fraction,
        lambda_l2=s.lambda_l2,
        max_rounds=s.max_rounds,
        inner_folds=s.inner_folds,
        seed=cfg.seed,
    )
    names = feature_columns(table, exclude=s.exclude_features)
    log(
        f"      stacker: cross-validate on the {cfg.stack.folds} folds' out-of-fold rows ({len(names)} features)"
    )
    cv = cross_validate_stacker(table, params, names, s.task2_objective, s.task3_objective)
    write_json(run_dir / "stack_cv.json", {"folds": cv, "means": cv_means(cv)})
    log("      stacker: fit on every out-of-fold row")
    stacker, _ = fit_stacker(
        table, params, features=names, task2_objective=s.task2_objective, task3_objective=s.task3_objective
    )
    seconds["stacker"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"      cross-encoder: final model on all {frame['query_id'].nunique()} train+val queries")
    final = fixed.model_copy(deep=True)
    all_path = run_dir / "train_all.parquet"
    all_path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(all_path, index=False)
    final.data.train = all_path
    # absent files: with select 'last' the final model needs no validation split, and the test
    # split is the caller's to evaluate (with the stacker)
    final.data.val = run_dir / "no_val.parquet"
    final.data.test = run_dir / "no_test.parquet"
    final.data.dir = None
    train(final, progress=progress, evaluate_test=False)
    save_path = Path(cfg.output.save_path)
    stacker.info["cv_means"] = cv_means(cv)
    stacker.save(save_path / STACKER_DIR)
    Reranker.from_pretrained(save_path)  # fail here, not in the user's hands, if it does not load
    seconds["final_model"] = time.perf_counter() - t
    (run_dir / "stack_timings.json").write_text(json.dumps(seconds, indent=2) + "\n")
    return StackedTrainResult(save_path, cv, seconds, stacker.rounds, stacker.rules.to_dict())
