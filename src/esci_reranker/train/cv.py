"""K-fold cross-validation over the train+val queries, for choosing configs on small data.

With ~100 training queries a single validation split of a dozen queries is noise; averaging the
validation metric over k query folds (and several seeds) is a steadier basis for choosing
hyperparameters. The test split is never read here.

Three numbers per run, because they answer different questions: ``start_metric`` (the model
before any step: what the fitted priors give), ``best_metric`` (the best evaluation, as early
stopping picks it: optimistic, since it is chosen on the same fold it is measured on) and
``end_metric`` (the last evaluation). ``mean_curve`` averages the metric over runs at each
evaluated step: whether training helps on average, free of the best-of-several-evaluations bias.
Each fold's validation queries are also ranked by the chosen ``baselines`` (BM25, the zero-shot
bi-encoder, ...), so a config can be compared with them on all ~110 queries instead of 13.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from esci_reranker.fsutil import nulls_to_nan, write_json
from esci_reranker.train.config import TrainConfig

#: Baselines ranked on every fold's validation queries unless told otherwise.
CV_BASELINES: tuple[str, ...] = ("bm25", "bi-encoder")

#: The queries a fold's cross-encoder holds out -> extra training rows for it (e.g. catalogue
#: negatives, which are mined by retrieval, a layer above this one), or None for none.
ExtraRowsFn = Callable[[frozenset[int]], "pd.DataFrame | None"]


@dataclass
class FoldResult:
    """One (fold, seed) training run: its best validation metric and when it was reached."""

    fold: int
    seed: int
    best_metric: float
    best_step: int
    steps: int
    start_metric: float
    seconds: float
    end_metric: float = float("nan")
    #: The validation metric at each evaluated step.
    curve: dict[int, float] = field(default_factory=dict)


@dataclass
class CVResult:
    """All runs of a cross-validation and their summary."""

    metric: str
    runs: list[FoldResult] = field(default_factory=list)
    #: Each baseline's validation metric per fold (index = fold).
    baselines: dict[str, list[float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Over runs: mean and standard deviation of the best metric, the means of the starting
        (untrained; None when no run scored it) and last metric, the gain of best over start,
        the mean curve (steps that every run evaluated), and each baseline's mean over folds."""
        best = np.array([r.best_metric for r in self.runs])
        start = np.array([r.start_metric for r in self.runs])
        gain = best - start
        # Runs without a step-0 evaluation (eval.at_start: false) have no start: None, not a
        # made-up number, when no run has one.
        scored = ~np.isnan(start)
        steps = set.intersection(*(set(r.curve) for r in self.runs)) if self.runs else set()
        return {
            "runs": len(self.runs),
            "mean": float(best.mean()),
            "std": float(best.std(ddof=1)) if len(best) > 1 else 0.0,
            "start_mean": float(start[scored].mean()) if scored.any() else None,
            "end_mean": float(np.mean([r.end_metric for r in self.runs])),
            "gain_mean": float(gain[scored].mean()) if scored.any() else None,
            "gain_std": float(gain[scored].std(ddof=1)) if scored.sum() > 1 else 0.0,
            "mean_curve": {str(k): float(np.mean([r.curve[k] for r in self.runs])) for k in sorted(steps)},
            "baselines": {name: float(np.mean(values)) for name, values in self.baselines.items()},
        }


def query_folds(query_ids: np.ndarray, folds: int, seed: int = 1234) -> list[set[int]]:
    """Split the distinct ``query_ids`` into ``folds`` disjoint, near-equal, seeded groups."""
    if folds < 2:
        raise ValueError(f"folds={folds}; expected at least 2.")
    unique = np.unique(query_ids)
    if len(unique) < folds:
        raise ValueError(f"{len(unique)} queries cannot make {folds} folds.")
    shuffled = np.random.default_rng(seed).permutation(unique)
    return [{int(q) for q in shuffled[i::folds]} for i in range(folds)]


def fold_model_dir(out: str | Path, fold: int, seed: int) -> Path:
    """Where ``cross_validate`` saves the model of (fold, seed) under its output folder ``out``
    (beside ``oof.parquet``): trained on the other folds' queries only."""
    return Path(out) / f"fold{fold}" / f"seed{seed}" / "model"


