"""``POST /v1/rerank`` in the Cohere / Jina rerank shape, for clients written against those APIs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from esci_reranker.serve import pipeline
from esci_reranker.serve.deps import ScorerDep, SettingsDep
from esci_reranker.serve.errors import ERROR_RESPONSES
from esci_reranker.serve.schemas import V1Document, V1RerankRequest, V1RerankResponse, V1Result, V1Usage

router = APIRouter(tags=["compatibility"], responses=ERROR_RESPONSES)


@router.post("/v1/rerank", summary="Cohere/Jina-compatible rerank", response_model=V1RerankResponse)
async def v1_rerank(
    body: V1RerankRequest, request: Request, scorer: ScorerDep, settings: SettingsDep
) -> JSONResponse:
    """Documents (strings or ``{"text": ...}``) ranked by ``relevance_score``, each with its
    request ``index``; ``document`` is included only with ``return_documents: true``."""
    texts = body.texts()
    request.state.num_candidates = len(texts)  # for the access log, also when rejected
    pipeline.check_length(body.query, settings, "query")
    pipeline.check_count(len(texts), settings, "documents")
    for index, text in enumerate(texts):
        pipeline.check_length(text, settings, f"documents[{index}]")
    result = await pipeline.score(scorer, body.query, [scorer.text_of(t) for t in texts])
    scores = result.predictions.scores
    results = [
        V1Result(
            index=int(i),
            relevance_score=float(scores[i]),
            document=V1Document(text=texts[i]) if body.return_documents else None,
        )
        for i in pipeline.ranking(scores, body.top_n)
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
