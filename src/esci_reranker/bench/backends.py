"""Inference speed and accuracy of each backend, on real ESCI pairs from the bundled sample.

``run_backend_bench(model_dir, out_json)`` measures, in one run:

- **throughput** (pairs/second) of torch fp32, torch bf16 autocast (only on CPUs with native
  bf16: AVX-512 BF16 or AMX), torch int8 (dynamic int8 linear layers, ``precision="int8"``),
  ONNX Runtime fp32, ONNX Runtime int8 (dynamic quantisation) and the anchor
  ``sentence_transformers.CrossEncoder.predict`` on the same weights;
- each one's ratio to the anchor and its share of this CPU's fp32 matmul roofline;
- the Task 1 nDCG of each backend on the sample's holdout split (the test split), and what each
  int8 backend loses against fp32.

**Stacked checkpoints.** The torch rows run the whole model (cross-encoder, then the stacker's
trees and rules). The stacker is not in ONNX, so the ONNX rows are the cross-encoder stage alone
(``export_onnx(..., cross_encoder_only=True)``), labelled ``stage: cross-encoder-only`` in the JSON
and in the table's note; their scores and nDCG are not compared with the torch rows'.

**Workload.** What a reranker is given: whole candidate lists. Queries of the sample are drawn
in a fixed random order (seed 0) and all their candidates taken until ``n_pairs`` pairs (the last
list cut short), so the pairs have the real query and product text lengths and the real number
of candidates per query (~44).

**Fair timing.** Every variant scores the same pairs, with the same batch size and thread count,
after an untimed warm-up. The variants
run round-robin, ``repeats`` rounds, starting each round at the next variant, and the roofline
matmul runs inside every round too: load from other processes on a shared machine slows all of
them alike. The reported rate uses each variant's fastest round (noise only ever slows a round
down); the median is kept next to it.

**FLOPs.** Useful work only, from the real (unpadded) token counts: a sequence of ``T`` tokens
costs ``L·(T·2·(4H² + 2·H·I) + 2·2·T²·H)`` (Q, K, V, O projections and the two MLP matrices,
plus ``QKᵀ`` and ``AV``), summed over the pair and, with the cosine prior, the query and product
towers as the model runs them (each distinct text once per batch). Embeddings, softmax, layer norms and heads are left out. The roofline is the best rate of
a large fp32 matmul in the same run, by ``torch.mm`` and by an ONNX Runtime ``MatMul`` (the higher
of the two: torch's MKL takes a slower code path on AMD CPUs, where ONNX Runtime's MLAS reaches
about twice its rate). bf16 and int8 can exceed 100% of it.

**Server latency.** Pass ``server_latency=esci_reranker.bench.server.ServerLatency()`` (what
``esci-reranker bench --server`` does) to add p50/p99 ``/rerank`` latency through the real server,
at concurrency 1 and 8, with dynamic batching off and on, each against the in-process time of
this module's anchor (``anchor_variant``) on the same 40 pairs; without it the JSON records it as
not measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import numpy as np
import pandas as pd
import torch

from esci_reranker import __version__
from esci_reranker.data.sample import sample_path
from esci_reranker.data.text import product_texts
from esci_reranker.fsutil import write_json
from esci_reranker.hardware import cpu_bf16_support, cpu_flags, cpu_model
from esci_reranker.model.config import ModelConfig
from esci_reranker.model.cpu import int8_available
from esci_reranker.model.features import unique_rows
from esci_reranker.model.onnx import CROSS_ENCODER_STAGE, WHOLE_MODEL
from esci_reranker.reranker import Reranker

TORCH_FP32: Final[str] = "torch_fp32"
TORCH_BF16: Final[str] = "torch_bf16"
TORCH_INT8: Final[str] = "torch_int8"
ONNX_FP32: Final[str] = "onnx_fp32"
ONNX_INT8: Final[str] = "onnx_int8"
ANCHOR: Final[str] = "st_cross_encoder"
BACKENDS: Final[tuple[str, ...]] = (TORCH_FP32, TORCH_BF16, TORCH_INT8, ONNX_FP32, ONNX_INT8, ANCHOR)
#: Split of the bundled sample whose queries form the test split.
TEST_SPLIT: Final[str] = "holdout"

#: Hook for the server part of the benchmark: called with the model folder, returns what it
#: measured, stored under ``"server_latency"`` in the JSON. It is expected to start the HTTP
#: service on that model and report p50/p99 ``/rerank`` latency in milliseconds at concurrency 1
#: and 8, with and without dynamic batching, e.g.
#: ``{"concurrency_1": {"batching_off": {"p50_ms": ..., "p99_ms": ...}, "batching_on": {...}}, ...}``.
ServerLatencyBench = Callable[[Path], Mapping[str, Any]]
#: Renders a measured ``server_latency`` block as text under the backend table
#: (``bench.server.format_server_table``, which builds on this module, so it comes in as an argument).
ServerTable = Callable[[Mapping[str, Any]], str]


@dataclass
class _Variant:
    name: str
    predict: Callable[[list[str], list[str]], np.ndarray]
    uses_towers: bool
    note: str = ""
    ndcg_meaningful: bool = True
    #: What the variant computes: ``WHOLE_MODEL``, or ``CROSS_ENCODER_STAGE`` for the ONNX export
    #: of a stacked checkpoint (its trees are not in ONNX); only equal stages are compared.
    stage: str = WHOLE_MODEL
    seconds: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------


def _best_seconds(run: Callable[[], object], reps: int) -> float:
    run()  # warm-up: thread pool, pages
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


class Timed(Protocol):
    """A measured variant: the seconds of each of its timed rounds."""

    seconds: list[float]


TimedT = TypeVar("TimedT", bound=Timed)


@dataclass(frozen=True)
class Roofline:
    """The fp32 matmul rates measured after each round (GFLOP/s): ``torch.mm`` and, where
    installed, ONNX Runtime ``MatMul`` of two ``size``-square matrices."""

    torch_mm: list[float]
    onnxruntime_matmul: list[float]
    size: int

    @property
    def peak(self) -> float:
        """The best rate of any round: the anchor each variant's share is measured against."""
        return max(self.torch_mm + self.onnxruntime_matmul)

    def record(self) -> dict[str, Any]:
        """The roofline keys of a benchmark's JSON result."""
        return {
            "roofline_fp32_gflops": self.peak,
            "roofline_rounds_gflops": {
                "torch_mm": self.torch_mm,
                "onnxruntime_matmul": self.onnxruntime_matmul,
            },
            "roofline_matrix_size": self.size,
        }


