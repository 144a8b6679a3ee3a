"""Nested cross-validation of ``stack.final_model: soup`` (an experiment, not a test).

Plain CV cannot measure a soup of the fold models: every fold model saw the other folds'
queries. Here, for each outer fold f of an earlier stacked CV (``--base``: its ``oof.parquet``
and catalogue), the models trained on each pair of the other folds (with the config's catalogue
negatives, as the fold models are trained) are averaged (``model.soup.average_checkpoints``) and
score fold f. The trees are fitted as in the pipeline, on the single fold models' out-of-fold
outputs of the other folds, and applied to the soup's outputs of fold f; the search flow of fold
f runs with the soup. Writes ``OUT/oof.parquet`` (the soups' outputs) and ``OUT/stack_cv.json``
(the same entries as ``esci-reranker cv``), and prints the summary table.

    python benchmarks/soup_nested_cv.py --base runs/screen_ce/neg20 --out runs/soup_cv --seeds 0,1,2

With 4 folds: 6 trainings a seed on half the train+val queries each (about 1 min each on 2
cores, bf16), then the trees (2 min a seed). docs/results.md has the measurement.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time
from pathlib import Path

import pandas as pd

from esci_reranker.fsutil import write_json
from esci_reranker.model.soup import average_checkpoints
from esci_reranker.retrieval.flow import CatalogueFlow, catalogue_flow
from esci_reranker.stack.cv import (
    cross_validate_stacker,
    cv_summary,
    cv_tables,
    fold_stackers,
    oof_stack_table,
    outer_split,
)
from esci_reranker.stack.stacker import feature_columns
from esci_reranker.stack.train import fit_options, fixed_schedule, gbdt_params
from esci_reranker.train import TrainConfig, load_config, train
from esci_reranker.train.cv import fold_model_dir, fold_outputs, query_folds, write_fold_splits
from esci_reranker.train.loop import read_train_val


def pair_model(
    cfg: TrainConfig,
    frame: pd.DataFrame,
    folds: list[set[int]],
    pair: tuple[int, int],
    seed: int,
    out: Path,
    catalogue: CatalogueFlow | None,
) -> Path:
    """The model of ``seed`` trained on the queries of the two folds in ``pair`` (kept if there)."""
    held = set().union(*(q for f, q in enumerate(folds) if f not in pair))
    base = out / "pairs" / f"seed{seed}" / f"p{pair[0]}{pair[1]}"
    model = base / "model"
    if (model / "model.safetensors").is_file():
        return model
    started = time.perf_counter()
    extra = catalogue.encoder_negatives(out, frozenset(held)) if catalogue is not None else None
    # as the stacked trainer trains its fold models: to the end of the schedule, nothing chosen
    run = fixed_schedule(cfg)
    run.seed = seed
    run.data.dir = write_fold_splits(frame, held, base / "data", extra)
    run.data.train = run.data.val = run.data.test = None
    run.output.save_path = model
    run.output.run_dir = base / "train"
    train(run, progress=False, validate_at_end=False)
    print(f"seed {seed}, folds {pair}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/multi_task.yaml"))
    parser.add_argument("--data", type=Path, default=Path("runs/default/data"), help="prepared splits")
    parser.add_argument("--base", type=Path, required=True, help="an earlier stacked CV folder (oof.parquet)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    args = parser.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    cfg = load_config(args.config, ())
    frame = read_train_val(args.data)
    base_oof = pd.read_parquet(args.base / "oof.parquet")
    n_folds = int(base_oof["fold"].nunique())
    folds = query_folds(frame["query_id"].to_numpy(), n_folds)
    assigned = base_oof[["query_id", "fold"]].drop_duplicates()
    for f, queries in enumerate(folds):
        if set(assigned.loc[assigned["fold"] == f, "query_id"]) != queries:
            parser.error(f"--base {args.base}: its fold {f} is not the folds of these queries.")
    args.out.mkdir(parents=True, exist_ok=True)
    if (args.base / "catalogue").is_dir() and not (args.out / "catalogue").exists():
        (args.out / "catalogue").symlink_to((args.base / "catalogue").resolve())  # the same index
    catalogue = catalogue_flow(cfg, frame, True, print, test_split=args.data / "test.parquet")

    tables = []
    pairs = list(itertools.combinations(range(n_folds), 2))
    for seed in seeds:
        models = {pair: pair_model(cfg, frame, folds, pair, seed, args.out, catalogue) for pair in pairs}
        for f in range(n_folds):
            soup = average_checkpoints(
                [m for pair, m in models.items() if f not in pair], fold_model_dir(args.out, f, seed)
            )
            tables.append(fold_outputs(soup, frame[frame["query_id"].isin(folds[f])], f, seed))
    soup_oof = pd.concat(tables, ignore_index=True)
    soup_oof.to_parquet(args.out / "oof.parquet", index=False)

    if catalogue is not None:
        catalogue.negatives(args.out, seeds, soup_oof)  # the flow of each fold runs with its soup
    entries = []
    for seed in seeds:
        single = oof_stack_table(frame, base_oof, seed)
        souped = oof_stack_table(frame, soup_oof, seed)
        names = feature_columns(single, exclude=cfg.stack.exclude_features)
        fitted = fold_stackers(single, gbdt_params(cfg, seed), **fit_options(cfg, names))
        applied = ((f, stacker, outer_split(souped, f)[1]) for f, stacker, _ in fitted)
        on_fold = None if catalogue is None else functools.partial(catalogue.on_fold, seed)
        entries += [{"seed": seed, **e} for e in cross_validate_stacker(applied, on_fold=on_fold)]
    summary = cv_summary(entries)
    write_json(args.out / "stack_cv.json", {"summary": summary, "entries": entries}, nan_as_null=True)
    print(cv_tables(summary))


if __name__ == "__main__":
    main()
