"""Gradient-boosted trees over the stack features: LightGBM lambdarank (Task 1), multiclass (Task 2)
and binary (Task 3), with their rounds chosen by query-grouped cross-validation.

With ~100 training queries the number of boosting rounds is the knob that decides between
learning and memorising. Each tree model is trained on ``inner_folds`` query folds with the
held-out fold as validation, the per-round validation curves are averaged over folds and the
best round of the mean curve is kept; the final model is refitted on all queries with that many
rounds. The same inner folds give out-of-fold predictions of every training query at the chosen
round: the decision rules (``stack.rules``) are fitted on those.

**Bags.** With ``bags`` > 1 each task is fitted that many times with other seeds (other inner
folds, row and feature samples), and predicts the mean of its members; the out-of-fold
predictions the rules are fitted on are the members' mean too. On ~100 queries one fit moves a
lot with its seed, or with output changes as small as bf16 against fp32 scoring (judged-I recall
by ~0.05 a fold); the mean of three moves a quarter as much (docs/results.md).

**Catalogue negatives.** A stack table may hold rows marked ``is_negative``: products retrieved
for a training query from the training catalogue but judged only for other queries, labelled I
and given a ``weight``. The class and substitute trees learn from them what a search page shows
them (judged lists hold almost only products retrieved for their query); the ranker reads them
only when asked (``rank_negatives``). Each task may read its own feature subset, so the class
trees can leave out the list-relative features that make a label depend on the other candidates.

**Calibration.** The class probabilities are calibrated (``stack.calibration``) on the inner
out-of-fold predictions of the judged rows, and the decision rules are fitted on the calibrated
probabilities; ``predict`` returns calibrated probabilities.

Saved as plain files in a ``stacker/`` folder of the checkpoint: each booster in LightGBM's own
text format and ``stacker.json`` (feature names per task, parameters, chosen rounds, calibration,
decision rules). No pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np
import pandas as pd

from esci_reranker.labels import ESCI_LABELS, LABEL_TO_INDEX
from esci_reranker.model.config import STACKER_DIR as STACKER_DIR  # the checkpoint layout is model/'s
from esci_reranker.model.config import STACKER_MANIFEST as MANIFEST_NAME
from esci_reranker.model.config import has_stacker as has_stacker
from esci_reranker.stack.calibration import ClassCalibration, fit_calibration
from esci_reranker.stack.rules import DecisionRules, fit_class_offsets, fit_threshold

#: 2 adds per-task feature lists and the class calibration; 3 bags of boosters per task
#: (``TASK.txt``, ``TASK.1.txt``, ...). Earlier folders still load.
FORMAT_VERSION: Final[int] = 3
READABLE_VERSIONS: Final[tuple[int, ...]] = (1, 2, 3)
#: Seed step between the members of a bag (far from the CV's training seeds 0, 1, 2, ...).
BAG_SEED_STEP: Final[int] = 1000
#: Relevance grade of each label for lambdarank, and LightGBM's ``label_gain`` per grade, so
#: LightGBM's nDCG uses the ESCI gains (I=0, C=0.01, S=0.1, E=1).
RANK_GRADE: Final[Mapping[str, int]] = {"I": 0, "C": 1, "S": 2, "E": 3}
TASKS: Final[tuple[str, ...]] = ("ranker", "classifier", "substitute")
SUBSTITUTE: Final[int] = LABEL_TO_INDEX["S"]


@dataclass
class GBDTParams:
    """LightGBM settings shared by the three models (strongly regularised: ~100 queries)."""

    num_leaves: int = 7
    learning_rate: float = 0.05
    min_data_in_leaf: int = 40
    feature_fraction: float = 0.7
    bagging_fraction: float = 0.8
    bagging_freq: int = 1
    lambda_l2: float = 10.0
    max_rounds: int = 400
    inner_folds: int = 4
    seed: int = 0
    #: fits per task, each with seed ``seed + BAG_SEED_STEP * i``; the task predicts their mean
    bags: int = 1

    def lgb_params(self, task: str, gains: Sequence[float]) -> dict[str, Any]:
        """LightGBM's parameter dict for ``task`` (one of ``TASKS``)."""
        base: dict[str, Any] = {
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": self.bagging_freq,
            "lambda_l2": self.lambda_l2,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": 1,  # small data: threads cost more than they give, and results stay fixed
            "verbosity": -1,
        }
        if task == "ranker":
            # the gain of each grade in RANK_GRADE order; eval over the whole list (official nDCG)
            label_gain = [gains[ESCI_LABELS.index(label)] for label in sorted(RANK_GRADE, key=RANK_GRADE.get)]
            return base | {
                "objective": "lambdarank",
                "metric": "ndcg",
                "eval_at": [1000],
                "label_gain": label_gain,
                "lambdarank_truncation_level": 1000,
            }
        if task == "classifier":
            return base | {
                "objective": "multiclass",
                "num_class": len(ESCI_LABELS),
                "metric": "multi_logloss",
            }
        if task == "substitute":
            return base | {"objective": "binary", "metric": "binary_logloss"}
        raise ValueError(f"task {task!r}; expected one of {TASKS}.")


