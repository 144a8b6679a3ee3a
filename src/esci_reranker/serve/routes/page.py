"""``GET /``: the search page (a Jinja2 template; CSS and JS from the static mount, nothing external)."""

from __future__ import annotations

from functools import cache
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from esci_reranker.serve.deps import StateDep
from esci_reranker.serve.routes.docs import DOCS_PATH
from esci_reranker.serve.web import TEMPLATES_DIR, static_url

router = APIRouter(include_in_schema=False)


@cache
def _templates() -> Any:
    from fastapi.templating import Jinja2Templates

    return Jinja2Templates(directory=str(TEMPLATES_DIR))


@router.get("/", response_class=HTMLResponse)
def page(request: Request, state: StateDep) -> HTMLResponse:
    """A search box over ``POST /search``, results with E/S/C/I and substitute badges, latency,
    and a rerank on/off switch."""
    root = request.scope.get("root_path", "").rstrip("/")
    messages = {
        "not_configured": "Search is off: start the service with INDEX_PATH set to a catalogue index "
        "(esci-reranker index --sample --out DIR).",
        "loading": "The catalogue index is loading…",
        "failed": f"The catalogue index failed to load: {state.index_error}",
    }
    return _templates().TemplateResponse(
        request,
        "search.html",
        {
            "static": lambda path: static_url(request, path),
            "search_url": f"{root}/search",
            "docs_url": f"{root}{DOCS_PATH}",
            "auth_required": state.settings.api_key is not None,
            "index_ready": state.index_status == "ready",
            "index_message": messages.get(state.index_status, ""),
        },
    )
