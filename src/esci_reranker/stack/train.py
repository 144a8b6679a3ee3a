"""Train a stacked model: out-of-fold cross-encoders, the trees on their outputs, the final cross-encoder.

``model.stacker: gbdt`` in a training config makes ``esci-reranker train`` and ``pipeline`` run
this instead of a single cross-encoder training:

1. the train+val queries are cut into ``stack.folds`` query folds; a cross-encoder is trained
   on all folds but one (to the end of its schedule: ``eval.select: last``, so no held-out
   query chooses its checkpoint) and scores the held-out fold. Every train+val pair thus gets
   cross-encoder outputs from a model that never saw its query (``oof.parquet``);
2. the stacker (``stack.stacker``) is cross-validated on the same folds (``stack_cv.json``:
   stacker against the cross-encoder alone and the baselines, per fold and query type), then
   fitted on every out-of-fold row with its rounds and decision rules chosen by inner query
   folds;
3. the final cross-encoder is trained on all train+val queries with the same schedule (or, with
   ``stack.final_model: soup``, is the mean of the fold models' weights: ``model.soup``) and the
   stacker is saved inside its checkpoint (``stacker/``), so it loads as one model.

The test split is never read here.

Under ``torchrun`` / ``accelerate launch`` every process runs this: each cross-encoder trains
data-parallel and the out-of-fold scoring is shared out (``train.cv``); the trees, the CV tables
and every file write happen on the main process while the others wait
(``train.distributed.on_main``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from esci_reranker.stack.features import FEATURE_NAMES, is_list_relative
from esci_reranker.stack.outputs import CE_COLUMNS
from esci_reranker.stack.stacker import STACKER_DIR, GBDTParams, Stacker, feature_columns, fit_stacker
from esci_reranker.train.config import TrainConfig

#: Validation steps for the fold and final models: none but the last (cheap, and only logged).
_NO_MIDWAY_EVAL = 10**9


@dataclass
class StackedTrainResult:
    """Where the stacked model is and what cross-validation said of it."""

    save_path: Path
    cv: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    rounds: dict[str, int] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=dict)


@dataclass
class StackedCV:
    """A stacked config's cross-validation: per (fold, seed) entries, their summary, the tables."""

    entries: list[dict[str, Any]]
    summary: dict[str, Any]
    #: seed -> the out-of-fold stack table (features + cross-encoder columns) of every train+val row
    tables: dict[int, pd.DataFrame] = field(repr=False, default_factory=dict)


def fixed_schedule(cfg: TrainConfig) -> TrainConfig:
    """A copy of ``cfg`` as the fold and final models train: to the end of the schedule
    (``eval.select: last``), no validation before or midway."""
    run = cfg.model_copy(deep=True)
    run.eval.select = "last"
    run.eval.at_start = False
    run.eval.every_steps = _NO_MIDWAY_EVAL
    return run


def train_fixed(
    cfg: TrainConfig,
    rows: pd.DataFrame,
    train_path: Path,
    seed: int | None = None,
    save_path: Path | None = None,
    run_dir: Path | None = None,
    progress: bool = False,
    resume: bool = False,
) -> Path:
    """Train ``cfg``'s cross-encoder on ``rows`` alone (written to ``train_path``) to the end of its
    schedule, as the fold and final models are trained; ``seed``, ``save_path`` and ``run_dir``
    replace the config's when given. With ``resume``, a run interrupted after a periodic
    checkpoint continues from it (one that finished only saves its model again). Returns where
    the model is."""
    from esci_reranker.train.distributed import on_main
    from esci_reranker.train.loop import STATE_NAME, train

    run = fixed_schedule(cfg)
    if seed is not None:
        run.seed = seed
    if save_path is not None:
        run.output.save_path = save_path
    if run_dir is not None:
        run.output.run_dir = run_dir

    def write_rows() -> None:
        train_path.parent.mkdir(parents=True, exist_ok=True)
        rows.to_parquet(train_path, index=False)

    on_main(write_rows)
    run.data.dir = None
    run.data.train = train_path
    # absent files: with select 'last' the model needs no validation split, and a test split is
    # the caller's to evaluate (with the stacker)
    run.data.val = train_path.with_name("no_val.parquet")
    run.data.test = train_path.with_name("no_test.parquet")
    checkpoint = run.output.resolved_run_dir() / "last" / STATE_NAME
    train(run, progress=progress, evaluate_test=False, resume=resume and checkpoint.is_file())
    return Path(run.output.save_path)


