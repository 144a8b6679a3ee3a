"""Operations routes: liveness, readiness, Prometheus metrics. Never rate limited or authenticated."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from esci_reranker.serve.deps import StateDep
from esci_reranker.serve.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["operations"])


@router.get(
    "/health",
    summary="Liveness",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "The model failed to load."}},
)
def health(state: StateDep) -> JSONResponse:
    """200 while the process serves (also while the model loads); 503 once loading has failed."""
    body = HealthResponse(
        status="failed" if state.status == "failed" else "ok",
        model_loaded=state.model_loaded,
        model_status=state.status,
        error=state.error,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=503 if state.status == "failed" else 200)


@router.get(
    "/ready",
    summary="Readiness",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "Loading, warming up, or failed."}},
)
def ready(state: StateDep) -> JSONResponse:
    """200 once the model is loaded and has run one warm-up forward pass and, when ``INDEX_PATH`` is
    set, the catalogue index is loaded; 503 before (or when either failed)."""
    body = ReadyResponse(
        ready=state.ready,
        model_status=state.status,
        error=state.error,
        index_status=state.index_status,
        index_error=state.index_error,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Exposition text."}
    },
)
def metrics(state: StateDep) -> Response:
    """Request counts and latencies per route, model forward time, batch sizes, cache hits/misses,
    requests in flight and whether the model is loaded."""
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
