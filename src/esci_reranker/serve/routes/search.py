"""``POST /search``: retrieve from the catalogue index (``INDEX_PATH``), rerank, return the top k.

Retrieval runs on the service's retrieval thread; reranking goes through the same scorer as the
other endpoints (response cache, dynamic batching, forward-time metrics).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from fastapi import APIRouter, Request

from esci_reranker.retrieval.search import rank_hits
from esci_reranker.serve import pipeline
from esci_reranker.serve.deps import IndexDep, ScorerDep, SettingsDep, StateDep
from esci_reranker.serve.errors import ERROR_RESPONSES, ApiError
from esci_reranker.serve.schemas import SearchRequest, SearchResponse, SearchResult, SearchStats

router = APIRouter(tags=["search"], responses=ERROR_RESPONSES)


@router.post("/search", summary="Search the catalogue: retrieve, rerank, label")
async def search(
    body: SearchRequest,
    request: Request,
    scorer: ScorerDep,
    index: IndexDep,
    settings: SettingsDep,
    state: StateDep,
) -> SearchResponse:
    """The best ``top_k`` of ``candidates`` products retrieved by BM25 and the dense retriever
    (fused), reranked by the model, each with its E/S/C/I class, substitute flag and sources."""
    request.state.num_candidates = body.candidates  # for the access log, also when rejected
    pipeline.check_length(body.query, settings, "query")
    if body.candidates > settings.max_candidates:
        raise ApiError(
            422, f"candidates={body.candidates}; the limit is MAX_CANDIDATES={settings.max_candidates}."
        )
    if body.top_k > min(body.candidates, settings.search_max_top_k):
        raise ApiError(
            422,
            f"top_k={body.top_k}; expected at most candidates ({body.candidates}) and at most "
            f"SEARCH_MAX_TOP_K={settings.search_max_top_k}.",
        )
    start = time.perf_counter()
    retrieved = await asyncio.wrap_future(state.retrieve(body.query, body.candidates, body.mode))
    retrieval_seconds = time.perf_counter() - start
    state.metrics.observe_retrieval(body.mode, retrieval_seconds)
    predictions, forward_ms, cache_hit = None, 0.0, False
    if body.rerank and retrieved:
        texts = [scorer.text_of(r.fields) for r in retrieved]
        # A stacked model's features read the products' fields, as /rerank's candidates give them.
        records = [r.fields for r in retrieved] if scorer.stacked else None
        result = await pipeline.score(scorer, body.query, texts, records)
        predictions, forward_ms, cache_hit = result.predictions, result.forward_ms, result.cache_hit
    hits = rank_hits(retrieved, body.top_k, predictions, scorer.multi_task)
    # The response schema is the hit's own fields (sources as a list), validated as they are read.
    results = [SearchResult.model_validate(h, from_attributes=True) for h in hits]
    started = getattr(request.state, "started", start)
    return SearchResponse(
        request_id=pipeline.request_id(request),
        query=body.query,
        results=results,
        stats=SearchStats(
            total_latency_ms=round((time.perf_counter() - started) * 1000.0, 3),
            retrieval_ms=round(retrieval_seconds * 1000.0, 3),
            model_forward_time_ms=round(forward_ms, 3),
            num_candidates=len(retrieved),
            num_results=len(results),
            reranked=predictions is not None,
            cache_hit=cache_hit,
            device=scorer.device,
            index_products=len(index),
            timestamp=datetime.now(UTC),
        ),
    )