def fit_config_stacker(cfg: TrainConfig, table: pd.DataFrame, seed: int) -> Stacker:
    """The stacker of ``cfg``'s ``stack`` section fitted on a stack table (every feature column
    but ``stack.exclude_features``; rounds and decision rules chosen by inner query folds)."""
    names = feature_columns(table, exclude=cfg.stack.exclude_features)
    stacker, _ = fit_stacker(table, gbdt_params(cfg, seed), **fit_options(cfg, names))
    return stacker


def _feature_set(choice: str, names: Sequence[str]) -> list[str]:
    """``names`` for 'all'; for 'pointwise' those that are not list-relative."""
    return [n for n in names if not is_list_relative(n)] if choice == "pointwise" else list(names)


def is_stack_feature(name: str) -> bool:
    """Whether some stack table can have feature column ``name``: a cross-encoder output, a pair
    feature or a list-relative one (``stack.features``)."""
    return name in CE_COLUMNS or name in FEATURE_NAMES or is_list_relative(name)


def class_features(cfg: TrainConfig, names: Sequence[str]) -> list[str]:
    """The Task 2/3 trees' feature columns among ``names`` (``stack.class_features`` less
    ``stack.class_exclude_features``).

    Raises:
        ValueError: a name of ``stack.class_exclude_features`` that is neither among ``names`` nor
            a feature any stack table can have (a typo would otherwise exclude nothing).
    """
    excluded = set(cfg.stack.class_exclude_features)
    unknown = sorted(n for n in excluded if n not in names and not is_stack_feature(n))
    if unknown:
        raise ValueError(
            f"stack.class_exclude_features: {unknown} name no feature of the stack table; expected "
            "names such as 'ce_p_I_rank' or 'cov_title' (stack.features)."
        )
    return [n for n in _feature_set(cfg.stack.class_features, names) if n not in excluded]


def rank_features(cfg: TrainConfig, names: Sequence[str]) -> list[str]:
    """The ranker's feature columns among ``names`` (``stack.rank_features``)."""
    return _feature_set(cfg.stack.rank_features, names)


def fit_options(cfg: TrainConfig, names: Sequence[str]) -> dict[str, Any]:
    """Every keyword option of ``fit_stacker`` (and ``fold_stackers``) that a config's ``stack``
    section sets, for feature columns ``names``: the ranker's and the class trees' features, the
    rule objectives and the rest, so no caller can leave one of them out."""
    return {
        "features": rank_features(cfg, names),
        "task2_objective": cfg.stack.task2_objective,
        "task3_objective": cfg.stack.task3_objective,
        "class_features": class_features(cfg, names),
        "calibrate": cfg.stack.calibrate,
        "rank_negatives": cfg.stack.rank_negatives,
        "class_negatives": cfg.stack.class_negatives,
        "rules_on": cfg.stack.rules_on,
        "macro_weight": cfg.stack.task2_macro_weight,
        "min_irrelevant_recall": cfg.stack.task2_min_irrelevant_recall,
    }


#: Called after the out-of-fold cross-encoders are trained: (their folder, the seeds) -> the
#: catalogue negatives with their out-of-fold cross-encoder columns (``stack.cv.NEGATIVE_COLUMNS``),
#: or None. Retrieval lives above this layer, so the caller passes it in.
NegativesFn = Callable[[Path, tuple[int, ...]], "pd.DataFrame | None"]
#: (seed, fold, the fold's stacker, the fold's held-out judged rows) -> extra keys for the CV
#: entry (e.g. the search flow of the fold's queries, which needs a catalogue to retrieve from).
OnFoldFn = Callable[[int, int, Stacker, pd.DataFrame], Mapping[str, Any]]
#: (the folder the fold models are trained in, the queries a cross-encoder holds out) -> extra
#: training rows for that cross-encoder (catalogue negatives labelled I), or None.
TrainRowsFn = Callable[[Path, frozenset[int]], "pd.DataFrame | None"]


