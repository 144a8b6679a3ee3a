"""``POST /v1/rerank`` in the Cohere / Jina rerank shape and ``POST /v2/rerank`` in Cohere's v2 shape
(what ``cohere.ClientV2.rerank`` posts), for clients written against those APIs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from esci_reranker.serve import pipeline
from esci_reranker.serve.deps import ScorerDep, SettingsDep
from esci_reranker.serve.errors import ERROR_RESPONSES
from esci_reranker.serve.schemas import (
    V1Document,
    V1RerankRequest,
    V1RerankResponse,
    V1Result,
    V1Usage,
    V2RerankRequest,
    V2RerankResponse,
    V2Result,
)
from esci_reranker.serve.scoring import Scorer, ScoreResult
from esci_reranker.serve.settings import Settings

router = APIRouter(tags=["compatibility"], responses=ERROR_RESPONSES)


@router.post("/v1/rerank", summary="Cohere/Jina-compatible rerank", response_model=V1RerankResponse)
async def v1_rerank(
    body: V1RerankRequest, request: Request, scorer: ScorerDep, settings: SettingsDep
) -> JSONResponse:
    """Documents (strings or ``{"text": ...}``) ranked by ``relevance_score``, each with its
    request ``index`` (and this service's ``esci_class`` and ``is_substitute``); ``document`` is
    included only with ``return_documents: true``."""
    texts = body.texts()
    _check_documents(request, settings, body.query, texts)
    result, ranked = await _rank_documents(scorer, body.query, texts, body.top_n)
    results = [
        V1Result(
            **r.model_dump(), document=V1Document(text=texts[r.index]) if body.return_documents else None
        )
        for r in ranked
    ]
    rid = pipeline.request_id(request)
    response = V1RerankResponse(
        id=rid,
        request_id=rid,
        model=scorer.model_id,
        results=results,
        usage=V1Usage(search_units=1),
        stats=pipeline.build_stats(request, scorer, result, len(results)),
    )
    exclude = None if body.return_documents else {"results": {"__all__": {"document"}}}
    return JSONResponse(response.model_dump(mode="json", exclude=exclude))


@router.post("/v2/rerank", summary="Cohere v2-compatible rerank", response_model=V2RerankResponse)
async def v2_rerank(
    body: V2RerankRequest, request: Request, scorer: ScorerDep, settings: SettingsDep
) -> V2RerankResponse:
    """Cohere's v2 rerank: ``documents`` (strings) ranked by ``relevance_score``, each with its
    request ``index`` (and this service's ``esci_class`` and ``is_substitute``), and Cohere's
    ``meta``; ``max_tokens_per_doc`` cuts each document first."""
    texts = list(body.documents)
    _check_documents(request, settings, body.query, texts)  # on what the client sent, before any cut
    if body.max_tokens_per_doc is not None:
        texts = await run_in_threadpool(scorer.truncate_tokens, texts, body.max_tokens_per_doc)
    result, results = await _rank_documents(scorer, body.query, texts, body.top_n)
    rid = pipeline.request_id(request)
    return V2RerankResponse(
        id=rid,
        results=results,
        request_id=rid,
        model=scorer.model_id,
        stats=pipeline.build_stats(request, scorer, result, len(results)),
    )


def _check_documents(request: Request, settings: Settings, query: str, texts: list[str]) -> None:
    """413/422 for too many documents or a query/document over the text limit (naming it)."""
    request.state.num_candidates = len(texts)  # for the access log, also when rejected
    pipeline.check_length(query, settings, "query")
    pipeline.check_count(len(texts), settings, "documents")
    for index, text in enumerate(texts):
        pipeline.check_length(text, settings, f"documents[{index}]")


async def _rank_documents(
    scorer: Scorer, query: str, texts: list[str], top_n: int | None
) -> tuple[ScoreResult, list[V2Result]]:
    """Model outputs for plain-text documents (read as given: no field building) and the best
    ``top_n`` as ``/v2/rerank`` lists them; ``/v1/rerank`` adds the ``document`` to each.

    A document is the product ``{"text": ...}`` of ``/rerank``: the same record reaches a stacked
    model's features (and the response cache), so both routes label it alike.
    """
    records = [{"text": t} for t in texts]
    result = await pipeline.score(scorer, query, [scorer.text_of(r) for r in records], records)
    ranked = [
        V2Result(
            index=c.index,
            relevance_score=c.score,
            esci_class=c.esci_class,  # type: ignore[arg-type]
            is_substitute=c.is_substitute,
        )
        for c in pipeline.ranked(result.predictions, top_n, scorer.multi_task)
    ]
    return result, ranked