def write_fold_splits(
    frame: pd.DataFrame, fold_queries: set[int], folder: Path, extra: pd.DataFrame | None = None
) -> Path:
    """Write ``train.parquet`` (queries outside the fold, plus ``extra`` training rows) and
    ``val.parquet`` (the fold) to ``folder``.

    Raises:
        ValueError: an ``extra`` row belongs to a held-out query.
    """
    folder.mkdir(parents=True, exist_ok=True)
    in_fold = frame["query_id"].isin(fold_queries)
    train = frame[~in_fold]
    if extra is not None and len(extra):
        leaked = sorted(set(extra["query_id"]) & set(fold_queries))
        if leaked:
            raise ValueError(f"extra training rows for held-out query id(s) {leaked[:5]}.")
        train = pd.concat([train, extra], ignore_index=True)
    train.to_parquet(folder / "train.parquet", index=False)
    frame[in_fold].to_parquet(folder / "val.parquet", index=False)
    return folder


def cross_validate(
    cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    folds: int = 4,
    seeds: tuple[int, ...] = (0,),
    progress: bool = False,
    baselines: tuple[str, ...] = CV_BASELINES,
    oof: bool = False,
    frame: pd.DataFrame | None = None,
    log: Callable[[str], None] | None = None,
    resume: bool = False,
    extra_rows: ExtraRowsFn | None = None,
) -> CVResult:
    """Train ``cfg`` on each fold x seed of the train+val queries in ``data_dir``; return the results.

    ``baselines`` (names of ``eval.baselines.BASELINES``; ``()`` for none) rank each fold's
    validation queries too, with the config's text fields. Writes ``out_dir/cv.json`` (every run,
    the baselines per fold and the summary); fold models go to ``out_dir/fold*/``.

    With ``oof``, each trained fold model also scores its held-out queries and the rows go to
    ``out_dir/oof.parquet`` (``fold``, ``seed``, ids, ``stack.outputs.CE_COLUMNS``): the
    out-of-fold cross-encoder outputs a stacker trains on. Use it with ``eval.select: last``
    so no held-out query chooses its own model's checkpoint; the training then skips its own
    validation of the final step, and the fold's final metric comes from the out-of-fold scores.

    ``frame`` (optional) is the train+val table itself, read from ``data_dir`` when not given;
    ``log`` receives a line as each fold starts.

    Under ``torchrun`` / ``accelerate launch`` every process calls it: each fold model trains
    data-parallel, its out-of-fold scoring is shared out over the processes, and the main
    process alone writes the splits, ``oof.parquet`` and ``cv.json`` (and logs).

    With ``resume``, the (fold, seed) runs that an earlier call with the same config, queries,
    folds and ``oof`` finished in ``out_dir`` (in its ``cv.json``, ``oof.parquet`` and fold model)
    are kept and only the others train: a slow family's CV can run over several invocations.

    ``extra_rows`` (optional) gives each fold's cross-encoder more training rows (``ExtraRowsFn``);
    the fold's validation and out-of-fold rows stay the judged ones.

    Raises:
        ValueError: ``resume`` and ``out_dir`` holds a CV of another config, data or folds.
    """
    from esci_reranker.eval.baselines import parse_baselines
    from esci_reranker.eval.ranking import ranking_metrics
    from esci_reranker.stack.cv import cross_encoder_run
    from esci_reranker.train.distributed import is_main_process, on_main
    from esci_reranker.train.loop import read_train_val, train

    chosen = parse_baselines(list(baselines))
    if not is_main_process():
        log = None  # one process speaks for the job

    data_dir, out = Path(data_dir), Path(out_dir)
    if frame is None:
        frame = read_train_val(data_dir)
    result = CVResult(metric=cfg.eval.metric)
    key = "task1." + cfg.eval.metric
    oof_tables: list[pd.DataFrame] = []
    identity = _identity(cfg, frame, folds, oof)
    done = _finished_runs(out, identity, oof, seeds) if resume else {}
    for fold, fold_queries in enumerate(query_folds(frame["query_id"].to_numpy(), folds)):

        def fold_splits(fold: int = fold, fold_queries: set[int] = fold_queries) -> Path:
            # extra rows (catalogue negatives) are mined where the split is written: rank 0
            extra = extra_rows(frozenset(fold_queries)) if extra_rows is not None else None
            return write_fold_splits(frame, fold_queries, out / f"fold{fold}" / "data", extra)

        split_dir = on_main(fold_splits)
        val = frame[frame["query_id"].isin(fold_queries)]
        for name in chosen:
            result.baselines.setdefault(name, []).append(on_main(partial(_baseline_metric, name, val, cfg)))
        for seed in seeds:
            if (fold, seed) in done:
                kept, rows = done[fold, seed]
                if log is not None:
                    log(f"fold {fold + 1}/{folds}, seed {seed}: finished earlier, kept (--resume)")
                result.runs.append(kept)
                if rows is not None:
                    oof_tables.append(rows)
                continue
            if log is not None:
                log(
                    f"fold {fold + 1}/{folds}, seed {seed}: train on {frame['query_id'].nunique() - len(fold_queries)} "
                    f"queries, hold out {len(fold_queries)}"
                )
            run = cfg.model_copy(deep=True)
            run.seed = seed
            run.data.dir = split_dir
            run.data.train = run.data.val = run.data.test = None
            run.output.save_path = fold_model_dir(out, fold, seed)
            run.output.run_dir = run.output.save_path.parent / "train"
            # The out-of-fold pass scores the final model on the fold's queries anyway; with
            # 'last' (nothing chosen on them) the training's own final validation is the same
            # scoring, done twice, which costs minutes a fold for the LLM family.
            oof_final = oof and run.eval.select == "last"
            trained = train(run, progress=progress, validate_at_end=not oof_final)
            curve = {int(h["step"]): float(h[key]) for h in trained.history if key in h}
            table = fold_outputs(run.output.save_path, val, fold, seed, run.eval.precision) if oof else None
            if oof_final:
                assert table is not None
                final = ranking_metrics(cross_encoder_run(table))[cfg.eval.metric]
                curve[trained.steps] = trained.best_metric = final
            nan = float("nan")
            result.runs.append(
                FoldResult(
                    fold,
                    seed,
                    trained.best_metric,
                    trained.best_step,
                    trained.steps,
                    # NaN when eval.at_start is off: the first evaluation is not the untrained model
                    curve.get(0, nan),
                    trained.seconds,
                    end_metric=curve[max(curve)] if curve else nan,
                    curve=curve,
                )
            )
            if table is not None:
                oof_tables.append(table)
            on_main(lambda: _write_progress(out, oof_tables, result, identity))
    return result