def interleaved_rounds(
    variants: Mapping[str, TimedT],
    run: Callable[[TimedT], object],
    repeats: int,
    roofline_size: int,
    threads: int,
    say: Callable[[str], None],
    rate: Callable[[str, float], str],
) -> Roofline:
    """Run every variant once a round, each round starting one variant later (so no variant always
    runs first or last), time each run into its ``seconds``, measure the matmul roofline (torch
    and, where installed, ONNX Runtime) after each round and say one line a round."""
    names = list(variants)
    roofline = Roofline([], [], roofline_size)
    for round_ in range(repeats):
        shift = round_ % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            run(variants[name])
            variants[name].seconds.append(time.perf_counter() - start)
        roofline.torch_mm.append(matmul_gflops(roofline_size))
        ort_rate = ort_matmul_gflops(roofline_size, threads=threads)
        if ort_rate is not None:
            roofline.onnxruntime_matmul.append(ort_rate)
        say(
            f"round {round_ + 1}/{repeats}: "
            + ", ".join(f"{n} {rate(n, variants[n].seconds[-1])}" for n in names)
        )
    return roofline


def machine_record(bf16: tuple[bool, str], **extra: Any) -> dict[str, Any]:
    """The ``machine`` block of a benchmark's JSON result: the CPU, its native bf16 support
    (``cpu_bf16_support()``), ``extra`` facts and the library versions."""
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16[0],
        "bf16_evidence": bf16[1],
        **extra,
        "versions": _versions(),
    }


