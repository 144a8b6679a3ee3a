"""The teacher's outputs on the distillation pairs: what a student learns from.

The teacher is any checkpoint ``Reranker.from_pretrained`` loads; the default is the stacked
model (a cross-encoder with LightGBM trees and decision rules over its outputs and hand-made
features). Per pair (``TEACHER_COLUMNS``):

- ``t_score``: the score the teacher ranks by (the stacker's, else the model's ranking score);
- ``t_prob_E`` .. ``t_prob_I``: its class probabilities **after its decision rules**,
  ``softmax(log p + offsets)`` with the Task 2 offsets of ``stack.rules.DecisionRules`` (zero
  without a stacker), so that their argmax is the teacher's class (``t_class``);
- ``t_sub``: its substitute probability, and ``t_is_sub`` its Task 3 decision (its threshold).

**Lists.** A stacked teacher's features read each pair's whole candidate list (BM25 within the
list, rank, z-score and gap to the best), so scoring goes through ``Reranker.finish_lists``
with explicit lists, never pair by pair: labelled pairs are scored in their query's labelled list,
as in the teacher's own training; unlabelled pairs in lists made of the query's labelled
candidates plus ``list_size`` unlabelled ones (only the unlabelled rows are kept), so every
list looks like the lists the trees were fitted on. The labelled candidates stand in each of
those lists because the unlabelled rows' list features (BM25's term statistics, rank, z-score
and gap, list size, another brand named) are defined over the whole list; their own outputs
there are not used. A synthetic query (``distill.data.SYNTHETIC``) has no labelled candidates:
its pairs, the top of a search for it, are one list, as a search's results are scored. So the
cross-encoder, each pair's own features and the trees run once per pair; only the list-relative
features are computed per list entry (``stack.features.CandidateLists``). Pairs are scored a
chunk of whole queries at a time (``CHUNK_PAIRS``), so memory does not grow with the number of
pairs.

**Cache.** The outputs are written to ``teacher_outputs.parquet`` in the output folder with a
key (a hash of the teacher's files, the pairs and the scoring settings) in
``teacher_outputs.json``; a run with the same key reads them instead of scoring again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd

from esci_reranker.distill.config import TeacherSection
from esci_reranker.distill.data import LABELLED, PAIR_KEY, SYNTHETIC
from esci_reranker.labels import ESCI_LABELS
from esci_reranker.progress import progress_bar

if TYPE_CHECKING:
    from esci_reranker.reranker import Reranker
    from esci_reranker.stack.stacker import Stacker

PROB_COLUMNS: Final[tuple[str, ...]] = tuple(f"t_prob_{label}" for label in ESCI_LABELS)
TEACHER_COLUMNS: Final[tuple[str, ...]] = ("t_score", *PROB_COLUMNS, "t_sub", "t_is_sub", "t_class")
CACHE_STEM: Final[str] = "teacher_outputs"
CACHE_NAME: Final[str] = f"{CACHE_STEM}.parquet"
CACHE_META_NAME: Final[str] = f"{CACHE_STEM}.json"
#: Bumped when the meaning of the cached columns changes, so old caches are not reused.
CACHE_VERSION: Final[int] = 1


@dataclass(frozen=True)
class TeacherOutputs:
    """The teacher's outputs aligned with the pairs, and what the teacher is.

    Attributes:
        frame: ``PAIR_KEY`` and ``TEACHER_COLUMNS``, one row per pair in the pairs' order.
        info: the teacher's path, model type, whether it is stacked and its decision rules.
        cached: True when read from the output folder instead of scored.
    """

    frame: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    @property
    def has_classes(self) -> bool:
        """Whether the teacher gives class probabilities (not a single-task model)."""
        return bool(self.frame[list(PROB_COLUMNS)].notna().all().all()) if len(self.frame) else False


def rule_probs(probs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``softmax(log p + offsets)`` row-wise: probabilities whose argmax is the rules' class. (N, 4)."""
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)) + np.asarray(offsets)[None, :]
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def teacher_info(reranker: Reranker, name: str) -> dict[str, Any]:
    """What the teacher is: path, family, stacked or not, its decision rules."""
    stacker = reranker.stacker
    offsets = list(stacker.rules.class_offsets) if stacker is not None else [0.0] * len(ESCI_LABELS)
    return {
        "teacher": name,
        "model_type": reranker.config.model_type,
        "stacked": stacker is not None,
        "rank_score": "stacker" if stacker is not None else reranker.config.rank_score,
        "class_offsets": dict(zip(ESCI_LABELS, map(float, offsets), strict=True)),
        "substitute_threshold": float(reranker.substitute_threshold),
        "text_fields": list(reranker.config.text_fields),
        "long_field_chars": reranker.config.long_field_chars,
    }


