"""K-fold cross-validation over the train+val queries, for choosing configs on small data.

With ~100 training queries a single validation split of a dozen queries is noise; averaging the
best validation metric over k query folds (and several seeds) is a steadier basis for choosing
hyperparameters. The test split is never read here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from esci_reranker.train.config import TrainConfig


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


@dataclass
class CVResult:
    """All runs of a cross-validation and their summary."""

    metric: str
    runs: list[FoldResult] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Mean and standard deviation of the best and the starting (untrained) metric over runs."""
        best = np.array([r.best_metric for r in self.runs])
        start = np.array([r.start_metric for r in self.runs])
        gain = best - start
        return {
            "runs": len(self.runs),
            "mean": float(best.mean()),
            "std": float(best.std(ddof=1)) if len(best) > 1 else 0.0,
            "start_mean": float(start.mean()),
            "gain_mean": float(gain.mean()),
            "gain_std": float(gain.std(ddof=1)) if len(gain) > 1 else 0.0,
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


def write_fold_splits(frame: pd.DataFrame, fold_queries: set[int], folder: Path) -> Path:
    """Write ``train.parquet`` (queries outside the fold) and ``val.parquet`` (the fold) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    in_fold = frame["query_id"].isin(fold_queries)
    frame[~in_fold].to_parquet(folder / "train.parquet", index=False)
    frame[in_fold].to_parquet(folder / "val.parquet", index=False)
    return folder


def cross_validate(
    cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    folds: int = 4,
    seeds: tuple[int, ...] = (0,),
    progress: bool = False,
) -> CVResult:
    """Train ``cfg`` on each fold x seed of the train+val queries in ``data_dir``; return the results.

    Writes ``out_dir/cv.json`` (every run and the summary); fold models go to ``out_dir/fold*/``.
    """
    from esci_reranker.train.loop import read_split, train

    data_dir, out = Path(data_dir), Path(out_dir)
    frame = pd.concat(
        [read_split(data_dir / "train.parquet", "train"), read_split(data_dir / "val.parquet", "val")],
        ignore_index=True,
    )
    result = CVResult(metric=cfg.eval.metric)
    for fold, fold_queries in enumerate(query_folds(frame["query_id"].to_numpy(), folds)):
        split_dir = write_fold_splits(frame, fold_queries, out / f"fold{fold}" / "data")
        for seed in seeds:
            run = cfg.model_copy(deep=True)
            run.seed = seed
            run.data.dir = split_dir
            run.data.train = run.data.val = run.data.test = None
            run.output.save_path = out / f"fold{fold}" / f"seed{seed}" / "model"
            run.output.run_dir = out / f"fold{fold}" / f"seed{seed}" / "train"
            trained = train(run, progress=progress)
            start = trained.history[0]["task1." + cfg.eval.metric] if trained.history else float("nan")
            result.runs.append(
                FoldResult(
                    fold, seed, trained.best_metric, trained.best_step, trained.steps, start, trained.seconds
                )
            )
            _write(out / "cv.json", result)
    return result


def _write(path: Path, result: CVResult) -> None:
    data: dict[str, Any] = {
        "metric": result.metric,
        "summary": result.summary(),
        "runs": [r.__dict__ for r in result.runs],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