def matmul_gflops(n: int = 2048, reps: int = 2) -> float:
    """Best fp32 ``torch.mm`` rate of two n×n matrices in GFLOP/s (``2·n³`` FLOPs per product)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    return 2.0 * n**3 / _best_seconds(lambda: torch.mm(a, b, out=out), reps) / 1e9


def ort_matmul_gflops(n: int = 2048, reps: int = 2, threads: int = 1) -> float | None:
    """Best fp32 rate of a one-node ONNX Runtime ``MatMul`` of two n×n matrices (None without ORT)."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    spec = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": np.random.randn(n, n).astype(np.float32), "b": np.random.randn(n, n).astype(np.float32)}
    return 2.0 * n**3 / _best_seconds(lambda: session.run(None, feed), reps) / 1e9


# ---------------------------------------------------------------------------------------------
# work
# ---------------------------------------------------------------------------------------------


def encoder_flops(seq_lens: Sequence[int], layers: int, hidden: int, intermediate: int) -> float:
    """Forward FLOPs of a BERT-style encoder over sequences of the given real lengths.

    ``sum_T L·(T·2·(4H² + 2·H·I) + 2·2·T²·H)``: per token the Q, K, V, O projections (4H²) and
    the two MLP matrices (2HI), two FLOPs per multiply-add; plus ``QKᵀ`` and ``AV`` (2·T·H each
    per token). Embeddings, softmax and layer norms are ignored.
    """
    t = np.asarray(seq_lens, dtype=np.float64)
    per_token = 2.0 * (4 * hidden**2 + 2 * hidden * intermediate)
    return float(layers * (t.sum() * per_token + 2.0 * 2.0 * (t**2).sum() * hidden))


def _encoder_shape(config: ModelConfig) -> tuple[int, int, int]:
    bb = config.backbone
    hidden = int(bb.get("hidden_size", bb.get("dim", 0)))
    layers = int(bb.get("num_hidden_layers", bb.get("n_layers", 0)))
    intermediate = int(bb.get("intermediate_size", bb.get("hidden_dim", 4 * hidden)))
    return layers, hidden, intermediate


def _pairs_flops(reranker: Reranker, queries: list[str], texts: list[str]) -> dict[str, float]:
    """FLOPs of scoring the pairs: with the towers (our model) and of the pair alone (the anchor)."""
    encoded = reranker.pair_encoder.encode(queries, texts)
    layers, hidden, intermediate = _encoder_shape(reranker.config)
    pair_lens = [len(x) for x in encoded.pair_ids]
    pair = encoder_flops(pair_lens, layers, hidden, intermediate)
    towers = 0.0
    if encoded.query_ids is not None and encoded.product_ids is not None:
        # The towers run each distinct text of a batch once (PairEncoder.collate).
        lens: list[int] = []
        for index in reranker.batches(encoded):
            for seqs in (encoded.query_ids, encoded.product_ids):
                lens += [len(s) for s in unique_rows([seqs[i] for i in index])[0]]
        towers = encoder_flops(lens, layers, hidden, intermediate)
    return {
        "pair_only": pair,
        "with_towers": pair + towers,
        "mean_pair_tokens": float(np.mean(pair_lens)),
        "max_pair_tokens": float(np.max(pair_lens)),
    }