def list_layout(pairs: pd.DataFrame, list_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidate lists a list-level teacher scores (see the module docstring).

    Returns ``rows`` (indices into ``pairs``, a labelled pair may appear in several lists),
    ``groups`` (the list id of each entry of ``rows``) and ``keep`` (for each pair, the position
    in ``rows`` whose output is its own).
    """
    if list_size < 1:
        raise ValueError(f"teacher.list_size={list_size}; expected >= 1.")
    labelled = (pairs["source"] == LABELLED).to_numpy() if "source" in pairs else np.ones(len(pairs), bool)
    synthetic = (pairs["source"] == SYNTHETIC).to_numpy() if "source" in pairs else np.zeros(len(pairs), bool)
    rows: list[np.ndarray] = []
    groups: list[np.ndarray] = []
    keep = np.full(len(pairs), -1, dtype=np.int64)
    size = 0
    for members in pairs.groupby("query_id", sort=False).indices.values():
        own, extra = members[labelled[members]], members[~labelled[members]]
        # the labelled list itself, as in the teacher's training; then the unlabelled pairs in
        # chunks, each beside the labelled candidates, of which only the chunk is kept
        chunks = [np.zeros(0, dtype=np.int64)] if len(own) else []
        if synthetic[members].all():  # a synthetic query's search results: one list
            chunks += [extra]
        else:
            chunks += [extra[i : i + list_size] for i in range(0, len(extra), list_size)]
        for chunk in chunks:
            block = np.concatenate([own, chunk])
            if len(chunk):  # an unlabelled chunk: its rows follow the labelled ones
                keep[chunk] = size + len(own) + np.arange(len(chunk))
            else:  # the labelled list: every row is its own
                keep[own] = size + np.arange(len(own))
            rows.append(block)
            groups.append(np.full(len(block), len(groups)))
            size += len(block)
    if (keep < 0).any():
        raise RuntimeError("list_layout: a pair was left out of every list (this is a bug).")
    return np.concatenate(rows), np.concatenate(groups), keep


#: Pairs ``score_pairs`` scores at a time, whole queries (a larger query is a chunk of its own):
#: their token ids, list entries and features are all it holds besides the outputs, so memory
#: stays flat however many pairs there are. Measured at 1 % of the US locale (53,769 pairs):
#: peak RSS 1.7 GiB with 10,000, 1.9 with 20,000, 2.5 with all in one chunk, the same CPU time.
CHUNK_PAIRS: Final[int] = 10_000


def query_chunks(query_ids: pd.Series, chunk_pairs: int) -> Iterator[np.ndarray]:
    """Positions of whole queries, about ``chunk_pairs`` pairs a chunk, each chunk ascending.

    Queries are taken in order of first appearance; one larger than ``chunk_pairs`` is a chunk
    of its own.
    """
    if chunk_pairs < 1:
        raise ValueError(f"chunk_pairs={chunk_pairs}; expected a positive integer.")
    chunk: list[np.ndarray] = []
    size = seen = 0
    for members in query_ids.groupby(query_ids.to_numpy(), sort=False).indices.values():
        if chunk and size + len(members) > chunk_pairs:
            yield np.sort(np.concatenate(chunk))
            chunk, size = [], 0
        chunk.append(members)
        size += len(members)
        seen += len(members)
    if chunk:
        yield np.sort(np.concatenate(chunk))
    if seen != len(query_ids):
        raise ValueError(
            f"query_chunks: {len(query_ids) - seen} pairs have no query_id; every pair needs one."
        )


def score_pairs(
    reranker: Reranker,
    pairs: pd.DataFrame,
    list_size: int,
    progress: bool = False,
    chunk_pairs: int = CHUNK_PAIRS,
) -> pd.DataFrame:
    """The teacher's outputs on every pair (``TEACHER_COLUMNS``), in the pairs' order.

    ``pairs`` needs ``query_id``, ``query``, ``product_id``, the ``product_*`` columns (or
    ``product_text``) and ``source`` (``labelled``/``unlabelled``; all labelled when absent).
    Scored ``chunk_pairs`` pairs (whole queries) at a time; the cross-encoder forms its
    length-sorted batches within a chunk, so another ``chunk_pairs`` can move its outputs in
    the last float bits (padding changes the matrix shapes), and nothing else changes (at 1 %
    of the US locale the outputs were the same to the bit with 10,000 and with all in one).
    """
    from esci_reranker.stack.features import CandidateLists, frame_fields
    from esci_reranker.train.texts import frame_texts

    n = len(pairs)
    scores = np.zeros(n, dtype=np.float32)
    esci_probs = np.zeros((n, len(ESCI_LABELS)), dtype=np.float32)
    sub = np.zeros(n, dtype=np.float32)
    is_sub = np.zeros(n, dtype=bool)
    chunks = list(query_chunks(pairs["query_id"], chunk_pairs))
    for index in progress_bar(chunks, desc="teacher", unit="chunk", disable=not progress, leave=False):
        part = pairs.iloc[index].reset_index(drop=True)
        queries = part["query"].astype(str).tolist()
        texts = frame_texts(part, reranker.config)
        encoded = reranker.pair_encoder.encode(queries, texts)
        out = reranker.run_encoded(encoded, progress=progress)  # the cross-encoder: once per pair
        truncated = np.asarray(encoded.truncated, dtype=bool)
        if reranker.stacker is None:
            preds = reranker.to_predictions(out, truncated)
        else:
            rows, groups, keep = list_layout(part, list_size)
            # each pair's fields once, read per list entry through `rows` (a labelled pair stands
            # in its own list and beside every unlabelled chunk of its query)
            preds = reranker.finish_lists(
                out, truncated, queries, frame_fields(part), CandidateLists(rows, groups, keep)
            )
        scores[index] = preds.scores
        esci_probs[index] = preds.esci_probs
        sub[index] = preds.substitute_probs
        is_sub[index] = preds.is_substitute
    offsets = (
        np.asarray(reranker.stacker.rules.class_offsets)
        if reranker.stacker is not None
        else np.zeros(len(ESCI_LABELS))
    )
    probs = rule_probs(esci_probs, offsets)
    frame = pairs[list(PAIR_KEY)].reset_index(drop=True)
    frame["t_score"] = scores.astype(np.float64)
    for i, name in enumerate(PROB_COLUMNS):
        frame[name] = probs[:, i]
    frame["t_sub"] = sub.astype(np.float64)
    frame["t_is_sub"] = is_sub
    has_classes = np.isfinite(probs).all(axis=1)
    frame["t_class"] = np.where(has_classes, np.asarray(ESCI_LABELS)[np.nan_to_num(probs).argmax(axis=1)], "")
    return frame


def _hash_files(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def cache_key(teacher_folder: Path, pairs: pd.DataFrame, cfg: TeacherSection) -> str:
    """A hash of the teacher's files, the pairs (ids, query, product columns) and the settings."""
    columns = [
        "query_id",
        "query",
        "product_id",
        *sorted(c for c in pairs.columns if c.startswith("product_")),
    ]
    if "source" in pairs.columns:
        columns.append("source")
    digest = hashlib.sha256()
    digest.update(_hash_files(teacher_folder).encode())
    digest.update(pd.util.hash_pandas_object(pairs[columns].astype(str), index=False).to_numpy().tobytes())
    settings = {"version": CACHE_VERSION, "list_size": cfg.list_size, "precision": cfg.precision}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


#: ``teacher_outputs``' default for ``stacker``: the checkpoint's own (when it has one).
CHECKPOINT_STACKER: Final[str] = "checkpoint"


def teacher_outputs(
    teacher: str | Path,
    pairs: pd.DataFrame,
    cfg: TeacherSection,
    out_dir: str | Path,
    progress: bool = False,
    log: Callable[[str], None] = print,
    *,
    stacker: Stacker | str | None = CHECKPOINT_STACKER,
    cache_stem: str = CACHE_STEM,
    key_extra: str = "",
) -> TeacherOutputs:
    """The teacher's outputs on ``pairs``: read from ``out_dir``'s cache when its key matches,
    else scored (grouped per candidate list) and cached there.

    Args:
        stacker: the trees over the cross-encoder: the checkpoint's own by default, else this
            one (None = the cross-encoder's own heads), e.g. a CV fold's stacker.
        cache_stem: the cache's file names (``<stem>.parquet``, ``<stem>.json``) in ``out_dir``.
        key_extra: what else identifies the teacher beyond its files (e.g. what fixed a given
            ``stacker``), mixed into the cache key.

    Raises:
        CheckpointError: the teacher does not load.
    """
    from esci_reranker.fsutil import write_json
    from esci_reranker.hardware import resolve_precision
    from esci_reranker.reranker import Reranker, resolve_checkpoint, select_device

    folder = resolve_checkpoint(teacher)
    out = Path(out_dir)
    key = cache_key(folder, pairs, cfg)
    if key_extra:
        key = hashlib.sha256(f"{key}|{key_extra}".encode()).hexdigest()
    meta_path, cache_path = out / f"{cache_stem}.json", out / f"{cache_stem}.parquet"
    if meta_path.is_file() and cache_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            cached = pd.read_parquet(cache_path)
            aligned = pairs[list(PAIR_KEY)].merge(
                cached, on=list(PAIR_KEY), how="left", validate="one_to_one"
            )
            if len(aligned) == len(pairs) and aligned["t_score"].notna().all():
                log(f"teacher outputs: {len(aligned)} pairs read from {cache_path} (same teacher and pairs)")
                return TeacherOutputs(aligned, meta.get("info", {}), cached=True)
    device = select_device(cfg.device)
    reranker = Reranker.from_pretrained(
        folder,
        device=cfg.device,
        batch_size=cfg.batch_size,
        precision=resolve_precision(cfg.precision, device),
        stacked=stacker == CHECKPOINT_STACKER,
    )
    if stacker != CHECKPOINT_STACKER:
        reranker.stacker = stacker  # type: ignore[assignment]
    info = teacher_info(reranker, str(teacher))
    log(
        f"teacher outputs: scoring {len(pairs)} pairs with {teacher} "
        f"({'stacked' if info['stacked'] else info['model_type']}, {reranker.precision})"
    )
    frame = score_pairs(reranker, pairs, cfg.list_size, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(cache_path, index=False)
    write_json(meta_path, {"key": key, "info": info, "pairs": len(frame)})
    return TeacherOutputs(frame, info, cached=False)
