"""The main job: prepare the bundled sample -> train the default model -> evaluate against baselines
-> index the sample's catalogue for search.

Outputs go to fixed places other tools rely on (``OUT`` defaults to ``runs/default``):
``OUT/data/`` the prepared splits, ``OUT/model/`` the best checkpoint (+ metrics.json),
``OUT/train/`` logs and resume state, ``OUT/eval/`` the test-split evaluation (predictions,
metrics, report, plots), ``OUT/eval_val/`` the same on the validation split (single cross-encoder
only) and ``OUT/index/`` the bundled sample's catalogue index, so ``esci-reranker search --index
OUT/index`` and the service's page work right after the job.

Under ``torchrun`` / ``accelerate launch`` every process runs the job: the cross-encoder
trainings run data-parallel on all of them (for a stacked model also the out-of-fold scoring,
``stack.train``); preparing, the trees, evaluating and indexing run on the main process while
the others wait, and only the main process writes files or logs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esci_reranker.train.config import TrainConfig, load_config

if TYPE_CHECKING:
    from esci_reranker.reranker import Reranker
    from esci_reranker.stack.train import StackedTrainResult
    from esci_reranker.train.loop import TrainResult


@dataclass
class PipelineResult:
    """Where everything went, the comparison tables and the wall time of each stage."""

    out_dir: Path
    test_table: str
    val_table: str
    test_metrics: dict[str, Any]
    val_metrics: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    #: For a stacked model (``model.stacker: gbdt``): the cross-validation tables over the
    #: train+val queries, which replace the validation split (the final model trains on it).
    cv_table: str | None = None
    #: The sample's search index (``OUT/index``); None when it was not built.
    index_dir: Path | None = None
    #: The test queries in the search flow (``retrieval.flow.evaluate_flow``); None without an index.
    flow_metrics: dict[str, Any] | None = None


def pipeline_config(config: str | Path, out_dir: Path, overrides: tuple[str, ...] = ()) -> TrainConfig:
    """The training config with data and model paths pointed inside ``out_dir``."""
    return load_config(
        config,
        [
            *overrides,
            f"data.dir={out_dir / 'data'}",
            f"output.save_path={out_dir / 'model'}",
            f"output.run_dir={out_dir / 'train'}",
        ],
    )


def run_pipeline(
    config: str | Path = "configs/multi_task.yaml",
    out_dir: str | Path = "runs/default",
    overrides: tuple[str, ...] = (),
    baselines: tuple[str, ...] = ("random", "bm25", "bi-encoder"),
    progress: bool = True,
    log: Any = print,
    build_index: bool = True,
    index_retriever: str | Path | None = None,
    resume: bool = False,
) -> PipelineResult:
    """Run the whole main job and return its result (on every process); ``log`` receives one line
    per stage.

    Args:
        build_index: also index the bundled sample's products into ``OUT/index`` (BM25 + dense
            vectors; ~1 min on 2 cores), what ``esci-reranker search`` and ``/search`` read.
        index_retriever: the dense retriever (a sentence-transformers folder) of the index and of
            the train+val catalogue that measures the search flow in cross-validation and mines
            the catalogue negatives; None = the packaged zero-shot all-MiniLM-L6-v2 (``make run``
            trains no retriever).
        resume: continue an interrupted job with the same config in ``out_dir``: the prepared
            splits and the fold models it finished (model and out-of-fold rows) are kept, a
            training it was in continues from its last checkpoint when it has one, and the
            stages after training run again.
    """
    from esci_reranker.data import PrepareOptions, prepare, sample_path, write_splits
    from esci_reranker.reranker import reuse_pair_outputs
    from esci_reranker.retrieval.encoder import reuse_embeddings
    from esci_reranker.train.distributed import is_main_process, on_main

    out = Path(out_dir)
    cfg = pipeline_config(config, out, overrides)
    seconds: dict[str, float] = {}
    stages = 5 if build_index else 4
    if not is_main_process():
        log = _quiet  # one process speaks for the job

    t = time.perf_counter()
    log(f"[1/{stages}] prepare the bundled ESCI sample -> {out / 'data'}")
    stats_file = out / "data" / "stats.json"

    def prepare_sample() -> dict[str, Any]:
        if resume and stats_file.is_file():
            log("      kept (--resume)")
            return json.loads(stats_file.read_text())
        prepared = prepare(
            joined=sample_path(),
            options=PrepareOptions(
                text_fields=cfg.model.text_fields, long_field_chars=cfg.model.long_field_chars
            ),
        )
        write_splits(prepared, out / "data")
        return prepared.stats

    stats = on_main(prepare_sample)
    for name in ("train", "val", "test"):
        s = stats["splits"][name]
        log(f"      {name:5s}: {s['queries']:4d} queries {s['rows']:6d} rows")
    seconds["prepare"] = time.perf_counter() - t

    # the catalogue of the train+val products (training) and the sample's index (stage 5) embed
    # the same products with the same retriever: each is embedded once; and the search flow on
    # the test queries finds the judged pairs the test evaluation scored
    with reuse_embeddings(), reuse_pair_outputs():
        stacked = cfg.model.stacker == "gbdt"
        run_stages = _stacked_pipeline if stacked else _cross_encoder_pipeline
        job = _Stages(cfg, config, out, baselines, progress, log, seconds, stages, index_retriever, resume)
        result, training = run_stages(job)

        def index_and_write() -> PipelineResult:
            if build_index:
                t = time.perf_counter()
                result.index_dir = _build_sample_index(out / "index", index_retriever, stages, log)
                seconds["index"] = time.perf_counter() - t
                if result.index_dir is not None and cfg.model.type == "multi_task":
                    t = time.perf_counter()
                    result.flow_metrics = _evaluate_search_flow(cfg, out, result.index_dir, log, job.reranker)
                    seconds["evaluate_flow"] = time.perf_counter() - t
            _write_results(cfg, out, result.test_metrics, training, seconds)
            return result

        return on_main(index_and_write)


def _quiet(line: str) -> None:
    """A log that drops its lines (the processes other than the main one)."""


def _build_sample_index(index_dir: Path, retriever: str | Path | None, stages: int, log: Any) -> Path | None:
    """The last stage: the bundled sample's catalogue index, so search works after the job.

    Skipped with a message (not an error) when the retrieval extra is missing: the model and its
    evaluation, the job's main outputs, are already written by then.
    """
    from esci_reranker.retrieval.encoder import PACKAGED_RETRIEVER

    name = retriever if retriever is not None else f"{PACKAGED_RETRIEVER} (zero-shot)"
    log(f"[{stages}/{stages}] index the sample's products for search (BM25 + dense, {name}) -> {index_dir}")
    try:
        from esci_reranker.retrieval.sample import build_sample_index

        build_sample_index(index_dir, retriever=retriever)
    except ImportError as err:
        log(
            f"      skipped: search needs the retrieval extra ({err}); install it with "
            "pip install 'esci-reranker[retrieval]', then: esci-reranker index --sample "
            f"--out {index_dir}"
        )
        return None
    return index_dir


def _evaluate_search_flow(
    cfg: TrainConfig, out: Path, index_dir: Path, log: Any, reranker: Reranker | None = None
) -> dict[str, Any]:
    """The test queries through the search flow on the sample index (``OUT/eval/report.md``'s
    "Search flow" section) with ``reranker`` (default: the saved model, loaded); logs the
    headline numbers."""
    import pandas as pd

    from esci_reranker.reranker import Reranker
    from esci_reranker.retrieval.flow import evaluate_flow
    from esci_reranker.retrieval.index import CatalogueIndex

    splits = {name: pd.read_parquet(out / "data" / f"{name}.parquet") for name in ("train", "val", "test")}
    if reranker is None:
        reranker = Reranker.from_pretrained(cfg.output.save_path, precision=cfg.eval.precision)
    metrics = evaluate_flow(
        reranker, CatalogueIndex.open(index_dir), splits["test"], pd.concat(splits.values()), out / "eval"
    )
    m = metrics["overall"]
    log(
        f"      search flow ({m['num_queries']} test queries, top 100 reranked): E share {m['share_E_all']:.2f} "
        f"(top 20: {m['share_E_top20']:.2f}); judged-I recall {m['judged_I_recall']:.2f}; E precision "
        f"{m['E_precision']:.2f}; foreign labelled E {m['foreign']['share_E']:.2f}, I {m['foreign']['share_I']:.2f}; "
        f"e2e nDCG@10 {m['ndcg@10_e2e']:.4f} -> {out / 'eval' / 'report.md'}"
    )
    return metrics


@dataclass
class _Stages:
    """What the training and evaluation stages of the job share (``run_pipeline``'s state)."""

    cfg: TrainConfig
    config: str | Path
    out: Path
    baselines: tuple[str, ...]
    progress: bool
    log: Any
    seconds: dict[str, float]
    stages: int
    #: the dense retriever of the catalogues (the train+val one of the search flow in CV)
    retriever: str | Path | None = None
    #: continue an interrupted job (``run_pipeline``'s ``resume``)
    resume: bool = False
    #: the final model as the test evaluation loaded it, which the search flow then reuses
    reranker: Reranker | None = None


def _cross_encoder_pipeline(job: _Stages) -> tuple[PipelineResult, dict[str, Any]]:
    """Stages 2-4 for a single cross-encoder: train with early stopping on val, then evaluate on
    the val and test splits against the baselines. Returns the result and how training went."""

    from esci_reranker.train.distributed import on_main
    from esci_reranker.train.loop import STATE_NAME, train

    t = time.perf_counter()
    job.log(f"[2/{job.stages}] train {job.config} (early stopping on val) -> {job.cfg.output.save_path}")
    checkpoint = job.cfg.output.resolved_run_dir() / "last" / STATE_NAME
    result = train(
        job.cfg, progress=job.progress, evaluate_test=False, resume=job.resume and checkpoint.is_file()
    )
    job.log(
        f"      best val {result.metric_name} {result.best_metric:.4f} at step {result.best_step} "
        f"of {result.steps}{' (early stop)' if result.stopped_early else ''}"
    )
    job.seconds["train"] = time.perf_counter() - t
    return on_main(lambda: _evaluate_cross_encoder(job, result))


def _evaluate_cross_encoder(job: _Stages, result: TrainResult) -> tuple[PipelineResult, dict[str, Any]]:
    """Stages 3-4 of ``_cross_encoder_pipeline``: the trained model (``result``, a ``TrainResult``)
    on the val and test splits against the baselines."""
    import pandas as pd

    from esci_reranker.eval.runner import EvaluationOptions, run_evaluation
    from esci_reranker.reranker import Reranker

    reranker = Reranker.from_pretrained(job.cfg.output.save_path, precision=job.cfg.eval.precision)
    reranker.name = (
        "esci-reranker (multi-task)" if reranker.config.multi_task else "esci-reranker (single-task)"
    )
    job.reranker = reranker
    evaluations = {}
    for step, split, folder in ((3, "val", "eval_val"), (4, "test", "eval")):
        t = time.perf_counter()
        job.log(
            f"[{step}/{job.stages}] evaluate on the {split} split against {', '.join(job.baselines) or 'no baselines'} -> {job.out / folder}"
        )
        frame = pd.read_parquet(job.out / "data" / f"{split}.parquet")
        evaluations[split] = run_evaluation(
            reranker,
            frame,
            job.out / folder,
            EvaluationOptions(baselines=job.baselines, progress=job.progress),
        )
        job.seconds[f"evaluate_{split}"] = time.perf_counter() - t
    training = {
        "best_step": result.best_step,
        f"val_{result.metric_name}": result.best_metric,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "seconds": result.seconds,
        "scoring_precision": reranker.precision,
    }
    pipeline_result = PipelineResult(
        out_dir=job.out,
        test_table=evaluations["test"].table,
        val_table=evaluations["val"].table,
        test_metrics=evaluations["test"].metrics,
        val_metrics=evaluations["val"].metrics,
        seconds=job.seconds,
    )
    return pipeline_result, training


def _stacked_pipeline(job: _Stages) -> tuple[PipelineResult, dict[str, Any]]:
    """Stages 2-4 for a stacked model: out-of-fold cross-encoders, cross-validation and the
    stacker, the final cross-encoder; then the test split against the baselines. Returns the
    result and how training went."""

    from esci_reranker.stack.train import train_stacked
    from esci_reranker.train.distributed import on_main

    t = time.perf_counter()
    job.log(
        f"[2/{job.stages}] train {job.config}: {job.cfg.stack.folds} out-of-fold cross-encoders, the stacker, the final "
        f"model -> {job.cfg.output.save_path}"
    )
    from esci_reranker.retrieval.flow import stacked_inputs

    # the search flow of each CV fold costs a catalogue and a scoring pass per fold: `cv` measures
    # it; the job builds the catalogue only when the config learns from catalogue negatives
    frame, catalogue = stacked_inputs(job.cfg, False, job.log, retriever=job.retriever)
    result = train_stacked(
        job.cfg,
        progress=job.progress,
        log=job.log,
        baselines=job.baselines,
        negatives=None if catalogue is None else catalogue.negatives,
        on_fold=None if catalogue is None else catalogue.on_fold,
        train_rows=None if catalogue is None else catalogue.encoder_negatives,
        resume=job.resume,
        frame=frame,
    )
    job.seconds["train"] = time.perf_counter() - t
    return on_main(lambda: _evaluate_stacked(job, result))


def _evaluate_stacked(job: _Stages, result: StackedTrainResult) -> tuple[PipelineResult, dict[str, Any]]:
    """Stages 3-4 of ``_stacked_pipeline``: the CV tables, then the stacked model (``result``, a
    ``StackedTrainResult``) on the test split against the baselines."""
    import pandas as pd

    from esci_reranker.eval.runner import EvaluationOptions, run_evaluation
    from esci_reranker.reranker import Reranker
    from esci_reranker.stack.cv import cv_tables

    cfg = job.cfg
    t = time.perf_counter()
    job.log(
        f"[3/{job.stages}] cross-validation over the train+val queries (out of fold; mean ± std over folds)"
    )
    cv_table = cv_tables(result.cv)
    job.seconds["evaluate_val"] = time.perf_counter() - t  # the CV ran during training

    t = time.perf_counter()
    job.log(
        f"[4/{job.stages}] evaluate on the test split against {', '.join(job.baselines) or 'no baselines'} -> {job.out / 'eval'}"
    )
    reranker = Reranker.from_pretrained(cfg.output.save_path, precision=cfg.eval.precision)
    reranker.name = "esci-reranker (stacked)"
    job.reranker = reranker
    frame = pd.read_parquet(job.out / "data" / "test.parquet")
    evaluation = run_evaluation(
        reranker, frame, job.out / "eval", EvaluationOptions(baselines=job.baselines, progress=job.progress)
    )
    job.seconds["evaluate_test"] = time.perf_counter() - t
    training = {
        "cv": result.cv["overall"],
        "seconds": result.seconds,
        "rounds": result.rounds,
        # the arithmetic of the out-of-fold outputs, the evaluation and the search flow
        "scoring_precision": reranker.precision,
    }
    return PipelineResult(
        out_dir=job.out,
        test_table=evaluation.table,
        val_table="",
        test_metrics=evaluation.metrics,
        val_metrics={},
        seconds=job.seconds,
        cv_table=cv_table,
    ), training


def _write_results(
    cfg: TrainConfig,
    out: Path,
    test_metrics: dict[str, Any],
    training: dict[str, Any],
    seconds: dict[str, float],
) -> None:
    """``metrics.json`` beside the model (what ``push`` puts in the model card: the test
    evaluation plus how training went) and ``timings.json`` with the total."""
    model_metrics = dict(test_metrics) | {"training": training}
    (Path(cfg.output.save_path) / "metrics.json").write_text(
        json.dumps(model_metrics, indent=2, default=str) + "\n"
    )
    seconds["total"] = sum(seconds.values())
    (out / "timings.json").write_text(json.dumps(seconds, indent=2) + "\n")