def candidate_lists(frame: pd.DataFrame, n_pairs: int, seed: int = 0) -> np.ndarray:
    """Row positions of whole candidate lists of randomly ordered queries, ``n_pairs`` in all."""
    order = np.random.default_rng(seed).permutation(frame["query_id"].unique())
    rank = pd.Series(np.arange(len(order)), index=order)
    # Stable sort by the query's drawn rank: each list stays whole and in its original order.
    rows = np.argsort(frame["query_id"].map(rank).to_numpy(), kind="stable")
    return rows[:n_pairs].astype(np.int64)


def _load_sample(config: ModelConfig) -> pd.DataFrame:
    frame = pd.read_parquet(sample_path())
    frame = frame.assign(
        product_text=product_texts(frame, config.text_fields, config.long_field_chars).astype(str),
        query=frame["query"].astype(str),
    )
    return frame.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------


def _reranker_variant(name: str, reranker: Reranker, note: str = "", stage: str = WHOLE_MODEL) -> _Variant:
    def predict(queries: list[str], texts: list[str]) -> np.ndarray:
        return reranker.predict_texts(queries, texts).scores

    return _Variant(name, predict, uses_towers=reranker.config.prior == "cosine", note=note, stage=stage)


def anchor_variant(
    model_dir: Path, workdir: Path, max_length: int, batch_size: int
) -> tuple[_Variant | None, dict[str, Any]]:
    """``CrossEncoder.predict`` on the st-cross-encoder export of the checkpoint, or, when the
    checkpoint cannot be exported that way, on its encoder with a fresh 1-label head.

    The one anchor of both benchmarks: the backend rows here and the server's in-process anchor
    (``bench.server``). Returns the variant (None without sentence-transformers) and what it is:
    ``kind`` (``export`` or ``backbone-fallback``), ``note``, ``detail`` (or a skip ``reason``).
    The export is written under ``workdir``.
    """
    try:
        from sentence_transformers import CrossEncoder
    except ImportError:
        return None, {"status": "skipped", "reason": "pip install 'esci-reranker[st]' for the anchor"}
    from esci_reranker.model.export import ExportError, export_st_cross_encoder

    info: dict[str, Any] = {"max_length": max_length, "batch_size": batch_size}
    target = workdir / "st-cross-encoder"
    try:
        export_st_cross_encoder(model_dir, target)
        info["kind"] = "export"
        info["note"] = "st-cross-encoder export of the checkpoint"
        info["detail"] = "the same weights; predict() returns the Task 1 regression score"
        meaningful = True
    except ExportError as err:
        _backbone_cross_encoder(model_dir, target)
        info["kind"] = "backbone-fallback"
        info["note"] = "backbone fallback: same encoder, fresh head (no nDCG)"
        info["detail"] = (
            "the checkpoint is not exportable as a stock cross-encoder, so the anchor is a "
            "CrossEncoder on its encoder weights with a fresh 1-label head: the same encoder "
            "compute (no prior towers), a meaningless ranking (no nDCG)"
        )
        info["export_error"] = str(err)
        meaningful = False
    model = CrossEncoder(str(target), device="cpu", max_length=max_length)

    def predict(queries: list[str], texts: list[str]) -> np.ndarray:
        scores = model.predict(
            list(zip(queries, texts, strict=True)), batch_size=batch_size, show_progress_bar=False
        )
        return np.asarray(scores, dtype=np.float32).reshape(-1)

    variant = _Variant(ANCHOR, predict, uses_towers=False, note=info["note"], ndcg_meaningful=meaningful)
    return variant, info