def gbdt_params(cfg: TrainConfig, seed: int) -> GBDTParams:
    """The LightGBM settings of a config's ``stack`` section."""
    # every LightGBM setting the section names (the rest keep GBDTParams' defaults)
    shared = {f.name for f in dataclasses.fields(GBDTParams)} & set(type(cfg.stack).model_fields)
    return GBDTParams(**cfg.stack.model_dump(include=shared), seed=seed)


def cross_validate_stacked(
    cfg: TrainConfig,
    frame: pd.DataFrame,
    out_dir: Path,
    folds: int,
    seeds: tuple[int, ...],
    baselines: tuple[str, ...] = ("bm25", "bi-encoder"),
    progress: bool = False,
    log: Callable[[str], None] = print,
    resume: bool = False,
    negatives: NegativesFn | None = None,
    on_fold: OnFoldFn | None = None,
    train_rows: TrainRowsFn | None = None,
) -> StackedCV:
    """Cross-validate a stacked config over the query folds of ``frame`` (train+val).

    For each seed: out-of-fold cross-encoders on ``folds`` query folds (``out_dir/oof.parquet``),
    then ``stack.cv.cross_validate_stacker`` on the same folds, beside the cross-encoder alone
    and the ``baselines``. Writes ``out_dir/stack_cv.json`` (entries and summary). ``resume``
    keeps the fold models an earlier call finished (``train.cv.cross_validate``). ``negatives``,
    ``on_fold`` and ``train_rows``: see ``NegativesFn``, ``OnFoldFn`` and ``TrainRowsFn``.

    With several processes the trees run on the main process; the others get the entries and
    the summary but no ``tables``.
    """
    from esci_reranker.train.cv import cross_validate
    from esci_reranker.train.distributed import is_main_process, on_main

    cross_validate(
        fixed_schedule(cfg),
        out_dir,
        out_dir,
        folds=folds,
        seeds=seeds,
        progress=progress,
        baselines=(),
        oof=True,
        frame=frame,
        log=lambda line: log(f"      cross-encoder {line}"),
        resume=resume,
        extra_rows=None if train_rows is None else functools.partial(train_rows, out_dir),
    )

    def trees() -> StackedCV:
        oof = pd.read_parquet(out_dir / "oof.parquet")
        negative_rows = negatives(out_dir, seeds) if negatives is not None else None
        return cross_validate_trees(
            cfg,
            stack_frame(cfg, frame),
            oof,
            out_dir,
            seeds,
            baselines,
            log,
            negatives=negative_rows,
            on_fold=on_fold,
        )

    cv = trees() if is_main_process() else None
    # the stack tables stay on the main process, the only one that fits trees
    entries, summary = on_main(lambda: (cv.entries, cv.summary) if cv is not None else ([], {}))
    return cv if cv is not None else StackedCV(entries, summary)


def stack_frame(cfg: TrainConfig, frame: pd.DataFrame) -> pd.DataFrame:
    """The train+val table the trees' features read: ``frame`` when it holds every product field,
    else the table read again whole from ``cfg.data`` (a stacked training keeps only the training
    columns while its cross-encoders train: on the full data the rest is ~3 GiB a process).

    Raises:
        ValueError: the table read again is not ``frame``'s rows (the splits changed meanwhile).
    """
    from esci_reranker.data.text import FIELD_COLUMNS
    from esci_reranker.stack.features import PRODUCT_FIELDS
    from esci_reranker.train.loop import read_train_val

    if all(FIELD_COLUMNS[name] in frame.columns for name in PRODUCT_FIELDS):
        return frame
    full = read_train_val(cfg.data)
    if len(full) != len(frame) or not full["product_id"].equals(frame["product_id"]):
        raise ValueError(
            f"{cfg.data.resolve('train')}: the train+val splits changed while the stacked model trained "
            f"({len(frame)} rows read before, {len(full)} now); run it again."
        )
    return full


