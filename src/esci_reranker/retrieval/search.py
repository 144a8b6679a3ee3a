"""Search: retrieve the top-N products of a catalogue index, rerank them, return the top k.

``Searcher(index, reranker)`` is the Python API; the CLI's ``search`` and the service's
``POST /search`` use the same two steps (``CatalogueIndex.retrieve`` and ``rank_hits``), the
service scoring through its own cache and batcher instead of calling the reranker directly.

>>> searcher = Searcher.from_paths("runs/default/index", model="runs/default/model")  # doctest: +SKIP
>>> searcher.search("wireless earbuds", top_k=5).hits[0]  # doctest: +SKIP
SearchHit(rank=1, product_id='B0...', title='...', score=0.91, esci_class='E', ...)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from esci_reranker.retrieval.index import CatalogueIndex, Retrieved

if TYPE_CHECKING:
    from esci_reranker.reranker import Predictions, Reranker

log = logging.getLogger(__name__)

#: Candidates retrieved per query unless told otherwise (then reranked).
DEFAULT_CANDIDATES: Final[int] = 100
DEFAULT_TOP_K: Final[int] = 10
#: Task 3 decision: a product is flagged a substitute when its probability is at least this
#: (the same threshold as evaluation's ``eval.classification.DEFAULT_THRESHOLD``).
SUBSTITUTE_THRESHOLD: Final[float] = 0.5


@dataclass(frozen=True)
class SearchHit:
    """One search result. Without reranking (or with a single-task model) the class fields are None.

    ``score`` is the reranker's score when reranked, else the retrieval (fusion) score;
    ``retrieval_score`` is always the fusion score; ``esci_probs`` are the four class
    probabilities in E, S, C, I order (what ``esci_class`` was decided from); ``sources`` names
    the retrievers that found it.
    """

    rank: int
    product_id: str
    title: str
    brand: str
    color: str
    score: float
    retrieval_score: float
    esci_class: str | None
    substitute_prob: float | None
    is_substitute: bool | None
    sources: tuple[str, ...]
    bm25_rank: int | None
    dense_rank: int | None
    esci_probs: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class SearchResults:
    """The hits, best first, and how long each step took (milliseconds)."""

    query: str
    hits: list[SearchHit]
    reranked: bool
    num_candidates: int
    timings_ms: dict[str, float] = field(default_factory=dict)


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def rank_hits(
    retrieved: Sequence[Retrieved],
    top_k: int,
    predictions: Predictions | None = None,
    multi_task: bool = True,
    threshold: float = SUBSTITUTE_THRESHOLD,
) -> list[SearchHit]:
    """The top ``top_k`` of ``retrieved``: in retrieval order, or by the reranker's ``predictions``
    (in ``retrieved`` order; ties keep the retrieval order) with class, class probabilities and
    substitute flag (the predictions' ``is_substitute`` decision, or ``substitute_prob >= threshold``).

    ``predictions`` must be of the whole retrieved list (a stacked model's list features read it
    whole), never of the top ``top_k`` alone."""
    if predictions is not None and len(predictions) != len(retrieved):
        raise ValueError(f"rank_hits: {len(predictions)} predictions for {len(retrieved)} candidates.")
    if predictions is None:
        order = np.arange(len(retrieved))
    else:
        order = np.argsort(-np.asarray(predictions.scores, dtype=np.float64), kind="stable")
        # The checkpoint's own Task 3 decision when the predictions carry one, else the threshold.
        decisions = getattr(predictions, "is_substitute", None)
        if decisions is None:
            decisions = np.asarray(predictions.substitute_probs) >= threshold
    hits = []
    for rank, i in enumerate(order[:top_k], start=1):
        item = retrieved[i]
        esci_class = sub = flag = probs = None
        score = item.score
        if predictions is not None:
            score = float(predictions.scores[i])
            if multi_task:
                esci_class = str(predictions.esci_classes[i])
                probs = tuple(float(p) for p in predictions.esci_probs[i])
                sub = _finite(predictions.substitute_probs[i])
                flag = bool(decisions[i]) if sub is not None else None
        hits.append(
            SearchHit(
                rank=rank,
                product_id=item.product_id,
                title=item.fields.get("title", ""),
                brand=item.fields.get("brand", ""),
                color=item.fields.get("color", ""),
                score=score,
                retrieval_score=item.score,
                esci_class=esci_class,
                substitute_prob=sub,
                is_substitute=flag,
                sources=item.sources,
                bm25_rank=item.bm25_rank,
                dense_rank=item.dense_rank,
                esci_probs=probs,  # type: ignore[arg-type]
            )
        )
    return hits


def check_reranker_fields(index: CatalogueIndex, text_fields: Sequence[str], model: str) -> None:
    """Raise ValueError when the reranker reads product fields the index does not store."""
    missing = [f for f in text_fields if f not in index.stored_fields]
    if missing:
        raise ValueError(
            f"the reranker {model} reads the product field(s) {missing}, which the index at "
            f"{index.folder} does not store (it stores {list(index.stored_fields)}); rebuild the index "
            f"with `esci-reranker index ... --store-fields {','.join(dict.fromkeys([*index.stored_fields, *missing]))}`."
        )


def unstored_feature_fields(index: CatalogueIndex, reranker: Reranker) -> list[str]:
    """The product fields a stacked ``reranker``'s features read that ``index`` does not store
    (empty for a model without a stacker). Search then scores products without those fields and
    may label them differently from ``rerank`` given the whole product: rebuild the index with
    ``--store-fields`` naming them."""
    if reranker.stacker is None:
        return []
    from esci_reranker.stack.features import PRODUCT_FIELDS

    return [f for f in PRODUCT_FIELDS if f not in index.stored_fields]


class Searcher:
    """Retrieve from a ``CatalogueIndex`` and rerank with a ``Reranker`` (None: retrieval only)."""

    def __init__(self, index: CatalogueIndex, reranker: Reranker | None = None) -> None:
        if reranker is not None:
            check_reranker_fields(index, reranker.config.text_fields, reranker.name)
            if missing := unstored_feature_fields(index, reranker):
                log.warning(
                    "the index at %s does not store %s, which %s's stacker reads: search labels may "
                    "differ from rerank's on whole products (rebuild with --store-fields)",
                    index.folder,
                    ",".join(missing),
                    reranker.name,
                )
        self.index = index
        self.reranker = reranker

    @classmethod
    def from_paths(
        cls,
        index: str | Path,
        model: str | Path | None = None,
        retriever: str | Path | None = None,
        device: str | None = None,
        **reranker_kwargs: Any,
    ) -> Searcher:
        """Open the index at ``index`` and load the reranker at ``model`` (None: retrieval only).

        ``retriever`` overrides the retriever the index's manifest names; ``reranker_kwargs``
        go to ``Reranker.from_pretrained`` (``precision``, ``batch_size``, ...).
        """
        opened = CatalogueIndex.open(index, retriever=retriever)
        reranker = None
        if model is not None:
            from esci_reranker.reranker import Reranker

            reranker = Reranker.from_pretrained(model, device=device, **reranker_kwargs)
        return cls(opened, reranker)

    def search(
        self,
        query: str,
        top_k: int = DEFAULT_TOP_K,
        candidates: int = DEFAULT_CANDIDATES,
        rerank: bool = True,
        mode: str = "hybrid",
    ) -> SearchResults:
        """Retrieve ``candidates`` products for ``query`` (``mode``: hybrid, bm25, dense), rerank them
        (when ``rerank`` and a reranker is loaded) and return the best ``top_k``.

        Raises:
            ValueError: empty query, ``top_k`` or ``candidates`` < 1, ``top_k > candidates``.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k={top_k!r}; expected a positive integer.")
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < top_k:
            raise ValueError(f"candidates={candidates!r}; expected an integer >= top_k ({top_k}).")
        start = time.perf_counter()
        retrieved = self.index.retrieve(query, candidates, mode=mode)
        timings = {"retrieve": (time.perf_counter() - start) * 1000.0}
        predictions = None
        reranker = self.reranker if rerank else None
        if reranker is not None and retrieved:
            t = time.perf_counter()
            predictions = reranker.predict([(query, r.fields) for r in retrieved])
            timings["rerank"] = (time.perf_counter() - t) * 1000.0
        multi = bool(reranker.config.multi_task) if reranker is not None else False
        hits = rank_hits(retrieved, top_k, predictions, multi)
        timings["total"] = (time.perf_counter() - start) * 1000.0
        return SearchResults(query, hits, predictions is not None, len(retrieved), timings)