def _targets(labels: Sequence[str], task: str) -> np.ndarray:
    if task == "ranker":
        return np.array([RANK_GRADE[x] for x in labels], dtype=np.int32)
    index = np.array([LABEL_TO_INDEX[x] for x in labels], dtype=np.int32)
    return index if task == "classifier" else (index == SUBSTITUTE).astype(np.int32)


def inner_query_folds(groups: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Row-index arrays of ``folds`` query-disjoint validation folds (seeded)."""
    unique = np.unique(groups)
    if len(unique) < folds:
        raise ValueError(f"stacker: {len(unique)} queries cannot make {folds} inner folds.")
    order = np.random.default_rng(seed).permutation(unique)
    return [np.flatnonzero(np.isin(groups, order[i::folds])) for i in range(folds)]


def _dataset(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    task: str,
    names: list[str],
    weights: np.ndarray | None = None,
) -> Any:
    import lightgbm as lgb

    ds = lgb.Dataset(x, label=y, weight=weights, feature_name=names, free_raw_data=False)
    if task == "ranker":
        # rows sorted by query code (``fit_task``), so np.unique's order is the rows' order
        ds.set_group(np.unique(groups, return_counts=True)[1])
    return ds


def _sorted_by_group(groups: np.ndarray) -> np.ndarray:
    return np.argsort(groups, kind="stable")


@dataclass
class TaskFit:
    """One task's model: the rounds chosen, the mean inner-CV curve and out-of-fold predictions.

    For a bag: ``rounds`` and ``curve`` are its first member's, ``member_rounds`` every member's,
    ``oof`` the members' mean."""

    booster: BoosterBag
    rounds: int
    curve: list[float]
    oof: np.ndarray
    member_rounds: list[int] = field(default_factory=list)


class BoosterBag:
    """A task's LightGBM boosters fitted with different seeds; predicts the mean of theirs.

    Class probabilities average to probabilities, and the ranker's scores to a score on the
    members' common scale (each is fitted to the same labels)."""

    def __init__(self, members: Sequence[Any]) -> None:
        if not members:
            raise ValueError("a booster bag needs at least one booster.")
        self.members = list(members)

    def predict(self, x: np.ndarray, **kwargs: Any) -> np.ndarray:
        """The members' mean prediction (``lightgbm.Booster.predict`` keyword arguments pass on)."""
        if len(self.members) == 1:
            return np.asarray(self.members[0].predict(x, **kwargs))
        return np.mean([np.asarray(m.predict(x, **kwargs)) for m in self.members], axis=0)

    def feature_name(self) -> list[str]:
        """The features every member reads, in training order."""
        return list(self.members[0].feature_name())

    def __len__(self) -> int:
        return len(self.members)


def tree_workers() -> int:
    """How many inner-fold boosters ``fit_task`` trains at once: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on this platform (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def fit_task(
    x: np.ndarray,
    labels: Sequence[str],
    groups: np.ndarray,
    task: str,
    names: list[str],
    params: GBDTParams,
    gains: Sequence[float],
    weights: np.ndarray | None = None,
) -> TaskFit:
    """Choose the rounds by inner query-grouped CV, refit on all rows, ``params.bags`` times with
    other seeds; see the module docstring.

    ``weights`` (N,) weigh rows in training and in the inner validation curves (default 1).
    """
    if params.bags < 1:
        raise ValueError(f"stacker: bags={params.bags}; expected at least 1.")
    # rows sorted by query once (LightGBM's ranker reads each query's rows as one block); the
    # members differ only in their seed
    order = _sorted_by_group(groups)
    rows = _TaskRows(
        x[order],
        _targets([labels[i] for i in order], task),
        groups[order],
        None if weights is None else np.asarray(weights, dtype=np.float64)[order],
        task,
        names,
    )
    members = [
        _fit_member(rows, replace(params, seed=params.seed + BAG_SEED_STEP * i, bags=1), gains)
        for i in range(params.bags)
    ]
    oof_sorted = np.mean([member.oof for member in members], axis=0)
    oof = np.empty_like(oof_sorted)
    oof[order] = oof_sorted  # back to the caller's row order
    first = members[0]
    return TaskFit(
        BoosterBag([member.booster for member in members]),
        first.rounds,
        first.curve,
        oof,
        [member.rounds for member in members],
    )


class _TaskRows(NamedTuple):
    """A task's training rows, sorted by query."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    weights: np.ndarray | None
    task: str
    names: list[str]


class _MemberFit(NamedTuple):
    """One seed's fit of a task: the booster, its rounds, the mean inner curve and the
    out-of-fold predictions (in ``_TaskRows``' order)."""

    booster: Any
    rounds: int
    curve: list[float]
    oof: np.ndarray


def _fit_member(rows: _TaskRows, params: GBDTParams, gains: Sequence[float]) -> _MemberFit:
    """One seed's fit of ``fit_task`` (``_MemberFit``)."""
    import lightgbm as lgb

    x, y, groups, w, task, names = rows
    lgb_params = params.lgb_params(task, gains)
    folds = inner_query_folds(groups, params.inner_folds, params.seed)

    def inner(val_rows: np.ndarray) -> tuple[np.ndarray, Any]:
        train_rows = np.setdiff1d(np.arange(len(y)), val_rows)
        w_train, w_val = (None, None) if w is None else (w[train_rows], w[val_rows])
        dtrain = _dataset(x[train_rows], y[train_rows], groups[train_rows], task, names, w_train)
        dval = _dataset(x[val_rows], y[val_rows], groups[val_rows], task, names, w_val)
        record: dict[str, Any] = {}
        booster = lgb.train(
            lgb_params,
            dtrain,
            num_boost_round=params.max_rounds,
            valid_sets=[dval],
            valid_names=["val"],
            callbacks=[lgb.record_evaluation(record)],
        )
        (values,) = record["val"].values()
        return np.asarray(values, dtype=np.float64), booster

    # Each booster runs on one thread (its result then does not depend on the machine), and
    # LightGBM releases the GIL while it boosts, so the inner folds run side by side, one a core;
    # each running fold holds its own copy of its training rows (on the full data ~0.6 GB apiece).
    workers = min(len(folds), tree_workers())
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="esci-trees") as pool:
            fitted = list(pool.map(inner, folds))
    else:
        fitted = [inner(val_rows) for val_rows in folds]
    curves = [curve for curve, _ in fitted]
    boosters = [booster for _, booster in fitted]
    mean = np.mean(curves, axis=0)
    rounds = int(np.argmax(mean) if task == "ranker" else np.argmin(mean)) + 1
    oof_sorted = np.zeros((len(y), len(ESCI_LABELS))) if task == "classifier" else np.zeros(len(y))
    for val_rows, booster in zip(folds, boosters, strict=True):
        oof_sorted[val_rows] = booster.predict(x[val_rows], num_iteration=rounds)
    final = lgb.train(lgb_params, _dataset(x, y, groups, task, names, w), num_boost_round=rounds)
    return _MemberFit(final, rounds, mean.tolist(), oof_sorted)