def cross_validate_trees(
    cfg: TrainConfig,
    frame: pd.DataFrame,
    oof: pd.DataFrame,
    out_dir: Path,
    seeds: tuple[int, ...],
    baselines: tuple[str, ...] = ("bm25", "bi-encoder"),
    log: Callable[[str], None] = print,
    negatives: pd.DataFrame | None = None,
    on_fold: OnFoldFn | None = None,
) -> StackedCV:
    """The stacker half of ``cross_validate_stacked``, on out-of-fold outputs already made
    (``oof``: an ``oof.parquet`` of this config's fold models, on ``frame``'s rows), so the
    trees' settings and features can be compared in minutes. Writes ``out_dir/stack_cv.json``
    and ``out_dir/stack_oof.parquet``: every held-out judged row's stacker output, with ``seed``
    (``stack.cv.stack_predictions``).

    Raises:
        ValueError: ``oof`` has no outputs for a row of ``frame`` and a seed of ``seeds``.
    """
    from esci_reranker.eval.baselines import run_baseline
    from esci_reranker.fsutil import write_json
    from esci_reranker.stack.cv import cross_validate_stacker, cv_summary, fold_stackers, oof_stack_table

    missing = [c for c in ("fold", "seed", "query_id", "product_id", "ce_score") if c not in oof.columns]
    if missing:
        raise ValueError(
            f"oof table: no column(s) {missing}; expected an oof.parquet written by cv or pipeline."
        )
    folds = int(oof["fold"].nunique())
    runs = {name: run_baseline(name, frame, text_fields=cfg.model.text_fields).run for name in baselines}
    entries: list[dict[str, Any]] = []
    tables: dict[int, pd.DataFrame] = {}
    predictions: list[pd.DataFrame] = []
    for seed in seeds:
        tables[seed] = table = oof_stack_table(frame, oof, seed, negatives)
        names = feature_columns(table, exclude=cfg.stack.exclude_features)
        extra = f", {int(table['is_negative'].sum())} catalogue negatives" if "is_negative" in table else ""
        log(f"      stacker, seed {seed}: cross-validate on the {folds} folds ({len(names)} features{extra})")
        fitted = fold_stackers(table, gbdt_params(cfg, seed), **fit_options(cfg, names))
        seed_predictions: list[pd.DataFrame] = []
        for entry in cross_validate_stacker(
            fitted,
            baseline_runs=runs,
            on_fold=None if on_fold is None else functools.partial(on_fold, seed),
            predictions=seed_predictions,
        ):
            entries.append({"seed": seed, **entry})
        predictions += [p.assign(seed=seed) for p in seed_predictions]
    summary = cv_summary(entries)
    write_json(out_dir / "stack_cv.json", {"summary": summary, "entries": entries}, nan_as_null=True)
    if predictions:
        oof_rows = pd.concat(predictions, ignore_index=True)
        oof_rows.insert(0, "seed", oof_rows.pop("seed"))
        oof_rows.to_parquet(out_dir / "stack_oof.parquet", index=False)
    return StackedCV(entries, summary, tables)


