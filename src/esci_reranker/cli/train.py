"""Training commands: ``train``, ``cv`` and ``pipeline`` (the main job)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from esci_reranker.cli.app import app
from esci_reranker.cli.common import BaseModelOption, SetOption, fail, parse_seeds

if TYPE_CHECKING:
    from esci_reranker.retrieval.flow import CatalogueFlow
    from esci_reranker.train.config import TrainConfig


@app.command("train")
def train_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config.")] = Path(
        "configs/multi_task.yaml"
    ),
    overrides: SetOption = None,
    base_model: BaseModelOption = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from the last periodic checkpoint (a stacked config: keep the fold "
            "models an interrupted run finished).",
        ),
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    flow: Annotated[
        bool,
        typer.Option(
            "--flow/--no-flow",
            help="Stacked configs: also measure each fold's held-out queries in the search flow "
            "(retrieve 100 from the train+val catalogue, rerank, label). It scores 100 products a "
            "query on the main process: leave it off on the full data.",
        ),
    ] = True,
) -> None:
    """Train a reranker from a YAML config (multi-task by default); keeps the best model on val nDCG.

    Runs on CPU, one GPU, or many with `accelerate launch -m esci_reranker.cli train ...`.
    """
    from esci_reranker.train import ConfigError, load_config, train

    try:
        cfg = load_config(config, _overrides(overrides, base_model))
        if cfg.model.stacker == "gbdt":
            _train_stacked(cfg, resume, progress, flow)
            return
        result = train(cfg, resume=resume, progress=progress)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        fail(str(err))
        return
    typer.echo(
        f"best val {result.metric_name} {result.best_metric:.4f} at step {result.best_step}/{result.steps}"
        f"{' (early stop)' if result.stopped_early else ''}; model: {result.save_path}; "
        f"{result.seconds:.0f} s"
    )
    if result.test_metrics:
        t1 = result.test_metrics["task1"]
        typer.echo(f"test: nDCG {t1['ndcg']:.4f}  nDCG@10 {t1['ndcg@10']:.4f}  MRR {t1['mrr']:.4f}")


@app.command("cv")
def cv_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config.")] = Path(
        "configs/multi_task.yaml"
    ),
    data: Annotated[
        Path, typer.Option("--data", help="Prepared folder; its train+val queries are folded.")
    ] = Path("runs/default/data"),
    out: Annotated[Path, typer.Option("--out", help="Output folder (cv.json and fold models).")] = Path(
        "runs/cv"
    ),
    folds: Annotated[int, typer.Option(help="Number of query folds.")] = 4,
    seeds: Annotated[str, typer.Option(help="Comma-separated training seeds.")] = "0",
    overrides: SetOption = None,
    base_model: BaseModelOption = None,
    baselines: Annotated[
        str,
        typer.Option(help="Baselines ranked on every fold: comma-separated random,bm25,bi-encoder or none."),
    ] = "bm25,bi-encoder",
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Keep the fold runs an earlier run of this command finished in --out (same config, "
            "data and folds) and train only the others.",
        ),
    ] = False,
    bagging: Annotated[
        bool,
        typer.Option(
            "--bagging",
            help="Stacked configs: also compare the mean of the fold cross-encoders with one "
            "cross-encoder as the stacker's first stage (nested CV; bagging.json).",
        ),
    ] = False,
    oof: Annotated[
        Path | None,
        typer.Option(
            "--oof",
            help="Stacked configs: the oof.parquet of an earlier cv or pipeline of this config "
            "(same data, folds and seeds); the fold models are not trained again, so the trees' "
            "settings and features (--set stack.*) are compared in minutes.",
        ),
    ] = None,
    flow: Annotated[
        bool,
        typer.Option(
            "--flow/--no-flow",
            help="Stacked configs: also measure each fold's held-out queries in the search flow "
            "(retrieve 100 from a catalogue of the train+val products, rerank, label) and with a "
            "title only.",
        ),
    ] = True,
) -> None:
    """Cross-validate a config over the train+val queries (the test split is never read).

    Every fold model scores its held-out queries (out-of-fold, ``oof.parquet``), which gives
    every Task 1/2/3 metric per ESCI query type as mean ± std over folds and seeds. A stacked
    config (``model.stacker: gbdt``) trains the fold cross-encoders to the end of their schedule
    and cross-validates the stacker on their outputs beside the cross-encoder alone; with
    ``--bagging`` it then measures bagged fold models against one model as the trees' first
    stage (``stack.bagging``). Stacked configs are also measured in the search flow (``--flow``).
    """
    import pandas as pd

    from esci_reranker.eval.baselines import parse_baselines
    from esci_reranker.stack.cv import cv_summary, cv_tables, oof_entries
    from esci_reranker.train import ConfigError, load_config
    from esci_reranker.train.cv import cross_validate
    from esci_reranker.train.loop import read_train_val

    seed_list = parse_seeds("--seeds", seeds)
    try:
        chosen = parse_baselines(baselines)
        cfg = load_config(config, _overrides(overrides, base_model))
        if (bagging or oof is not None) and cfg.model.stacker != "gbdt":
            raise ValueError("--bagging / --oof: the config has no stacker; set model.stacker: gbdt.")
        if oof is not None and not oof.is_file():
            raise FileNotFoundError(f"--oof {oof}: no such file (an oof.parquet of cv or pipeline).")
        if cfg.model.stacker == "gbdt":
            from esci_reranker.stack.train import cross_validate_stacked, cross_validate_trees

            frame = read_train_val(data)
            from esci_reranker.retrieval.flow import catalogue_flow

            catalogue = catalogue_flow(cfg, frame, flow, typer.echo, test_split=data / "test.parquet")
            # a fold's search flow finds the judged pairs its cross-encoder scored out of fold
            from esci_reranker.reranker import reuse_pair_outputs

            with reuse_pair_outputs():
                if oof is None:
                    stacked = cross_validate_stacked(
                        cfg,
                        frame,
                        out,
                        folds,
                        seed_list,
                        baselines=chosen,
                        progress=True,
                        log=typer.echo,
                        resume=resume,
                        negatives=None if catalogue is None else catalogue.negatives,
                        on_fold=None if catalogue is None else catalogue.on_fold,
                        train_rows=None if catalogue is None else catalogue.encoder_negatives,
                    )
                else:
                    out.mkdir(parents=True, exist_ok=True)
                    oof_table = pd.read_parquet(oof)
                    negatives = (
                        None if catalogue is None else catalogue.negatives(oof.parent, seed_list, oof_table)
                    )
                    stacked = cross_validate_trees(
                        cfg,
                        frame,
                        oof_table,
                        out,
                        seed_list,
                        baselines=chosen,
                        log=typer.echo,
                        negatives=negatives,
                        on_fold=None if catalogue is None else catalogue.on_fold,
                    )
            typer.echo(cv_tables(stacked.summary))
            typer.echo(f"details: {out / 'stack_cv.json'}")
            if bagging:
                _bagging(cfg, frame, oof or out / "oof.parquet", out, folds, seed_list, catalogue)
            return
        result = cross_validate(
            cfg,
            data,
            out,
            folds=folds,
            seeds=seed_list,
            baselines=chosen,
            oof=True,
            resume=resume,
            log=typer.echo,
            progress=True,  # a slow family's fold takes long: show its steps, as the stacked path does
        )
    except (ConfigError, FileNotFoundError, ValueError) as err:
        fail(str(err))
        return
    typer.echo(cv_tables(cv_summary(oof_entries(pd.read_parquet(out / "oof.parquet")))))
    s = result.summary()
    curve = ", ".join(f"{step}: {value:.4f}" for step, value in s["mean_curve"].items())
    start = (
        "untrained not scored (eval.at_start: false)"
        if s["start_mean"] is None
        else f"untrained {s['start_mean']:.4f}; gain {s['gain_mean']:+.4f} ± {s['gain_std']:.4f}"
    )
    lines = [
        f"{s['runs']} runs: best val {result.metric} {s['mean']:.4f} ± {s['std']:.4f} "
        f"(last eval {s['end_mean']:.4f}; {start})",
        f"mean over runs by step: {curve}",
        *(f"baseline {name}: {value:.4f}" for name, value in s["baselines"].items()),
        f"details: {out / 'cv.json'}",
    ]
    typer.echo("\n".join(lines))


def _bagging(
    cfg: TrainConfig,
    frame: Any,
    oof_path: Path,
    out: Path,
    folds: int,
    seeds: tuple[int, ...],
    catalogue: CatalogueFlow | None = None,
) -> None:
    import pandas as pd

    from esci_reranker.fsutil import write_json
    from esci_reranker.stack.bagging import FIRST_STAGES, cross_validate_bagging
    from esci_reranker.stack.cv import cv_summary, cv_tables

    oof = pd.read_parquet(oof_path)
    entries = []
    for seed in seeds:
        entries += cross_validate_bagging(
            cfg,
            frame,
            oof,
            out / "bagging",
            folds,
            seed,
            log=typer.echo,
            # the inner cross-encoders get catalogue negatives as the fold models did, from the
            # catalogue already built beside the out-of-fold table (not a second one in --out)
            train_rows=None
            if catalogue is None
            else functools.partial(catalogue.encoder_negatives, oof_path.parent),
        )
    models = [f"{kind}_{stage}" for kind in ("stacker", "cross_encoder") for stage in FIRST_STAGES]
    summary = cv_summary(entries, models)
    # paired by (fold, seed): the same trees and queries, only the first stage differs
    gains = [e["stacker_bagged"]["ndcg"] - e["stacker_one_model"]["ndcg"] for e in entries]
    summary["bagged_minus_one_model_ndcg"] = {
        "mean": float(sum(gains) / len(gains)),
        "per_run": gains,
    }
    write_json(
        out / "bagging.json", {"oof": str(oof_path), "summary": summary, "entries": entries}, nan_as_null=True
    )
    typer.echo("First stage of the stacker: bagged fold cross-encoders vs one cross-encoder (nested CV)")
    typer.echo(cv_tables(summary))
    typer.echo(
        "stacker nDCG, bagged - one model, per fold: "
        + ", ".join(f"{g:+.4f}" for g in gains)
        + f" (mean {summary['bagged_minus_one_model_ndcg']['mean']:+.4f})"
    )
    typer.echo(f"details: {out / 'bagging.json'}")


@app.command("pipeline")
def pipeline_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config.")] = Path(
        "configs/multi_task.yaml"
    ),
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/default"),
    overrides: SetOption = None,
    base_model: BaseModelOption = None,
    baselines: Annotated[str, typer.Option(help="Comma-separated: random,bm25,bi-encoder or none.")] = (
        "random,bm25,bi-encoder"
    ),
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    index: Annotated[
        bool,
        typer.Option(
            "--index/--no-index",
            help="Also index the bundled sample's products into OUT/index for `search` and the "
            "service's page (~1 min; needs the retrieval extra).",
        ),
    ] = True,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted job in --out (same config): keep the prepared splits and "
            "the fold models it finished, continue a training from its last checkpoint, run the "
            "later stages again.",
        ),
    ] = False,
) -> None:
    """The main job: prepare the bundled sample, train, evaluate against baselines, print the table,
    then index the sample's catalogue for search (OUT/index; --no-index skips it).

    Runs on CPU, one GPU, or many with `torchrun --nproc_per_node N -m esci_reranker.cli pipeline
    ...` (or `accelerate launch`): every training runs data-parallel, the rest on one process.
    """
    from esci_reranker.data import DataError
    from esci_reranker.pipeline import run_pipeline
    from esci_reranker.train import ConfigError

    names = tuple(b.strip() for b in baselines.split(",") if b.strip() and b.strip() != "none")
    try:
        result = run_pipeline(
            config,
            out,
            _overrides(overrides, base_model),
            names,
            progress=progress,
            log=typer.echo,
            build_index=index,
            resume=resume,
        )
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        fail(str(err))
        return
    from esci_reranker.train.distributed import is_main_process

    if not is_main_process():
        return  # the main process prints the job's tables
    if result.cv_table is not None:
        typer.echo(
            "\nCross-validation over the train+val queries (each fold scored by models that never "
            "saw it; mean ± std over folds):\n"
        )
        typer.echo(result.cv_table)
    else:
        typer.echo("\nValidation split (model selection; baselines for reference):\n")
        typer.echo(result.val_table)
    typer.echo("\nTest split (the sample's held-out queries; never used for training or selection):\n")
    typer.echo(result.test_table)
    t = result.seconds
    index_time = f"index {t['index']:.0f} s, " if "index" in t else ""
    typer.echo(
        f"\ntime: prepare {t['prepare']:.0f} s, train {t['train']:.0f} s, "
        f"evaluate {t['evaluate_val'] + t['evaluate_test']:.0f} s, {index_time}total {t['total']:.0f} s"
    )
    typer.echo(f"model: {out / 'model'}   report: {out / 'eval' / 'report.md'}")
    if result.index_dir is not None:
        typer.echo(
            f"search index: {result.index_dir}   try: esci-reranker search --index {result.index_dir} "
            f'--model {out / "model"} --query "wireless earbuds" --top-k 5'
        )


def _train_stacked(cfg: TrainConfig, resume: bool, progress: bool, flow: bool) -> None:
    """``train`` for ``model.stacker: gbdt``: fold models, stacker, final model; CV tables printed.
    ``resume`` keeps the fold models an interrupted run finished and continues the rest; ``flow``
    also measures each fold in the search flow."""

    from esci_reranker.retrieval.flow import stacked_inputs
    from esci_reranker.stack.cv import cv_tables
    from esci_reranker.stack.train import train_stacked
    from esci_reranker.train.distributed import is_main_process

    say = typer.echo if is_main_process() else (lambda line: None)  # one process speaks for the job
    frame, catalogue = stacked_inputs(cfg, flow, say)
    result = train_stacked(
        cfg,
        progress=progress,
        log=say,
        negatives=None if catalogue is None else catalogue.negatives,
        on_fold=None if catalogue is None else catalogue.on_fold,
        train_rows=None if catalogue is None else catalogue.encoder_negatives,
        resume=resume,
        frame=frame,
    )
    if not is_main_process():
        return  # the main process prints the tables
    typer.echo(cv_tables(result.cv))
    typer.echo(f"model: {result.save_path} (cross-encoder + stacker/)")


def _overrides(overrides: list[str] | None, base_model: str | None) -> tuple[str, ...]:
    """The ``--set`` overrides, with ``--base-model`` as ``model.backbone`` last (it wins)."""
    return (*(overrides or ()), *((f"model.backbone={base_model}",) if base_model else ()))