def _member_file(task: str, index: int) -> str:
    """The file of a task's ``index``-th booster: ``TASK.txt`` for the first (as before bags)."""
    return f"{task}.txt" if index == 0 else f"{task}.{index}.txt"


#: Up to this many rows, the trees predict on one thread.
_ONE_THREAD_ROWS: Final = 2048


@dataclass
class Stacker:
    """The three tree models, their features, the class calibration and the decision rules.

    ``feature_names`` are the columns of ``matrix`` (every feature any task reads);
    ``task_features`` maps a task to the subset its booster reads (a task absent reads all).
    """

    feature_names: list[str]
    boosters: dict[str, BoosterBag]
    rules: DecisionRules = field(default_factory=DecisionRules)
    params: GBDTParams = field(default_factory=GBDTParams)
    rounds: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    task_features: dict[str, list[str]] = field(default_factory=dict)
    calibration: ClassCalibration | None = None

    def __post_init__(self) -> None:
        # a single LightGBM booster is a bag of one
        self.boosters = {
            t: b if isinstance(b, BoosterBag) else BoosterBag([b]) for t, b in self.boosters.items()
        }

    def features_of(self, task: str) -> list[str]:
        """The features ``task``'s booster reads, in its training order."""
        return self.task_features.get(task, self.feature_names)

    def _task_matrix(self, x: np.ndarray, task: str) -> np.ndarray:
        names = self.features_of(task)
        if names == self.feature_names:
            return x
        position = {name: j for j, name in enumerate(self.feature_names)}
        return x[:, [position[name] for name in names]]

    def matrix(self, table: pd.DataFrame | Mapping[str, np.ndarray]) -> np.ndarray:
        """The (N, F) feature matrix in training order; a feature the table lacks is NaN (missing).

        ``table`` is a frame or named (N,) columns (``stack.features.feature_arrays``).
        """
        if isinstance(table, pd.DataFrame):
            missing = [n for n in self.feature_names if n not in table.columns]
            frame = table.reindex(columns=self.feature_names) if missing else table[self.feature_names]
            return frame.to_numpy(dtype=np.float64)
        n = len(next(iter(table.values()))) if table else 0
        x = np.full((n, len(self.feature_names)), np.nan)
        for j, name in enumerate(self.feature_names):
            if name in table:
                x[:, j] = table[name]
        return x

    def predict(self, table: pd.DataFrame | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``score`` (N,), ``probs`` (N, 4, E/S/C/I; calibrated), ``classes`` (N,) after the rules,
        ``substitute_prob`` (N,)."""
        x = self.matrix(table)
        # one thread: a request's few dozen rows cost less than waking an OpenMP team
        threads = {"num_threads": 1} if len(x) <= _ONE_THREAD_ROWS else {}
        score = self.boosters["ranker"].predict(self._task_matrix(x, "ranker"), **threads)
        probs = np.asarray(
            self.boosters["classifier"].predict(self._task_matrix(x, "classifier"), **threads)
        ).reshape(len(x), len(ESCI_LABELS))
        if self.calibration is not None:
            probs = self.calibration.apply(probs)
        sub = np.asarray(self.boosters["substitute"].predict(self._task_matrix(x, "substitute"), **threads))
        return {
            "score": score,
            "probs": probs,
            "classes": self.rules.classes(probs),
            "substitute_prob": sub,
        }

    # -- persistence -----------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the boosters (LightGBM text) and ``stacker.json`` into ``folder``; returns it."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for task in TASKS:
            for i, member in enumerate(self.boosters[task].members):
                member.save_model(str(out / _member_file(task, i)))
        manifest = {
            "format_version": FORMAT_VERSION,
            "feature_names": self.feature_names,
            "task_features": {t: self.features_of(t) for t in TASKS},
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "rules": self.rules.to_dict(),
            "params": self.params.__dict__,
            "rounds": self.rounds,
            "info": self.info,
        }
        (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=float) + "\n")
        return out

    @classmethod
    def load(cls, folder: str | Path) -> Stacker:
        """Read a folder written by ``save``.

        Raises:
            ValueError: a missing file or field, or an unknown format version; the message names it.
        """
        import lightgbm as lgb

        folder = Path(folder)
        manifest_path = folder / MANIFEST_NAME
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{manifest_path}: cannot read the stacker manifest ({err}).") from None
        if manifest.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{manifest_path}: format_version {manifest.get('format_version')!r}; this version of "
                f"esci-reranker reads {list(READABLE_VERSIONS)}."
            )
        params = GBDTParams(**manifest.get("params", {}))
        boosters = {}
        for task in TASKS:
            members = []
            for i in range(params.bags):
                path = folder / _member_file(task, i)
                if not path.is_file():
                    raise ValueError(
                        f"{path}: missing; {manifest_path} says each task is a bag of {params.bags} "
                        f"booster(s): {', '.join(_member_file(task, j) for j in range(params.bags))}."
                    )
                members.append(lgb.Booster(model_file=str(path)))
            boosters[task] = BoosterBag(members)
        names = list(manifest["feature_names"])
        task_features = {t: list(v) for t, v in (manifest.get("task_features") or {}).items()}
        for task, bag in boosters.items():
            expected = task_features.get(task, names)
            for i, member in enumerate(bag.members):
                if member.feature_name() != expected or not set(expected) <= set(names):
                    raise ValueError(
                        f"{folder / _member_file(task, i)}: its features differ from {manifest_path}'s "
                        f"{'task_features.' + task if task in task_features else 'feature_names'}."
                    )
        calibration = manifest.get("calibration")
        return cls(
            feature_names=names,
            boosters=boosters,
            rules=DecisionRules.from_dict(manifest["rules"]),
            params=params,
            rounds=dict(manifest.get("rounds", {})),
            info=dict(manifest.get("info", {})),
            task_features=task_features,
            calibration=None if calibration is None else ClassCalibration.from_dict(calibration),
        )


#: Columns of a stack table that are not features.
NON_FEATURES: Final[frozenset[str]] = frozenset(
    {
        "fold",
        "seed",
        "query_id",
        "product_id",
        "esci_label",
        "esci_query_source",
        "query",
        "weight",
        "is_negative",
    }
)


def feature_columns(table: pd.DataFrame, exclude: Sequence[str] = ()) -> list[str]:
    """The feature columns of a stack table: numeric, not ids or labels, not in ``exclude``."""
    return [
        c
        for c in table.columns
        if c not in NON_FEATURES and c not in exclude and pd.api.types.is_numeric_dtype(table[c])
    ]


def fit_stacker(
    table: pd.DataFrame,
    params: GBDTParams | None = None,
    gains: Sequence[float] = (1.0, 0.1, 0.01, 0.0),
    features: Sequence[str] | None = None,
    task2_objective: str = "micro_f1",
    task3_objective: str = "micro_f1",
    *,
    class_features: Sequence[str] | None = None,
    calibrate: bool = False,
    rank_negatives: bool = False,
    class_negatives: bool = True,
    rules_on: str = "judged",
    macro_weight: float = 1.0,
    min_irrelevant_recall: float = 0.0,
) -> tuple[Stacker, dict[str, np.ndarray]]:
    """Fit the three models, the class calibration and the decision rules on a stack table.

    Args:
        table: one row per (query, product) with ``query_id``, ``esci_label`` and the features
            (``stack.features.feature_table`` plus out-of-fold cross-encoder columns); optional
            ``is_negative`` (1 for a catalogue negative) and ``weight`` (row weight, default 1).
        gains: E, S, C, I gains (lambdarank's ``label_gain``).
        features: feature columns of the ranker (default: ``feature_columns(table)``).
        class_features: feature columns of the class and substitute trees (default: ``features``).
        calibrate: fit ``ClassCalibration`` on the judged rows' inner out-of-fold probabilities.
        rank_negatives: the ranker learns from the catalogue negatives too.
        class_negatives: the class and substitute trees learn from the catalogue negatives
            (``False``: from the judged rows alone, so the negatives serve the ranker only).
        rules_on: the rows the Task 2 offsets are fitted on: ``judged`` (the official metrics'
            rows) or ``all`` (the negatives too, at their weight: the search flow's mix). The
            calibration and the Task 3 threshold are always fitted on the judged rows.
        macro_weight: with ``task2_objective="micro_macro"``, macro-F1's weight against
            micro-F1 in what the offsets maximise (1: their mean).
        min_irrelevant_recall: the share of the I rows (of ``rules_on``'s, out of fold) the
            offsets must label I; they maximise the objective among those that reach it.

    Returns:
        The stacker, and the inner out-of-fold predictions (``score``, ``probs`` calibrated,
        ``substitute_prob``) of every row (NaN on negatives a model did not read).

    Raises:
        ValueError: a missing feature column, or ``rules_on="all"`` with trees that read no
            negative.
    """
    params = params or GBDTParams()
    names = list(features) if features is not None else feature_columns(table)
    class_names = list(class_features) if class_features is not None else names
    union = list(dict.fromkeys([*names, *class_names]))
    missing = [c for c in union if c not in table.columns]
    if missing:
        raise ValueError(f"stacker: the stack table has no feature column(s) {missing}.")
    labels = table["esci_label"].astype(str).tolist()
    groups = pd.factorize(table["query_id"])[0]
    negative = (
        table["is_negative"].to_numpy(dtype=bool)
        if "is_negative" in table.columns
        else np.zeros(len(table), bool)
    )
    weights = table["weight"].to_numpy(dtype=np.float64) if "weight" in table.columns else None
    if rules_on not in ("judged", "all"):
        raise ValueError(f"rules_on={rules_on!r}; expected 'judged' or 'all'.")
    if rules_on == "all" and not class_negatives and negative.any():
        raise ValueError(
            "rules_on='all' fits the class offsets on the catalogue negatives too, but "
            "class_negatives=False keeps them from the class trees; use rules_on='judged'."
        )
    rank_rows = np.arange(len(table)) if rank_negatives else np.flatnonzero(~negative)
    class_rows = np.arange(len(table)) if class_negatives else np.flatnonzero(~negative)

    def fit(task: str, rows: np.ndarray, columns: list[str]) -> TaskFit:
        x = table[columns].to_numpy(dtype=np.float64)[rows]
        w = None if weights is None else weights[rows]
        return fit_task(x, [labels[i] for i in rows], groups[rows], task, columns, params, gains, w)

    fits = {
        "ranker": fit("ranker", rank_rows, names),
        "classifier": fit("classifier", class_rows, class_names),
        "substitute": fit("substitute", class_rows, class_names),
    }
    label_index = np.array([LABEL_TO_INDEX[x] for x in labels])
    probs = np.full((len(table), len(LABEL_TO_INDEX)), np.nan)
    probs[class_rows] = fits["classifier"].oof
    substitute_prob = np.full(len(table), np.nan)
    substitute_prob[class_rows] = fits["substitute"].oof
    judged = ~negative
    # probabilities are calibrated on the judged pairs (where a P(E) can be checked against a
    # label); the offsets then decide for the rows the rules serve (the flow's mix with ``all``)
    calibration = fit_calibration(probs[judged], label_index[judged]) if calibrate else None
    if calibration is not None:
        probs = calibration.apply(probs)
    rows = judged if rules_on == "judged" else np.ones(len(table), bool)
    w = None if weights is None else weights[rows]
    offsets, _ = fit_class_offsets(
        probs[rows],
        label_index[rows],
        task2_objective,
        weights=w,
        macro_weight=macro_weight,
        min_irrelevant_recall=min_irrelevant_recall,
    )
    threshold, _ = fit_threshold(substitute_prob[judged], label_index[judged] == SUBSTITUTE, task3_objective)
    stacker = Stacker(
        feature_names=union,
        boosters={t: f.booster for t, f in fits.items()},
        rules=DecisionRules(
            offsets, threshold, task2_objective, task3_objective, macro_weight, min_irrelevant_recall
        ),
        params=params,
        rounds={t: f.rounds for t, f in fits.items()},
        info={
            "queries": len(np.unique(groups)),
            "rows": len(table),
            "negative_rows": int(negative.sum()),
            "inner_curves": {t: f.curve for t, f in fits.items()},
            "member_rounds": {t: f.member_rounds for t, f in fits.items()},
        },
        task_features={"ranker": names, "classifier": class_names, "substitute": class_names},
        calibration=calibration,
    )
    score = np.full(len(table), np.nan)
    score[rank_rows] = fits["ranker"].oof
    oof = {"score": score, "probs": probs, "substitute_prob": substitute_prob}
    return stacker, oof
