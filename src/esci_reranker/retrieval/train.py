"""Fine-tuning the dense retriever (a sentence-transformers bi-encoder) on ESCI, chosen in CV.

Two losses of sentence-transformers are compared:

- ``mnrl``: ``MultipleNegativesRankingLoss`` on (query, E product, hard negative) triplets. The
  hard negative is an I or C product labelled for the same query (cycled through when a query has
  fewer of them than E products; a random product of another query when it has none); the other
  queries' products in the batch are the in-batch negatives. Batches never hold the same text
  twice (``BatchSamplers.NO_DUPLICATES``), so another E product of the same query is never
  treated as a negative.
- ``cosent``: ``CoSENTLoss`` on every labelled (query, product) pair with its ESCI gain as target.

Selection is by query-grouped k-fold CV over the train+val queries (``train.cv.query_folds``):
each fold's model is trained on the other folds' queries and measured by the Recall@k of the
fold's E products against the *whole train+val catalogue* (every product of a train or val row),
beside BM25, the zero-shot retriever and the fusions of BM25 with the fold's model. The test
split is never read. The final model is trained on all train+val queries with the CV's best loss
and saved in sentence-transformers' own format, with ``esci_retrieval.json`` beside it (the CV's
choice of fusion, read by ``CatalogueIndex.build``).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from esci_reranker.data.text import FIELD_COLUMNS, product_texts
from esci_reranker.fsutil import write_json
from esci_reranker.retrieval.bm25 import Bm25, Vocabulary
from esci_reranker.retrieval.config import RetrieverConfig, RetrieverLoss
from esci_reranker.retrieval.encoder import DenseEncoder, require_sentence_transformers, resolve_retriever
from esci_reranker.retrieval.fusion import Ranking, fuse

log = logging.getLogger(__name__)

#: Written beside a fine-tuned retriever: how it was chosen and the fusion CV picked for it.
RETRIEVAL_META: Final[str] = "esci_retrieval.json"


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def frame_product_texts(frame: pd.DataFrame, fields: Sequence[str]) -> pd.Series:
    """The retriever's product text per row: built from the ``product_*`` columns when present
    (as an index builds it from a catalogue), else the prepared ``product_text`` column."""
    if any(FIELD_COLUMNS[f] in frame.columns for f in fields):
        return product_texts(frame, fields)
    if "product_text" in frame.columns:
        return frame["product_text"].astype(str)
    raise ValueError(
        f"retriever data: no column for the text fields {list(fields)} and no 'product_text'; "
        "pass splits written by `esci-reranker prepare`."
    )


def catalogue_of(frame: pd.DataFrame, fields: Sequence[str]) -> pd.DataFrame:
    """The distinct products of ``frame``: ``product_id`` and ``text``, in first-seen order."""
    texts = frame_product_texts(frame, fields)
    cat = pd.DataFrame({"product_id": frame["product_id"].astype(str), "text": texts.to_numpy()})
    return cat.drop_duplicates("product_id").reset_index(drop=True)


def mnrl_examples(
    frame: pd.DataFrame, fields: Sequence[str], negative_labels: Sequence[str], seed: int
) -> dict[str, list[str]]:
    """(anchor, positive, negative) triplets: one per E row, hard negatives from the same query."""
    rng = np.random.default_rng(seed)
    texts = frame_product_texts(frame, fields).to_numpy()
    labels = frame["esci_label"].astype(str).to_numpy()
    queries = frame["query"].astype(str).to_numpy()
    qids = frame["query_id"].to_numpy()
    anchors: list[str] = []
    positives: list[str] = []
    negatives: list[str] = []
    for qid in pd.unique(qids):
        rows = np.flatnonzero(qids == qid)
        pos = rows[labels[rows] == "E"]
        neg = rows[np.isin(labels[rows], list(negative_labels))]
        if len(pos) == 0:
            continue
        if len(neg) == 0:  # no labelled hard negative: a random product of another query
            neg = rng.choice(np.flatnonzero(qids != qid), size=len(pos), replace=False)
        neg = rng.permutation(neg)
        for i, p in enumerate(rng.permutation(pos)):
            anchors.append(queries[p])
            positives.append(texts[p])
            negatives.append(texts[neg[i % len(neg)]])
    return {"anchor": anchors, "positive": positives, "negative": negatives}


def cosent_examples(frame: pd.DataFrame, fields: Sequence[str]) -> dict[str, list[Any]]:
    """(query, product, gain) for every labelled row."""
    from esci_reranker.labels import ESCI_GAINS

    return {
        "sentence1": frame["query"].astype(str).tolist(),
        "sentence2": frame_product_texts(frame, fields).tolist(),
        "score": frame["esci_label"].astype(str).map(ESCI_GAINS).astype(float).tolist(),
    }


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def fit_retriever(
    frame: pd.DataFrame, cfg: RetrieverConfig, loss_name: RetrieverLoss, save_to: Path | None = None
) -> DenseEncoder:
    """Fine-tune ``cfg.model.base`` on ``frame`` with ``loss_name``; save to ``save_to`` if given."""
    import torch
    from datasets import Dataset

    st = require_sentence_transformers()
    from sentence_transformers import losses
    from sentence_transformers.training_args import BatchSamplers

    from esci_reranker.hardware import bf16_native

    torch.manual_seed(cfg.seed)
    model = st.SentenceTransformer(str(resolve_retriever(cfg.model.base)), device="cpu")
    model.max_seq_length = cfg.model.max_seq_length
    fields = cfg.model.text_fields
    if loss_name == "mnrl":
        data = mnrl_examples(frame, fields, cfg.loss.hard_negative_labels, cfg.seed)
        loss = losses.MultipleNegativesRankingLoss(model, scale=cfg.loss.scale)
        sampler = BatchSamplers.NO_DUPLICATES
    elif loss_name == "cosent":
        data = cosent_examples(frame, fields)
        loss = losses.CoSENTLoss(model, scale=cfg.loss.scale)
        sampler = BatchSamplers.BATCH_SAMPLER
    else:
        raise ValueError(f"retriever loss {loss_name!r}: unknown; expected 'mnrl' or 'cosent'.")
    workdir = Path(tempfile.mkdtemp(prefix="esci-retriever-"))
    try:
        args = st.SentenceTransformerTrainingArguments(
            output_dir=str(workdir),
            num_train_epochs=cfg.optim.epochs,
            max_steps=cfg.optim.max_steps or -1,
            per_device_train_batch_size=cfg.optim.batch_size,
            learning_rate=cfg.optim.lr,
            warmup_ratio=cfg.optim.warmup_ratio,
            weight_decay=cfg.optim.weight_decay,
            seed=cfg.seed,
            data_seed=cfg.seed,
            batch_sampler=sampler,
            bf16=bf16_native(torch.device("cpu")),
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = st.SentenceTransformerTrainer(
            model=model, args=args, train_dataset=Dataset.from_dict(data), loss=loss
        )
        trainer.train()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    model.eval()
    if save_to is not None:
        save_to = Path(save_to)
        if save_to.exists():
            shutil.rmtree(save_to)
        model.save(str(save_to))
    return DenseEncoder(model, str(save_to) if save_to is not None else f"fine-tuned ({loss_name})")


# ---------------------------------------------------------------------------------------------
# evaluation: recall of the E products against a catalogue
# ---------------------------------------------------------------------------------------------


def relevant_sets(frame: pd.DataFrame, catalogue: pd.DataFrame) -> dict[int, np.ndarray]:
    """Per query id: the catalogue positions of its E products."""
    position = pd.Series(np.arange(len(catalogue)), index=catalogue["product_id"].to_numpy())
    exact = frame[frame["esci_label"].astype(str) == "E"]
    out: dict[int, np.ndarray] = {}
    for qid, group in exact.groupby("query_id"):
        out[int(qid)] = position.loc[group["product_id"].astype(str).to_numpy()].to_numpy()
    return out


def recall(ranked: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """``|relevant ∩ ranked[:k]| / |relevant|`` (0 when nothing is relevant)."""
    if len(relevant) == 0:
        return 0.0
    return float(np.isin(relevant, ranked[:k]).sum()) / len(relevant)


def ranked_positions(scores: np.ndarray, k: int, positive_only: bool = False) -> np.ndarray:
    """Catalogue positions of the ``k`` best scores, best first (ties: lower position first)."""
    candidates = np.flatnonzero(scores > 0) if positive_only else np.arange(len(scores))
    if len(candidates) > k:
        candidates = candidates[np.argpartition(-scores[candidates], k - 1)[:k]]
    return candidates[np.lexsort((candidates, -scores[candidates]))]


def bm25_scores_over(catalogue: pd.DataFrame, queries: Sequence[str]) -> np.ndarray:
    """(Q, P) BM25 scores of each query against the catalogue texts."""
    vocab = Vocabulary()
    flat, offsets = vocab.encode_many(catalogue["text"].tolist())
    docs = [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(catalogue))]
    index = Bm25.build(docs, np.arange(len(catalogue)), vocab)
    return np.stack([index.scores(q) for q in queries]) if queries else np.zeros((0, len(catalogue)))


def method_recalls(
    score_rows: Callable[[int], tuple[np.ndarray, bool]],
    query_ids: Sequence[int],
    relevant: dict[int, np.ndarray],
    ks: Sequence[int],
) -> dict[str, float]:
    """Mean Recall@k over queries of the rankings ``score_rows(i)`` gives (scores, positive_only)."""
    out = {f"recall@{k}": [] for k in ks}
    for i, qid in enumerate(query_ids):
        scores, positive_only = score_rows(i)
        ranked = ranked_positions(scores, max(ks), positive_only)
        for k in ks:
            out[f"recall@{k}"].append(recall(ranked, relevant.get(qid, np.zeros(0, int)), k))
    return {name: float(np.mean(values)) if values else 0.0 for name, values in out.items()}


def fused_positions(
    bm25: np.ndarray, dense: np.ndarray, depth: int, method: str, w_dense: float, rrf_k: int
) -> np.ndarray:
    """Catalogue positions of the fusion of BM25's and the dense model's top ``depth`` lists."""
    b = ranked_positions(bm25, depth, positive_only=True)
    d = ranked_positions(dense, depth)
    weights = (1.0 - w_dense, w_dense) if method == "zscore" else None
    fused = fuse(
        [Ranking(b.tolist(), bm25[b].tolist()), Ranking(d.tolist(), dense[d].tolist())],
        method=method,  # type: ignore[arg-type]
        weights=weights,
        rrf_k=rrf_k,
    )
    return np.asarray(fused.keys[:depth], dtype=np.int64)


def fusion_candidates(cfg: RetrieverConfig) -> list[dict[str, Any]]:
    """The fusion settings CV compares: RRF, and z-scores at each dense weight."""
    out: list[dict[str, Any]] = [{"method": "rrf", "rrf_k": cfg.cv.rrf_k, "dense_weight": 0.5}]
    out += [{"method": "zscore", "rrf_k": cfg.cv.rrf_k, "dense_weight": w} for w in cfg.cv.zscore_weights]
    return out


def fusion_name(setting: dict[str, Any]) -> str:
    if setting["method"] == "rrf":
        return f"rrf(k={setting['rrf_k']})"
    return f"zscore(w_dense={setting['dense_weight']:g})"


def fusion_recalls(
    bm25: np.ndarray,
    dense: np.ndarray,
    query_ids: Sequence[int],
    relevant: dict[int, np.ndarray],
    ks: Sequence[int],
    setting: dict[str, Any],
) -> dict[str, float]:
    """Mean Recall@k of a fusion, the depth of each input list being k itself."""
    out: dict[str, float] = {}
    for k in ks:
        values = [
            recall(
                fused_positions(
                    bm25[i], dense[i], k, setting["method"], setting["dense_weight"], setting["rrf_k"]
                ),
                relevant.get(qid, np.zeros(0, int)),
                k,
            )
            for i, qid in enumerate(query_ids)
        ]
        out[f"recall@{k}"] = float(np.mean(values)) if values else 0.0
    return out


# ---------------------------------------------------------------------------------------------
# cross-validation and the final model
# ---------------------------------------------------------------------------------------------


@dataclass
class RetrieverResult:
    """What ``train_retriever`` did: the CV table (or None), the loss and fusion chosen, the model path."""

    model_path: Path
    loss: RetrieverLoss
    fusion: dict[str, Any]
    cv: dict[str, Any] | None
    seconds: float


def _mean_table(per_fold: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    names = per_fold[0].keys()
    return {
        name: {
            metric: float(np.mean([fold[name][metric] for fold in per_fold])) for metric in per_fold[0][name]
        }
        | {
            f"{metric}_std": float(np.std([fold[name][metric] for fold in per_fold], ddof=1))
            for metric in per_fold[0][name]
            if len(per_fold) > 1
        }
        for name in names
    }


def cross_validate_retriever(
    cfg: RetrieverConfig, frame: pd.DataFrame, log_fn: Callable[[str], None] = print
) -> dict[str, Any]:
    """k-fold CV over ``frame``'s queries: BM25, zero-shot, each loss, and fusions with each loss.

    Returns ``{"per_fold": [...], "mean": {method: {recall@k: ...}}, "catalogue_products": P,
    "queries": Q, "seconds": {...}}``; nothing is written.
    """
    from esci_reranker.train.cv import query_folds

    ks = tuple(sorted(set(cfg.cv.recall_at) | {cfg.cv.candidates}))
    fields = cfg.model.text_fields
    catalogue = catalogue_of(frame, fields)
    relevant = relevant_sets(frame, catalogue)
    queries = frame.drop_duplicates("query_id")[["query_id", "query"]]
    qtext = dict(zip(queries["query_id"].astype(int), queries["query"].astype(str), strict=True))
    folds = query_folds(frame["query_id"].to_numpy(), cfg.cv.folds, seed=cfg.cv.fold_seed)
    log_fn(
        f"retriever CV: {len(qtext)} train+val queries in {cfg.cv.folds} folds, catalogue of "
        f"{len(catalogue)} products (every train+val product)"
    )
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    zero = DenseEncoder.load(cfg.model.base, max_seq_length=cfg.model.max_seq_length)
    zero_products = zero.encode(catalogue["text"].tolist())  # (P, D)
    seconds["zero_shot_encode"] = time.perf_counter() - t
    per_fold: list[dict[str, dict[str, float]]] = []
    for f, fold in enumerate(folds):
        qids = sorted(fold)
        texts = [qtext[q] for q in qids]
        bm25 = bm25_scores_over(catalogue, texts)  # (Q, P)
        zero_scores = zero.encode(texts) @ zero_products.T  # (Q, P)
        table = {
            "bm25": method_recalls(lambda i, s=bm25: (s[i], True), qids, relevant, ks),
            "zero-shot dense": method_recalls(lambda i, s=zero_scores: (s[i], False), qids, relevant, ks),
        }
        train_part = frame[~frame["query_id"].isin(fold)]
        for loss_name in cfg.cv.losses:
            t = time.perf_counter()
            encoder = fit_retriever(train_part, cfg, loss_name)
            seconds[f"fold{f}_{loss_name}_train"] = time.perf_counter() - t
            dense = encoder.encode(texts) @ encoder.encode(catalogue["text"].tolist()).T
            table[f"fine-tuned dense ({loss_name})"] = method_recalls(
                lambda i, s=dense: (s[i], False), qids, relevant, ks
            )
            for setting in fusion_candidates(cfg):
                table[f"hybrid {loss_name} + bm25, {fusion_name(setting)}"] = fusion_recalls(
                    bm25, dense, qids, relevant, ks, setting
                )
        for setting in fusion_candidates(cfg):
            table[f"hybrid zero-shot + bm25, {fusion_name(setting)}"] = fusion_recalls(
                bm25, zero_scores, qids, relevant, ks, setting
            )
        per_fold.append(table)
        best = max(cfg.cv.losses, key=lambda n: table[f"fine-tuned dense ({n})"][f"recall@{ks[0]}"])
        log_fn(
            f"  fold {f}: {len(qids)} queries; R@{cfg.cv.candidates} bm25 "
            f"{table['bm25'][f'recall@{cfg.cv.candidates}']:.3f}, zero-shot "
            f"{table['zero-shot dense'][f'recall@{cfg.cv.candidates}']:.3f}, "
            + ", ".join(
                f"{n} {table[f'fine-tuned dense ({n})'][f'recall@{cfg.cv.candidates}']:.3f}"
                for n in cfg.cv.losses
            )
            + f" (best here: {best})"
        )
    return {
        "folds": cfg.cv.folds,
        "queries": len(qtext),
        "catalogue_products": len(catalogue),
        "per_fold": per_fold,
        "mean": _mean_table(per_fold),
        "seconds": seconds,
    }


def choose(cfg: RetrieverConfig, cv: dict[str, Any]) -> tuple[RetrieverLoss, dict[str, Any]]:
    """The loss with the best mean Recall@N (N = ``cv.candidates``), and the best fusion with it."""
    metric = f"recall@{cfg.cv.candidates}"
    mean = cv["mean"]
    loss: RetrieverLoss = max(cfg.cv.losses, key=lambda n: mean[f"fine-tuned dense ({n})"][metric])
    fusion = max(
        fusion_candidates(cfg), key=lambda s: mean[f"hybrid {loss} + bm25, {fusion_name(s)}"][metric]
    )
    return loss, fusion


def train_retriever(cfg: RetrieverConfig, log_fn: Callable[[str], None] = print) -> RetrieverResult:
    """CV (when ``cfg.cv_enabled``), then the final model on all train+val queries.

    Writes ``output.dir/model/`` (a sentence-transformers folder with ``esci_retrieval.json``)
    and ``output.dir/cv.json``.
    """
    start = time.perf_counter()
    from esci_reranker.train.loop import read_train_val

    frame = read_train_val(cfg.data.dir)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    cv: dict[str, Any] | None = None
    loss: RetrieverLoss = cfg.loss.name
    fusion: dict[str, Any] = {"method": "rrf", "rrf_k": cfg.cv.rrf_k, "dense_weight": 0.5}
    if cfg.cv_enabled:
        cv = cross_validate_retriever(cfg, frame, log_fn)
        loss, fusion = choose(cfg, cv)
        cv["chosen"] = {"loss": loss, "fusion": fusion}
        write_json(out / "cv.json", {"config": cfg.model_dump(mode="json"), **cv}, nan_as_null=True)
        metric = f"recall@{cfg.cv.candidates}"
        tuned, zero = cv["mean"][f"fine-tuned dense ({loss})"][metric], cv["mean"]["zero-shot dense"][metric]
        log_fn(
            f"CV chose loss {loss} (mean {metric} {tuned:.4f} vs zero-shot {zero:.4f}) and fusion "
            f"{fusion_name(fusion)}"
            + ("" if tuned > zero else "; the fine-tuned retriever does NOT beat the zero-shot one here")
        )
    t = time.perf_counter()
    log_fn(f"training the final retriever ({loss}) on all {frame['query_id'].nunique()} train+val queries")
    model_dir = out / "model"
    fit_retriever(frame, cfg, loss, save_to=model_dir)
    meta = {
        "base": cfg.model.base,
        "loss": loss,
        "text_fields": list(cfg.model.text_fields),
        "max_seq_length": cfg.model.max_seq_length,
        "fusion": fusion,
        "train_queries": int(frame["query_id"].nunique()),
        "train_seconds": round(time.perf_counter() - t, 1),
        "cv_mean": cv["mean"] if cv is not None else None,
    }
    (model_dir / RETRIEVAL_META).write_text(json.dumps(meta, indent=2) + "\n")
    return RetrieverResult(model_dir, loss, fusion, cv, time.perf_counter() - start)
