"""Operations routes: liveness, readiness, Prometheus metrics. Never rate limited or authenticated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from esci_reranker.serve.deps import StateDep
from esci_reranker.serve.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["operations"])
_Route = TypeVar("_Route", bound=Callable[..., Any])


def _probe(path: str, summary: str, model: type[BaseModel], unavailable: str) -> Callable[[_Route], _Route]:
    """Declare a probe route: its JSON body is ``model``, with 200 when the probe passes and 503
    (``unavailable`` says when) when it does not."""
    return router.get(
        path,
        summary=summary,
        response_model=model,
        responses={503: {"model": model, "description": unavailable}},
    )


def _answer(body: BaseModel, ok: bool) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)


@_probe("/health", "Liveness", HealthResponse, "The model failed to load.")
def health(state: StateDep) -> JSONResponse:
    """200 while the process serves (also while the model loads); 503 once loading has failed."""
    body = HealthResponse(
        status="failed" if state.status == "failed" else "ok",
        model_loaded=state.model_loaded,
        model_status=state.status,
        error=state.error,
    )
    return _answer(body, state.status != "failed")


@_probe("/ready", "Readiness", ReadyResponse, "Loading, warming up, or failed.")
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
    return _answer(body, body.ready)


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