def train_stacked(
    cfg: TrainConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
    baselines: tuple[str, ...] = ("bm25", "bi-encoder"),
    negatives: NegativesFn | None = None,
    on_fold: OnFoldFn | None = None,
    train_rows: TrainRowsFn | None = None,
    resume: bool = False,
    frame: pd.DataFrame | None = None,
) -> StackedTrainResult:
    """Run the three stages of the module docstring for ``cfg`` (``model.stacker: gbdt``).

    Writes the model to ``cfg.output.save_path`` (cross-encoder + ``stacker/``) and the fold
    models, ``oof.parquet`` and ``stack_cv.json`` under the run directory's ``folds/``.
    ``baselines`` are ranked on every fold beside the stacker (``random`` is left out);
    ``negatives``, ``on_fold`` and ``train_rows`` as in ``cross_validate_stacked`` (the final
    stacker and cross-encoder learn from the same kinds of negatives as the CV's). ``resume``
    continues an interrupted run of the same config and data: the fold models it finished (model
    and out-of-fold rows) are kept, the trees are fitted again (minutes), and the final
    cross-encoder continues from its last checkpoint. Every process returns the same result.
    ``frame`` is the train+val table when the caller holds it already, else it is read here: the
    columns training reads (``train.loop.training_columns``); the trees read the rest when they
    need it (``stack_frame``).
    """
    from esci_reranker.reranker import Reranker
    from esci_reranker.train.distributed import is_main_process, on_main
    from esci_reranker.train.loop import read_train_val, training_columns

    if cfg.model.stacker != "gbdt":
        raise ValueError(f"train_stacked: model.stacker is {cfg.model.stacker!r}; expected 'gbdt'.")
    if not is_main_process():
        log = _quiet  # one process speaks for the job
    seconds: dict[str, float] = {}
    run_dir = cfg.output.resolved_run_dir()
    if frame is None:
        frame = read_train_val(cfg.data, training_columns(cfg.model.text_fields))

    t = time.perf_counter()
    cv = cross_validate_stacked(
        cfg,
        frame,
        run_dir / "folds",
        cfg.stack.folds,
        (cfg.seed,),
        baselines=tuple(b for b in baselines if b != "random"),
        progress=progress,
        log=log,
        resume=resume,
        negatives=negatives,
        on_fold=on_fold,
        train_rows=train_rows,
    )
    seconds["cross_validation"] = time.perf_counter() - t

    t = time.perf_counter()
    log("      stacker: fit on every out-of-fold row")
    # the main process fits it; the others go on to the final model and wait for it there
    stacker = fit_config_stacker(cfg, cv.tables[cfg.seed], cfg.seed) if is_main_process() else None
    seconds["stacker"] = time.perf_counter() - t

    t = time.perf_counter()
    if cfg.stack.final_model == "soup":
        save_path = _soup_of_folds(cfg, run_dir / "folds", log)
    else:
        log(f"      cross-encoder: final model on all {frame['query_id'].nunique()} train+val queries")
        rows = frame
        if train_rows is not None and is_main_process():  # the main process writes the rows
            extra = train_rows(run_dir / "folds", frozenset())
            rows = frame if extra is None else pd.concat([frame, extra], ignore_index=True)
        save_path = train_fixed(cfg, rows, run_dir / "train_all.parquet", progress=progress, resume=resume)

    def finish() -> StackedTrainResult:
        if stacker is None:
            raise RuntimeError("train_stacked: the stacker is fitted on the main process only.")
        stacker.info["cv"] = cv.summary["overall"]
        stacker.save(save_path / STACKER_DIR)
        Reranker.from_pretrained(save_path)  # fail here, not in the user's hands, if it does not load
        seconds["final_model"] = time.perf_counter() - t
        (run_dir / "stack_timings.json").write_text(json.dumps(seconds, indent=2) + "\n")
        return StackedTrainResult(save_path, cv.summary, seconds, stacker.rounds, stacker.rules.to_dict())

    return on_main(finish)


def _soup_of_folds(cfg: TrainConfig, fold_dir: Path, log: Callable[[str], None]) -> Path:
    """``stack.final_model: soup``: the mean of the out-of-fold models' weights (this seed's) is the
    final cross-encoder, written by the main process to ``cfg.output.save_path``."""
    from esci_reranker.model.soup import average_checkpoints
    from esci_reranker.train.cv import fold_model_dir
    from esci_reranker.train.distributed import on_main

    folds = [fold_model_dir(fold_dir, fold, cfg.seed) for fold in range(cfg.stack.folds)]
    log(f"      cross-encoder: final model = the mean of the {len(folds)} fold models' weights")
    return on_main(lambda: average_checkpoints(folds, Path(cfg.output.save_path)))


def _quiet(line: str) -> None:
    """A log that drops its lines (the processes other than the main one)."""