def _baseline_metric(name: str, val: pd.DataFrame, cfg: TrainConfig) -> float:
    """Baseline ``name``'s ``eval.metric`` (Task 1) on a fold's validation queries."""
    from esci_reranker.eval.baselines import run_baseline

    metrics = run_baseline(name, val, text_fields=cfg.model.text_fields).metrics
    return float(metrics["task1"][cfg.eval.metric])


def _identity(cfg: TrainConfig, frame: pd.DataFrame, folds: int, oof: bool) -> dict[str, Any]:
    """What must match for ``resume`` to keep earlier runs: config, queries, folds, oof."""
    queries = ",".join(str(q) for q in sorted(frame["query_id"].unique()))
    return {
        "config_sha256": config_sha256(cfg),
        "queries_sha256": hashlib.sha256(queries.encode()).hexdigest(),
        "folds": folds,
        "oof": oof,
    }


def config_sha256(cfg: BaseModel) -> str:
    """sha256 of a config's JSON dump (keys sorted): the config a resumed run must match."""
    config = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, default=str)
    return hashlib.sha256(config.encode()).hexdigest()


def read_resumable(
    path: Path, identity: Mapping[str, Any], what: str, seeds: Sequence[int], items: str
) -> dict[str, Any] | None:
    """The results file an earlier, resumable run (``what``: "CV", "distill-cv") wrote at
    ``path``; None when there is none. ``items`` names its list of per-(fold, seed) results.

    Raises:
        ValueError: it was written under another identity (config, data, folds, ...), naming
            the keys that differ; or it holds seeds that are not in ``seeds``: the resumed run
            rewrites the file with the requested seeds only, so it would drop their results.
    """
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    differs = [k for k, v in identity.items() if saved.get("identity", {}).get(k) != v]
    if differs:
        raise ValueError(
            f"--resume: {path} was written by a {what} with another {', '.join(differs)} "
            "(or before runs could be resumed); use another --out, or run without --resume to start over."
        )
    saved_seeds, requested = {int(item["seed"]) for item in saved.get(items, [])}, set(seeds)
    dropped = sorted(saved_seeds - requested)
    if dropped:
        keep = ",".join(str(seed) for seed in sorted(saved_seeds | requested))
        raise ValueError(
            f"--resume: {path} holds results for seed(s) {','.join(map(str, dropped))} that --seeds "
            f"{','.join(map(str, seeds))} leaves out, and would lose them; pass --seeds {keep} "
            "or use another --out."
        )
    saved[items] = nulls_to_nan(saved.get(items, []))
    return saved