def _backbone_cross_encoder(model_dir: Path, target: Path) -> None:
    import copy

    from transformers import AutoModelForSequenceClassification

    from esci_reranker.model.io import load_checkpoint

    model, tokenizer = load_checkpoint(model_dir, device="cpu")
    config = copy.deepcopy(model.encoder.config)
    config.num_labels = 1
    classifier = AutoModelForSequenceClassification.from_config(config)
    classifier.base_model.load_state_dict(model.encoder.state_dict(), strict=False)
    classifier.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _build_variants(
    model_dir: Path,
    workdir: Path,
    batch_size: int,
    max_length: int | None,
    backends: Sequence[str],
    echo: Callable[[str], None],
) -> tuple[dict[str, _Variant], dict[str, dict[str, Any]], Reranker]:
    """Load every requested backend; those that cannot run get a ``skipped`` entry and a reason."""
    variants: dict[str, _Variant] = {}
    skipped: dict[str, dict[str, Any]] = {}
    load = {"device": "cpu", "batch_size": batch_size, "max_length": max_length}
    reference = Reranker.from_pretrained(model_dir, backend="torch", **load)  # type: ignore[arg-type]
    if TORCH_FP32 in backends:
        variants[TORCH_FP32] = _reranker_variant(TORCH_FP32, reference)
    if TORCH_BF16 in backends:
        ok, why = cpu_bf16_support()
        if ok:
            bf16 = Reranker.from_pretrained(model_dir, backend="torch", precision="bf16", **load)  # type: ignore[arg-type]
            variants[TORCH_BF16] = _reranker_variant(TORCH_BF16, bf16, note=f"bf16 autocast ({why})")
        else:
            skipped[TORCH_BF16] = {"status": "skipped", "reason": why}
    if TORCH_INT8 in backends:
        if int8_available():
            int8 = Reranker.from_pretrained(model_dir, backend="torch", precision="int8", **load)  # type: ignore[arg-type]
            vnni = "with" if _vnni() else "without"
            variants[TORCH_INT8] = _reranker_variant(
                TORCH_INT8, int8, note=f"dynamic int8 linears ({vnni} VNNI)"
            )
        else:
            skipped[TORCH_INT8] = {"status": "skipped", "reason": "no dynamic int8 linear in this torch"}
    # The stacker's trees are not in ONNX: of a stacked checkpoint, the ONNX rows time (and
    # score) its cross-encoder stage alone, and say so; the torch rows run the whole model.
    stage = CROSS_ENCODER_STAGE if reference.stacker is not None else WHOLE_MODEL
    for name, quantize in ((ONNX_FP32, None), (ONNX_INT8, "int8")):
        if name not in backends:
            continue
        try:
            from esci_reranker.model.onnx import export_onnx

            echo(f"exporting {name} ...")
            start = time.perf_counter()
            folder = export_onnx(model_dir, workdir / name, quantize=quantize, cross_encoder_only=True)
            seconds = time.perf_counter() - start
        except ImportError as err:
            skipped[name] = {"status": "skipped", "reason": str(err)}
            continue
        onnx_reranker = Reranker.from_pretrained(folder, backend="onnx", **load)  # type: ignore[arg-type]
        note = f"export {seconds:.1f}s" + (
            "; cross-encoder stage only (no stacker)" if stage != WHOLE_MODEL else ""
        )
        variants[name] = _reranker_variant(name, onnx_reranker, note=note, stage=stage)
    if ANCHOR in backends:
        anchor, info = anchor_variant(model_dir, workdir, reference.config.max_length, batch_size)
        if anchor is None:
            skipped[ANCHOR] = info
        else:
            variants[ANCHOR] = anchor
            skipped[ANCHOR] = info  # not skipped: its details, merged into its entry below
    return variants, skipped, reference


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def _ndcg(frame: pd.DataFrame, scores: np.ndarray) -> dict[str, float]:
    from esci_reranker.eval.ranking import ranking_metrics

    run = frame[["query_id", "product_id", "esci_label"]].assign(score=np.asarray(scores, np.float64))
    metrics = ranking_metrics(run, score_column="score")
    return {"ndcg": metrics["ndcg"], "ndcg@10": metrics["ndcg@10"]}


