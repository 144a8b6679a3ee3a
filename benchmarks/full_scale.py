"""Every CPU stage of the default recipe at the US locale's size: wall time and peak RSS per stage.

The full ESCI US locale (97,345 queries, 1,818,825 judged pairs, 1,215,854 products) is not
available here, so this builds a synthetic data set of that shape from the bundled sample and
runs the default recipe's stages through the package's own code, each in a fresh process (its
peak RSS is that process's ``ru_maxrss``):

=================  ==================================================================================
stage              what runs
=================  ==================================================================================
``synth``          the raw ``examples`` and ``products`` parquets (not a stage of the recipe)
``prepare``        ``data.prepare`` + ``write_splits`` on the raw files
``negatives``      ``retrieval.flow.CatalogueFlow``: the train+val catalogue (BM25 + dense, with
                   the tiny random encoder as its retriever) built from the whole table, then the
                   table cut to the training columns and every training query's catalogue
                   negatives mined for one fold and for the final model (``stack.
                   encoder_negatives``); also the memory a list with its products' fields would
                   take (``retrieve_lists`` on 1,000 queries)
``ce_train``       ``stack.train.train_fixed`` on every train+val pair with a tiny random
                   backbone for ``--ce-steps`` steps: the whole training data path (read, tokenise
                   every pair, fit the prior heads over every pair, batch, save) at full size
``ce_oof``         the cross-encoder's columns of every train+val pair (``stack.outputs.
                   frame_outputs``, the tiny model), as the k fold models score their held-out folds
``stack_features`` ``stack.cv.oof_stack_table``: every stack feature of every train+val pair
``trees``          ``stack.train.fit_config_stacker``: the Task 1/2/3 LightGBM models, each with its
                   inner query folds, the refits and the decision rules
``rules``          the decision rules alone (``fit_class_offsets`` and ``fit_threshold``) on the
                   trees' inner out-of-fold predictions
``evaluate``       the test split through the stacked tiny model (``predictions_frame``) and
                   ``evaluate_predictions`` with the random and BM25 baselines, report and plots
``distill_data``   ``distill.data.distillation_pairs`` with the default settings
``distill_teacher`` ``distill.teacher.teacher_outputs``: the stacked teacher over every
                   distillation pair, grouped in candidate lists, then its cache read back
=================  ==================================================================================

Texts are the sample's, under new ids: every synthetic product copies one sample product's
fields with one title word swapped for another title word of the sample (so titles, and the
features' per-product work, are not repeated); every query copies a sample query, most with
one word swapped. List sizes follow the sample's distribution rescaled to the US mean (18.7
pairs a query); labels are drawn with ESCI's US shares (E 65 %, S 22 %, C 3 %, I 10 %) and each
pair takes the text of a sample candidate with that label for the same sample query where there
is one; about 23 % of the queries form the test split, as in ESCI's US data.

The cross-encoder stages run a tiny random BERT (hidden 32, 2 layers) so that their data
handling is exercised at full size; their GPU time with the default backbone is projected from
FLOP counts (``docs/scale.md``: 6.4 GFLOP a training pair as run, 1.64 GFLOP a scored pair
forward, 30 % padding) at a model-FLOP utilisation of 15 % of an A100's 312 TFLOP/s.

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/full_scale.py --scale 0.01 \\
        --work /tmp/full_scale --out runs/bench/full_scale_0.01.json
    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/full_scale.py --scale 1.0 \\
        --stages prepare,stack_features,trees --work /tmp/full_scale

``--processes N`` runs ``ce_train`` as N CPU processes under ``torchrun`` (gloo), as a training
with several processes runs, each tokenising its share of the pairs; each process records its
own peak RSS and its RSS at named points (libraries imported, data read, model built, before and
after every tokenisation, prior features computed, trained) under ``ranks`` in the JSON.
``--ce-batches-per-step`` keeps the global batch when N changes (each process accumulates its
share of one step's batches):

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/full_scale.py --scale 0.1 --stages ce_train \\
        --processes 2 --ce-batches-per-step 2 --work /tmp/fs10 --out runs/bench/ce_train_2proc.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
# Published ESCI US sizes: queries, judged pairs, products (benchmarks/prepare_memory.py).
US_QUERIES, US_PAIRS, US_PRODUCTS = 97_345, 1_818_825, 1_215_854
LABEL_SHARES = {"E": 0.65, "S": 0.22, "C": 0.03, "I": 0.10}
TEST_QUERY_SHARE = 0.23  # ESCI US: ~22.5k of 97.3k queries are in the test split
STAGES = (
    "synth",
    "prepare",
    "negatives",
    "ce_train",
    "ce_oof",
    "stack_features",
    "trees",
    "rules",
    "evaluate",
    "distill_data",
    "distill_teacher",
)
# GPU projection of the cross-encoder stages with the default backbone (docs/scale.md).
TRAIN_GFLOP_PER_PAIR = 6.4
SCORE_GFLOP_PER_PAIR = 1.64 * 1.3
GPU_PEAK_TFLOPS, GPU_MFU, GPU_NAME = 312.0, 0.15, "A100 bf16"
FOLDS = 4


# ----------------------------------------------------------------------------------------------
# synthetic data
# ----------------------------------------------------------------------------------------------


def _swap_word(rng: np.random.Generator, text: str, vocabulary: np.ndarray) -> str:
    words = text.split()
    if not words:
        return text
    words[int(rng.integers(len(words)))] = str(vocabulary[int(rng.integers(len(vocabulary)))])
    return " ".join(words)


def _list_sizes(rng: np.random.Generator, sample_sizes: np.ndarray, queries: int, pairs: int) -> np.ndarray:
    """``queries`` list sizes summing to ``pairs``: the sample's shape, rescaled, with some spread."""
    raw = rng.choice(sample_sizes, size=queries) * rng.lognormal(0.0, 0.5, size=queries)
    sizes = np.maximum(1, np.round(raw * pairs / raw.sum())).astype(np.int64)
    diff = pairs - int(sizes.sum())
    while diff:  # rounding left a few pairs over or under: one at a time on random lists
        i = rng.integers(queries, size=abs(diff))
        np.add.at(sizes, i, np.sign(diff))
        sizes = np.maximum(sizes, 1)
        diff = pairs - int(sizes.sum())
    return sizes