def _finished_runs(
    out: Path, identity: dict[str, Any], oof: bool, seeds: Sequence[int]
) -> dict[tuple[int, int], tuple[FoldResult, pd.DataFrame | None]]:
    """The runs an earlier ``cross_validate`` finished in ``out``, with their out-of-fold rows."""
    saved = read_resumable(out / "cv.json", identity, "CV", seeds, "runs")
    if saved is None:
        return {}
    table = pd.read_parquet(out / "oof.parquet") if oof and (out / "oof.parquet").is_file() else None
    done: dict[tuple[int, int], tuple[FoldResult, pd.DataFrame | None]] = {}
    for item in saved["runs"]:
        run = FoldResult(**{**item, "curve": {int(k): float(v) for k, v in item["curve"].items()}})
        model = fold_model_dir(out, run.fold, run.seed) / "config.json"
        rows = None
        if table is not None:
            rows = table[(table["fold"] == run.fold) & (table["seed"] == run.seed)]
            if rows.empty:
                continue
        elif oof:
            continue
        if model.is_file():
            done[run.fold, run.seed] = (run, None if rows is None else rows.reset_index(drop=True))
    return done


def _write_progress(
    out: Path, oof_tables: list[pd.DataFrame], result: CVResult, identity: dict[str, Any]
) -> None:
    # oof.parquet first: a run is finished (for --resume) once cv.json lists it
    if oof_tables:
        pd.concat(oof_tables, ignore_index=True).to_parquet(out / "oof.parquet", index=False)
    _write(out / "cv.json", result, identity)


def fold_outputs(
    model_dir: Path, val: pd.DataFrame, fold: int, seed: int, precision: str = "fp32"
) -> pd.DataFrame:
    """The out-of-fold cross-encoder outputs of a fold model on its held-out queries, scored in
    ``precision`` (``Reranker.from_pretrained``'s; a config's ``eval.precision``).

    With several processes each scores a share of the passes and every one gets the whole table
    (``train.distributed.sharded_outputs``): the same values as one process scoring them all.
    """
    from esci_reranker.reranker import Reranker
    from esci_reranker.stack.outputs import frame_outputs
    from esci_reranker.train.distributed import model_device, sharded_outputs

    reranker = Reranker.from_pretrained(model_dir, device=model_device(), precision=precision)
    table = frame_outputs(
        reranker,
        val,
        run=lambda queries, texts: sharded_outputs(reranker, queries, texts, reranker.batch_size),
    )
    table.insert(0, "seed", seed)
    table.insert(0, "fold", fold)
    return table


def _write(path: Path, result: CVResult, identity: dict[str, Any] | None = None) -> None:
    data: dict[str, Any] = {
        "metric": result.metric,
        "identity": identity or {},
        "summary": result.summary(),
        "baselines_per_fold": result.baselines,
        "runs": [r.__dict__ for r in result.runs],
    }
    # Atomic (a kill mid-write must not leave a cv.json that --resume cannot read) and strict
    # JSON: an unmeasured start (eval.at_start off) is null.
    write_json(path, data, nan_as_null=True)