def run_backend_bench(
    model_dir: str | Path,
    out_json: str | Path | None,
    batch_size: int = 32,
    max_length: int | None = None,
    n_pairs: int = 512,
    repeats: int = 3,
    threads: int | None = None,
    backends: Sequence[str] = BACKENDS,
    test_queries: int | None = None,
    roofline_size: int = 2048,
    server_latency: ServerLatencyBench | None = None,
    echo: Callable[[str], None] | None = print,
    server_table: ServerTable | None = None,
) -> dict[str, Any]:
    """Benchmark every backend on one checkpoint; write the result to ``out_json`` and return it.

    Args:
        model_dir: a checkpoint folder (PyTorch weights; the ONNX and anchor exports are made in a
            temporary folder).
        out_json: where to write the JSON (None: do not write).
        batch_size, max_length: as in ``Reranker.from_pretrained`` (the anchor uses the same).
        n_pairs: pairs scored per timed round (whole candidate lists of random queries).
        repeats: timed rounds per backend, interleaved.
        threads: intra-op threads of every backend (default ``torch.get_num_threads()``).
        backends: a subset of ``BACKENDS``.
        test_queries: score only the first N holdout queries for nDCG (None: all 41).
        roofline_size: side of the fp32 matmul that measures the roofline.
        server_latency: the server-latency hook (``ServerLatencyBench``); None records it as not
            measured.
        echo: where progress lines and the final table go (None: silent).
        server_table: renders the measured ``server_latency`` block under the table (None: left out).

    Returns:
        The JSON-ready result: ``machine``, ``settings``, ``model``, ``roofline_fp32_gflops``,
        ``backends`` (per backend: ``pairs_per_second``, ``vs_anchor``, ``gflops``,
        ``roofline_share``, ``ndcg``, ...), ``int8_ndcg_loss`` and ``server_latency``.
    """
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"backends: unknown {unknown}; expected names from {list(BACKENDS)}.")
    for name, value in (("batch_size", batch_size), ("n_pairs", n_pairs), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name}={value}; expected a positive integer.")
    say = echo or (lambda _line: None)
    model_dir = Path(model_dir)
    previous_threads = torch.get_num_threads()
    threads = threads or previous_threads
    torch.set_num_threads(threads)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    try:
        with tempfile.TemporaryDirectory(prefix="esci-bench-") as tmp:
            variants, extra, reference = _build_variants(
                model_dir, Path(tmp), batch_size, max_length, backends, say
            )
            result = _measure(
                variants, extra, reference, model_dir, batch_size, n_pairs, repeats, threads,
                test_queries, roofline_size, say,
            )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)
    result["machine"]["load_average_before"] = load_before
    result["machine"]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if server_latency is not None:
        say("server latency ...")
        result["server_latency"] = dict(server_latency(model_dir))
    if out_json is not None:
        write_json(out_json, result)
    say(format_table(result, server_table))
    return result