def synthesize(work: Path, scale: float, seed: int = 0) -> dict[str, Any]:
    """Write ``raw/examples.parquet`` and ``raw/products.parquet`` shaped like ESCI's US locale."""
    from esci_reranker.data import sample_path

    rng = np.random.default_rng(seed)
    sample = pd.read_parquet(sample_path()).reset_index(drop=True)
    n_queries = max(8, round(US_QUERIES * scale))
    n_pairs = max(n_queries, round(US_PAIRS * scale))
    n_products = min(n_pairs, max(1, round(US_PRODUCTS * scale)))

    sample_qids = np.sort(sample["query_id"].unique())
    sample_sizes = sample.groupby("query_id").size().to_numpy()
    sizes = _list_sizes(rng, sample_sizes, n_queries, n_pairs)
    parent_query = rng.integers(len(sample_qids), size=n_queries)
    query_vocab = np.unique(" ".join(sample["query"].unique()).split())
    first = sample.groupby("query_id").first()
    queries = [
        _swap_word(rng, q, query_vocab) if rng.random() < 0.8 else q
        for q in first.loc[sample_qids[parent_query], "query"]
    ]
    sources = first.loc[sample_qids[parent_query], "esci_query_source"].to_numpy()
    is_test = rng.random(n_queries) < TEST_QUERY_SHARE

    # pairs: the query of each, its label, the sample row whose text it takes
    pair_query = np.repeat(np.arange(n_queries), sizes)
    labels = np.asarray(list(LABEL_SHARES))[
        rng.choice(len(LABEL_SHARES), size=n_pairs, p=list(LABEL_SHARES.values()))
    ]
    rows_by = {
        key: rows.to_numpy() for key, rows in sample.groupby(["query_id", "esci_label"]).groups.items()
    }
    rows_by_label = {label: rows.to_numpy() for label, rows in sample.groupby("esci_label").groups.items()}
    parent_row = np.empty(n_pairs, dtype=np.int64)
    pair_qid = sample_qids[parent_query][pair_query]
    keys = pd.DataFrame({"q": pair_qid, "l": labels})
    for (qid, label), idx in keys.groupby(["q", "l"]).groups.items():
        pool = rows_by.get((qid, label), rows_by_label[label])
        parent_row[idx.to_numpy()] = pool[rng.integers(len(pool), size=len(idx))]

    # products: n_products pairs get a product of their own, the rest share one with another
    # pair whose text comes from the same sample row (a product judged for several queries)
    product_of = np.full(n_pairs, -1, dtype=np.int64)
    owners = rng.permutation(n_pairs)[:n_products]
    product_of[owners] = np.arange(n_products)
    owner_frame = pd.DataFrame({"row": parent_row[owners], "product": np.arange(n_products)})
    by_row = owner_frame.groupby("row")["product"].apply(np.asarray).to_dict()
    product_row = np.empty(n_products, dtype=np.int64)
    product_row[product_of[owners]] = parent_row[owners]
    extra_products = []
    for i in np.flatnonzero(product_of < 0):
        pool = by_row.get(parent_row[i])
        if pool is not None:
            product_of[i] = pool[rng.integers(len(pool))]
        else:
            product_of[i] = n_products + len(extra_products)
            extra_products.append(parent_row[i])
    product_row = np.concatenate([product_row, np.asarray(extra_products, dtype=np.int64)])
    # a product judged twice for one query becomes a product of its own
    dup = pd.DataFrame({"q": pair_query, "p": product_of}).duplicated().to_numpy()
    fresh = np.flatnonzero(dup)
    product_of[fresh] = len(product_row) + np.arange(len(fresh))
    product_row = np.concatenate([product_row, parent_row[fresh]])

    title_vocab = np.unique(" ".join(sample["product_title"].unique()).split())
    base = sample.iloc[product_row].reset_index(drop=True)
    titles = [_swap_word(rng, t, title_vocab) for t in base["product_title"]]
    product_ids = [f"B{i:09d}" for i in range(len(product_row))]
    products = pd.DataFrame(
        {
            "product_id": product_ids,
            "product_locale": "us",
            "product_title": titles,
            "product_description": base["product_description"].to_numpy(),
            "product_bullet_point": base["product_bullet_point"].to_numpy(),
            "product_brand": base["product_brand"].to_numpy(),
            "product_color": base["product_color"].to_numpy(),
        }
    )
    query_ids = np.arange(n_queries, dtype=np.int64)
    examples = pd.DataFrame(
        {
            "example_id": np.arange(n_pairs, dtype=np.int64),
            "query": np.asarray(queries, dtype=object)[pair_query],
            "query_id": query_ids[pair_query],
            "product_id": np.asarray(product_ids, dtype=object)[product_of],
            "product_locale": "us",
            "esci_label": labels,
            "small_version": np.int64(0),
            "large_version": np.int64(1),
            "split": np.where(is_test[pair_query], "test", "train"),
            "esci_query_source": sources[pair_query],
        }
    )
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    examples.to_parquet(raw / "examples.parquet", index=False)
    products.to_parquet(raw / "products.parquet", index=False)
    return {
        "rows": n_pairs,
        "queries": n_queries,
        "products": len(products),
        "test_queries": int(is_test.sum()),
        "labels": {k: int(v) for k, v in examples["esci_label"].value_counts().items()},
    }


