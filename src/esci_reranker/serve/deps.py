"""Dependencies the routes declare with ``Annotated`` (the app's state, settings, scorer).

They are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency in a
worker thread, so each of these attribute reads would cost every request a thread hop (a worker
waking up and taking the GIL while the model's threads hold it). Run on the event loop they take
microseconds.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from esci_reranker.retrieval.index import CatalogueIndex
from esci_reranker.serve.errors import ApiError
from esci_reranker.serve.scoring import Scorer
from esci_reranker.serve.settings import Settings
from esci_reranker.serve.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_scorer(state: StateDep) -> Scorer:
    """The scorer, or 503 while the model is loading (or after it failed to load)."""
    if state.scorer is None:
        if state.status == "failed":
            raise ApiError(503, f"the model failed to load ({state.error}); see the server log")
        raise ApiError(
            503, "the model is still loading; retry when GET /ready answers 200", headers={"Retry-After": "5"}
        )
    return state.scorer


ScorerDep = Annotated[Scorer, Depends(get_scorer)]


async def get_index(state: StateDep) -> CatalogueIndex:
    """The catalogue index, or 503 saying why there is none (not configured, loading, failed)."""
    if state.index is None:
        if state.index_status == "not_configured":
            raise ApiError(
                503,
                "search is off: no catalogue index is configured. Build one with `esci-reranker index "
                "--sample --out DIR` (or --products F.parquet) and start the service with INDEX_PATH=DIR.",
            )
        if state.index_status == "failed":
            raise ApiError(
                503, f"the catalogue index failed to load ({state.index_error}); see the server log"
            )
        raise ApiError(
            503,
            "the catalogue index is still loading; retry when GET /ready answers 200",
            headers={"Retry-After": "5"},
        )
    return state.index


IndexDep = Annotated[CatalogueIndex, Depends(get_index)]