def _measure(
    variants: dict[str, _Variant],
    extra: dict[str, dict[str, Any]],
    reference: Reranker,
    model_dir: Path,
    batch_size: int,
    n_pairs: int,
    repeats: int,
    threads: int,
    test_queries: int | None,
    roofline_size: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    config = reference.config
    sample = _load_sample(config)
    rows = candidate_lists(sample, n_pairs)
    queries = sample["query"].iloc[rows].tolist()
    texts = sample["product_text"].iloc[rows].tolist()
    work = _pairs_flops(reference, queries, texts)

    warm = min(len(queries), batch_size)
    for variant in variants.values():
        variant.predict(queries[:warm], texts[:warm])

    roofline = interleaved_rounds(
        variants,
        lambda v: v.predict(queries, texts),
        repeats,
        roofline_size,
        threads,
        say,
        lambda n, seconds: f"{len(queries) / seconds:.1f}/s",
    )

    test = sample[sample["split"] == TEST_SPLIT]
    if test_queries is not None:
        keep = sorted(test["query_id"].unique())[:test_queries]
        test = test[test["query_id"].isin(keep)]
    test_q, test_t = test["query"].tolist(), test["product_text"].tolist()
    test_scores = {name: v.predict(test_q, test_t) for name, v in variants.items()}
    say(f"scored {len(test)} test pairs ({test['query_id'].nunique()} queries) with each backend")

    base = test_scores.get(TORCH_FP32)
    entries: dict[str, dict[str, Any]] = {}
    for name, v in variants.items():
        best, median = min(v.seconds), statistics.median(v.seconds)
        flops = work["with_towers"] if v.uses_towers else work["pair_only"]
        gflops = flops / best / 1e9
        entry: dict[str, Any] = {
            "status": "ok",
            "pairs_per_second": len(queries) / best,
            "pairs_per_second_median": len(queries) / median,
            "seconds": v.seconds,
            "gflops": gflops,
            "roofline_share": gflops / roofline.peak,
            "note": v.note,
            "stage": v.stage,
        }
        if v.ndcg_meaningful:
            entry |= _ndcg(test, test_scores[name])
        else:
            entry |= {"ndcg": None, "ndcg@10": None}
        if base is not None and name != ANCHOR and v.stage == variants[TORCH_FP32].stage:
            diff = np.abs(test_scores[name].astype(np.float64) - base)
            entry["max_abs_score_diff_vs_torch_fp32"] = float(diff.max())
            entry["score_corr_vs_torch_fp32"] = _corr(test_scores[name], base)
        entries[name] = entry | extra.get(name, {})
    for name, info in extra.items():
        entries.setdefault(name, info)
    anchor_rate = entries.get(ANCHOR, {}).get("pairs_per_second")
    for entry in entries.values():
        if entry.get("status") == "ok":
            entry["vs_anchor"] = entry["pairs_per_second"] / anchor_rate if anchor_rate else None

    layers, hidden, intermediate = _encoder_shape(config)
    return {
        "model_dir": str(model_dir),
        "model": {
            "model_type": config.model_type,
            "backbone": config.backbone_name or config.backbone.get("model_type", ""),
            "layers": layers,
            "hidden": hidden,
            "intermediate": intermediate,
            "prior": config.prior,
            "max_length": config.max_length,
            "rank_score": config.rank_score,
        },
        "machine": machine_record(cpu_bf16_support(), vnni=_vnni()),
        "settings": {
            "threads": threads,
            "batch_size": batch_size,
            "n_pairs": len(queries),
            "repeats": repeats,
            "pairs_source": (
                f"bundled sample ({sample_path().name}): whole candidate lists of "
                f"{len(set(queries))} random queries (seed 0)"
            ),
            "mean_pair_tokens": work["mean_pair_tokens"],
            "max_pair_tokens": work["max_pair_tokens"],
            "test_pairs": len(test),
            "test_queries": int(test["query_id"].nunique()),
            "rate": "pairs_per_second uses each backend's fastest round (noise only slows rounds)",
        },
        "flops_per_pair": {
            "pair_only": work["pair_only"] / len(queries),
            "with_towers": work["with_towers"] / len(queries),
        },
        **roofline.record(),
        "backends": entries,
        "int8_ndcg_loss": _int8_loss(entries),
        "server_latency": {
            "status": "not measured",
            "reason": "run `esci-reranker bench --server` (server_latency=bench.server.ServerLatency()) "
            "for p50/p99 /rerank latency at concurrency 1 and 8, with and without dynamic batching",
        },
    }


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _vnni() -> bool:
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


def _int8_loss(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """fp32 nDCG minus int8 nDCG: ONNX int8 against both fp32 backends, torch int8 against torch
    (None where the two compute different stages: a stacked model's ONNX rows lack its trees)."""

    def loss(reference: str, int8: str) -> float | None:
        ref, low = entries.get(reference, {}), entries.get(int8, {})
        if ref.get("ndcg") is None or low.get("ndcg") is None or ref.get("stage") != low.get("stage"):
            return None
        return float(ref["ndcg"] - low["ndcg"])

    return {
        "vs_onnx_fp32": loss(ONNX_FP32, ONNX_INT8),
        "vs_torch_fp32": loss(TORCH_FP32, ONNX_INT8),
        "torch_int8_vs_torch_fp32": loss(TORCH_FP32, TORCH_INT8),
    }


def _versions() -> dict[str, str]:
    versions = {"esci_reranker": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for module in ("onnxruntime", "sentence_transformers", "transformers"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            continue
    return versions


def text_table(
    header: Sequence[str],
    entries: Mapping[str, Mapping[str, Any]],
    row: Callable[[str, Mapping[str, Any]], Sequence[str]],
    footer: Sequence[str],
) -> str:
    """A benchmark's entries as a fixed-width text table under ``header``: ``row(name, entry)`` for
    a measured entry, dashes and the reason for a skipped one; the last column is not padded and
    the ``footer`` lines follow."""
    rows = [
        row(name, e)
        if e.get("status") == "ok"
        else (name, *["-"] * (len(header) - 2), f"skipped: {e.get('reason', '')}")
        for name, e in entries.items()
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join([fmt.format(*header), *(fmt.format(*r) for r in rows), *footer])


def _backend_row(name: str, e: Mapping[str, Any]) -> tuple[str, ...]:
    return (
        name,
        f"{e['pairs_per_second']:.1f}",
        f"{e['vs_anchor']:.2f}" if e.get("vs_anchor") else "-",
        f"{e['gflops']:.1f}",
        f"{100 * e['roofline_share']:.1f}",
        f"{e['ndcg']:.4f}" if e.get("ndcg") is not None else "-",
        e.get("note", ""),
    )


def format_table(result: Mapping[str, Any], server_table: ServerTable | None = None) -> str:
    """The benchmark result as a fixed-width text table; a measured ``server_latency`` block
    follows it when ``server_table`` renders it."""
    header = ("backend", "pairs/s", "x anchor", "GFLOP/s", "% fp32 peak", "nDCG", "note")
    s = result["settings"]
    loss = result["int8_ndcg_loss"]
    footer = [
        f"fp32 roofline {result['roofline_fp32_gflops']:.1f} GFLOP/s ({s['threads']} threads); "
        f"{s['n_pairs']} pairs x {s['repeats']} rounds, batch {s['batch_size']}, "
        f"mean {s['mean_pair_tokens']:.1f} tokens/pair; nDCG on {s['test_pairs']} test pairs "
        f"({s['test_queries']} queries)",
    ]
    if loss["vs_onnx_fp32"] is not None:
        footer.append(f"onnx int8 nDCG loss vs onnx fp32: {loss['vs_onnx_fp32']:+.4f}")
    if loss.get("torch_int8_vs_torch_fp32") is not None:
        footer.append(f"torch int8 nDCG loss vs torch fp32: {loss['torch_int8_vs_torch_fp32']:+.4f}")
    server = result.get("server_latency", {})
    if server_table is not None and server.get("status") not in (None, "not measured"):
        footer += ["", server_table(server)]
    return text_table(header, result["backends"], _backend_row, footer)


def main(argv: list[str] | None = None) -> None:
    """``python -m esci_reranker.bench CHECKPOINT --out bench.json``: run and print the benchmark."""
    parser = argparse.ArgumentParser(prog="python -m esci_reranker.bench", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench_backends.json"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--n-pairs", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset")
    parser.add_argument("--test-queries", type=int, default=None)
    args = parser.parse_args(argv)
    run_backend_bench(
        args.model_dir,
        args.out,
        batch_size=args.batch_size,
        max_length=args.max_length,
        n_pairs=args.n_pairs,
        repeats=args.repeats,
        threads=args.threads,
        backends=[b.strip() for b in args.backends.split(",") if b.strip()],
        test_queries=args.test_queries,
    )