# ----------------------------------------------------------------------------------------------
# stages (each runs in its own process; they hand over through files under --work)
# ----------------------------------------------------------------------------------------------


def _config(work: Path, ce_steps: int) -> Any:
    """The default training config pointed at the synthetic data and the tiny backbone."""
    from esci_reranker.train.config import load_config

    return load_config(
        ROOT / "configs/multi_task.yaml",
        [
            f"data.dir={work / 'data'}",
            f"model.backbone={_tiny_backbone(work)}",
            f"output.save_path={work / 'model'}",
            f"output.run_dir={work / 'train'}",
            f"optim.max_steps={ce_steps}",
            "output.checkpoint_every=1000000",
        ],
    )


def _tiny_backbone(work: Path) -> Path:
    """``model.tiny``'s random encoder (the one the tests build on) and the packaged tokenizer, built once."""
    folder = work / "tiny-backbone"
    if (folder / "config.json").is_file():
        return folder
    from esci_reranker.model.tiny import save_tiny_backbone

    return save_tiny_backbone(folder, seed=0)


def stage_prepare(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from esci_reranker.data import PrepareOptions, prepare, write_splits

    raw = work / "raw"
    prepared = prepare(raw / "examples.parquet", raw / "products.parquet", options=PrepareOptions())
    write_splits(prepared, work / "data")
    splits = prepared.stats["splits"]
    return {"rows": sum(s["rows"] for s in splits.values()), "splits": splits}


class MemoryLog:
    """This process's resident memory at named points: current RSS and the peak so far.

    ``rss_mib`` is what the process holds at the point (``/proc/self/statm``); ``peak_mib`` is
    its ``ru_maxrss`` so far, so a point right after a step shows that step's high-water mark
    when it is the highest yet.
    """

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.points: list[dict[str, Any]] = []

    def mark(self, at: str) -> None:
        """Record the memory now, under the label ``at``."""
        self.points.append(
            {
                "at": at,
                "seconds": round(time.perf_counter() - self.started, 2),
                "rss_mib": round(_rss_mib(), 1),
                "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )


def _rss_mib() -> float:
    """The resident set of this process now, in MiB (Linux; NaN elsewhere)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return float("nan")
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextlib.contextmanager
def _memory_marks(log: MemoryLog) -> Iterator[None]:
    """Mark the memory around the training's steps that hold data: the model build, every
    tokenisation (before and after each ``PairEncoder.encode``, which one process's token cache
    and several processes' shares both go through) and the prior fit.

    The training loop has no hooks for this, so the benchmark wraps those three functions for the
    stage's duration; they run unchanged in between the marks.
    """
    from esci_reranker.model.features import PairEncoder
    from esci_reranker.train import loop

    encode, build_model, fit_prior_heads = PairEncoder.encode, loop.build_model, loop.fit_prior_heads

    def marked_encode(self: PairEncoder, queries: Any, texts: Any) -> Any:
        log.mark(f"before encoding {len(queries):,} pairs")
        out = encode(self, queries, texts)
        log.mark(f"encoded {len(queries):,} pairs")
        return out

    def marked_build(cfg: Any) -> Any:
        out = build_model(cfg)
        log.mark("model and tokenizer built")
        return out

    def marked_fit(*args: Any, **kwargs: Any) -> Any:
        log.mark("prior features computed")
        return fit_prior_heads(*args, **kwargs)

    PairEncoder.encode, loop.build_model, loop.fit_prior_heads = marked_encode, marked_build, marked_fit
    try:
        yield
    finally:
        PairEncoder.encode, loop.build_model, loop.fit_prior_heads = encode, build_model, fit_prior_heads


def stage_ce_train(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    log = MemoryLog()
    log.mark("started")
    # the libraries the training imports, before any data: the baseline every process pays
    import esci_reranker.train.loop  # noqa: F401
    from esci_reranker.stack.train import train_fixed

    log.mark("libraries imported")
    cfg = _config(work, args.ce_steps)
    # The same global batch for any number of processes: each accumulates its share of the
    # batches of one optimiser step (rank r takes batches r, r + N, ... of the epoch).
    cfg.optim.grad_accum_steps = args.ce_batches_per_step // args.processes
    # as a stacked training holds it while its cross-encoders train: the training's columns
    from esci_reranker.train.loop import read_train_val, training_columns

    frame = read_train_val(work / "data", training_columns(cfg.model.text_fields))
    log.mark("train+val read")
    started = time.perf_counter()
    with _memory_marks(log):
        train_fixed(cfg, frame, work / "train" / "train_all.parquet")
    log.mark("trained")
    n = len(frame)
    # the recipe trains k fold models on (k-1)/k of the pairs each, then the final model on all
    pairs_trained = (FOLDS - 1) * n + n
    gflop = pairs_trained * TRAIN_GFLOP_PER_PAIR
    return {
        "rows": n,
        "steps": args.ce_steps,
        "processes": args.processes,
        "global_batch": cfg.optim.batch_size * args.ce_batches_per_step,
        "seconds_in_train": time.perf_counter() - started,
        "memory": log.points,
        "projected_gpu": _gpu(gflop, f"{FOLDS} fold models on {FOLDS - 1}/{FOLDS} + final model, 1 epoch"),
    }


def _gpu(gflop: float, what: str) -> dict[str, Any]:
    seconds = gflop * 1e9 / (GPU_PEAK_TFLOPS * 1e12 * GPU_MFU)
    return {"what": what, "pflop": gflop / 1e6, "gpu": GPU_NAME, "mfu": GPU_MFU, "seconds": seconds}


def _scored(rows: int, what: str, **seconds: float) -> dict[str, Any]:
    """A scoring stage's numbers: the pairs it scored, its timings, and the GPU time of scoring
    each of them once with the default backbone (``what`` says what was scored)."""
    return {"rows": rows, **seconds, "projected_gpu": _gpu(rows * SCORE_GFLOP_PER_PAIR, what)}


def _tiny_reranker(work: Path) -> Any:
    from esci_reranker.reranker import Reranker

    return Reranker.from_pretrained(work / "model", device="cpu", batch_size=256)


def stage_ce_oof(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from esci_reranker.stack.outputs import frame_outputs
    from esci_reranker.train.cv import query_folds
    from esci_reranker.train.loop import read_train_val

    frame = read_train_val(work / "data")
    reranker = _tiny_reranker(work)
    reranker.stacker = None  # the cross-encoder's own columns, as a fold model gives them
    table = frame_outputs(reranker, frame)
    fold_of = {
        q: f for f, queries in enumerate(query_folds(frame["query_id"].to_numpy(), FOLDS)) for q in queries
    }
    table.insert(0, "seed", 0)
    table.insert(0, "fold", table["query_id"].map(fold_of).astype(int))
    table.to_parquet(work / "oof.parquet", index=False)
    return _scored(len(table), "each pair scored once by its fold model")


def stage_stack_features(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from esci_reranker.stack.cv import oof_stack_table
    from esci_reranker.train.loop import read_train_val

    frame = read_train_val(work / "data")
    oof = pd.read_parquet(work / "oof.parquet")
    table = oof_stack_table(frame, oof, seed=0)
    table.to_parquet(work / "stack_table.parquet", index=False)
    return {"rows": len(table), "columns": table.shape[1]}


def stage_trees(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from esci_reranker.stack.stacker import STACKER_DIR, feature_columns, fit_stacker
    from esci_reranker.stack.train import fit_options, gbdt_params

    cfg = _config(work, args.ce_steps)
    table = pd.read_parquet(work / "stack_table.parquet")
    names = feature_columns(table, exclude=cfg.stack.exclude_features)
    stacker, oof = fit_stacker(table, gbdt_params(cfg, 0), **fit_options(cfg, names))
    stacker.save(work / "model" / STACKER_DIR)
    np.save(work / "inner_probs.npy", oof["probs"])
    np.save(work / "inner_sub.npy", oof["substitute_prob"])
    return {"rows": len(table), "features": len(names), "rounds": stacker.rounds}


def stage_rules(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from esci_reranker.labels import LABEL_TO_INDEX
    from esci_reranker.stack.rules import fit_class_offsets, fit_threshold

    labels = pd.read_parquet(work / "stack_table.parquet", columns=["esci_label"])["esci_label"]
    index = labels.map(LABEL_TO_INDEX).to_numpy()
    probs, sub = np.load(work / "inner_probs.npy"), np.load(work / "inner_sub.npy")
    offsets, task2 = fit_class_offsets(probs, index)
    threshold, task3 = fit_threshold(sub, index == LABEL_TO_INDEX["S"])
    return {
        "rows": len(index),
        "offsets": offsets,
        "task2_micro_f1": task2,
        "threshold": threshold,
        "task3_micro_f1": task3,
    }


def stage_evaluate(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from esci_reranker.eval.runner import EvaluationOptions, evaluate_predictions, predictions_frame

    reranker = _tiny_reranker(work)
    test = pd.read_parquet(work / "data" / "test.parquet")
    started = time.perf_counter()
    predictions = predictions_frame(reranker, test, progress=False)
    scoring = time.perf_counter() - started
    started = time.perf_counter()
    evaluate_predictions(
        predictions,
        test,
        work / "eval",
        name="tiny",
        options=EvaluationOptions(baselines=("random", "bm25"), progress=False),
        threshold=reranker.substitute_threshold,
    )
    return _scored(
        len(test),
        "the test split scored once",
        seconds_scoring=scoring,
        seconds_metrics_baselines_report=time.perf_counter() - started,
    )


def stage_negatives(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import shutil
    import tracemalloc

    from esci_reranker.hardware import malloc_trim
    from esci_reranker.retrieval.flow import catalogue_flow, retrieve_lists
    from esci_reranker.train.cv import query_folds
    from esci_reranker.train.loop import read_train_val, training_frame

    log = MemoryLog()
    cfg = _config(work, args.ce_steps)
    folds = work / "negatives"
    shutil.rmtree(folds / "catalogue", ignore_errors=True)
    frame = read_train_val(work / "data")
    log.mark("train+val read")
    flow = catalogue_flow(
        cfg,
        frame,
        False,
        lambda line: None,
        retriever=_tiny_backbone(work),
        test_split=work / "data" / "test.parquet",
    )
    if flow is None:
        raise RuntimeError("negatives: the default config asks for no catalogue negatives.")
    started = time.perf_counter()
    index = flow.index(folds)
    seconds_index = time.perf_counter() - started
    log.mark("catalogue built")
    # as the pipeline does once the catalogue is built
    frame = flow.frame = training_frame(frame, cfg.model.text_fields)
    malloc_trim()
    log.mark("table cut to the training columns")
    # what each list held with its products' fields (the lists mining used to keep)
    sample = frame.drop_duplicates("query_id").head(1000)
    tracemalloc.start()
    lists = retrieve_lists(index, sample, max(cfg.stack.negatives_retrieve, 100))
    with_fields = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del lists
    held = query_folds(frame["query_id"].to_numpy(), FOLDS)[0]
    started = time.perf_counter()
    fold = flow.encoder_negatives(folds, frozenset(held))
    seconds_fold = time.perf_counter() - started
    log.mark("negatives mined for fold 1")
    started = time.perf_counter()
    final = flow.encoder_negatives(folds, frozenset())
    seconds_final = time.perf_counter() - started
    log.mark("negatives mined for the final model")
    queries = frame["query_id"].nunique()
    return {
        "rows": len(frame),
        "products": len(index),
        "queries": queries,
        "negatives_fold": 0 if fold is None else len(fold),
        "negatives_final": 0 if final is None else len(final),
        "seconds_index": seconds_index,
        "seconds_retrieve_and_mine_fold": seconds_fold,
        "seconds_mine_final": seconds_final,
        "lists_with_fields_mib_per_1000_queries": with_fields / 2**20,
        "lists_with_fields_gib_all_queries": with_fields / 2**30 * queries / len(sample),
        "memory": log.points,
    }


def stage_distill_data(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from esci_reranker.distill.config import DistillData
    from esci_reranker.distill.data import distillation_pairs

    pairs = distillation_pairs(work / "data", DistillData(dir=work / "data"))
    pairs.frame.to_parquet(work / "distill_pairs.parquet", index=False)
    return {"rows": len(pairs.frame), "counts": pairs.counts()}


def stage_distill_teacher(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from esci_reranker.distill.config import TeacherSection
    from esci_reranker.distill.teacher import teacher_outputs

    pairs = pd.read_parquet(work / "distill_pairs.parquet")
    out = work / "distill"
    for name in ("teacher_outputs.json", "teacher_outputs.parquet"):
        (out / name).unlink(missing_ok=True)
    cfg = TeacherSection(device="cpu", batch_size=256)
    started = time.perf_counter()
    teacher_outputs(work / "model", pairs, cfg, out, log=lambda line: None)
    scored = time.perf_counter() - started
    started = time.perf_counter()
    cached = teacher_outputs(work / "model", pairs, cfg, out, log=lambda line: None)
    if not cached.cached:
        raise RuntimeError("distill_teacher: the second call did not read the cache.")
    return _scored(
        len(pairs),
        "every distillation pair scored once",
        seconds_scoring=scored,
        seconds_cache_read=time.perf_counter() - started,
    )


def stage_synth(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    return synthesize(work, args.scale, args.seed)


STAGE_FUNCTIONS: dict[str, Callable[[Path, argparse.Namespace], dict[str, Any]]] = {
    "synth": stage_synth,
    "prepare": stage_prepare,
    "negatives": stage_negatives,
    "ce_train": stage_ce_train,
    "ce_oof": stage_ce_oof,
    "stack_features": stage_stack_features,
    "trees": stage_trees,
    "rules": stage_rules,
    "evaluate": stage_evaluate,
    "distill_data": stage_distill_data,
    "distill_teacher": stage_distill_teacher,
}


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------


def _run_child(stage: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one stage in a fresh process; its result plus the process's peak RSS (``wait4``).

    ``ce_train`` with ``--processes N`` above 1 runs under ``torchrun`` as N CPU processes (gloo):
    ``peak_rss_mib`` is then the largest of them (``wait4`` reports the largest descendant) and
    ``ranks`` holds each one's own peak and memory points.
    """
    result_path = args.work / f"stage_{stage}.json"
    for old in (result_path, *args.work.glob(f"stage_{stage}.rank*.json")):
        old.unlink(missing_ok=True)
    command = [
        __file__, "--child", stage, "--work", str(args.work), "--scale", str(args.scale),
        "--seed", str(args.seed), "--ce-steps", str(args.ce_steps), "--processes", str(args.processes),
        "--ce-batches-per-step", str(args.ce_batches_per_step),
    ]  # fmt: skip
    env = dict(os.environ)
    processes = args.processes if stage == "ce_train" else 1
    if processes > 1:
        launcher = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(processes)]
        launcher += ["--master-port", str(_free_port())]
        env.pop("WORLD_SIZE", None)  # torchrun's own, not one left over from an enclosing launch
    else:
        launcher = [sys.executable]
    started = time.perf_counter()
    child = subprocess.Popen([*launcher, *command], env=env)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        return {"stage": stage, "error": f"exit code {child.returncode}", "process_wall_s": wall}
    result = json.loads(result_path.read_text())
    others = [
        json.loads((args.work / f"stage_{stage}.rank{r}.json").read_text()) for r in range(1, processes)
    ]
    result["ranks"] = [_rank_view(result)] + [_rank_view(r) for r in others]
    # ru_maxrss is KiB on Linux
    return result | {
        "process_wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def _rank_view(result: dict[str, Any]) -> dict[str, Any]:
    """One process's own numbers from its stage result: rank, peak RSS and memory points."""
    return {k: result[k] for k in ("rank", "self_peak_rss_mib", "memory") if k in result}


def _free_port() -> int:
    """A TCP port free on this machine now, for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(stage: str, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    result = STAGE_FUNCTIONS[stage](args.work, args)
    rank = int(os.environ.get("RANK", "0"))
    result = {"stage": stage, "wall_s": time.perf_counter() - started} | result
    # this process's own peak: under torchrun the launcher's wait4 sees only the largest rank's
    result |= {"rank": rank, "self_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    name = f"stage_{stage}.json" if rank == 0 else f"stage_{stage}.rank{rank}.json"
    (args.work / name).write_text(json.dumps(result, indent=2, default=str) + "\n")


def format_table(results: list[dict[str, Any]], scale: float) -> str:
    """A markdown table of the stages: rows, wall seconds, peak RSS, and projections to full size."""
    lines = [
        "| stage | rows | wall s | CPU s | peak RSS MiB | CPU s at full size (linear) | GPU projection |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['stage']} | | | | | {r['error']} |")
            continue
        full = r["cpu_s"] / scale
        # the GPU time of the default backbone on the stage's pairs, at full size
        gpu = f"{r['projected_gpu']['seconds'] / scale / 60:.1f} min" if "projected_gpu" in r else ""
        lines.append(
            f"| {r['stage']} | {r.get('rows', 0):,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['peak_rss_mib']:,.0f} | {full:,.0f} | {gpu} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the US locale's size")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/esci-full-scale"), help="scratch folder")
    parser.add_argument("--out", type=Path, default=None, help="JSON file of the results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ce-steps", type=int, default=20, help="training steps of the tiny cross-encoder")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="ce_train: training processes (several run under torchrun on CPU, gloo)",
    )
    parser.add_argument(
        "--ce-batches-per-step",
        type=int,
        default=None,
        help="ce_train: batches of optim.batch_size pairs in one optimiser step over all processes, "
        "a multiple of --processes (default: --processes); the global batch, kept for any --processes",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error(f"--scale {args.scale}: expected a fraction in (0, 1].")
    if args.processes < 1:
        parser.error(f"--processes {args.processes}: expected 1 or more.")
    if args.ce_batches_per_step is None:
        args.ce_batches_per_step = args.processes
    if args.ce_batches_per_step < 1 or args.ce_batches_per_step % args.processes:
        parser.error(
            f"--ce-batches-per-step {args.ce_batches_per_step}: expected a positive multiple of "
            f"--processes ({args.processes})."
        )
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGE_FUNCTIONS]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; expected some of {list(STAGES)}.")
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child:
        _child(args.child, args)
        return 0
    results: list[dict[str, Any]] = []
    for stage in stages:
        print(f"[{time.strftime('%H:%M:%S')}] {stage} ...", flush=True)
        results.append(_run_child(stage, args))
        r = results[-1]
        print(
            f"    {r.get('wall_s', float('nan')):.1f} s wall, {r.get('cpu_s', float('nan')):.1f} s CPU, "
            f"peak RSS {r.get('peak_rss_mib', float('nan')):,.0f} MiB",
            flush=True,
        )
        for rank in r.get("ranks", []) if len(r.get("ranks", [])) > 1 else []:
            print(f"    rank {rank['rank']}: peak RSS {rank['self_peak_rss_mib']:,.0f} MiB", flush=True)
        # written after every stage: a long run that is stopped keeps what it measured
        _write_report(args, results)
    print(format_table(results, args.scale))
    return 0 if all("error" not in r for r in results) else 1


def _write_report(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    if args.out is None:
        return
    report = {
        "scale": args.scale,
        "command": " ".join(sys.argv),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "processes": args.processes,
        "load_average": os.getloadavg(),
        "stages": results,
        "table": format_table(results, args.scale),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
