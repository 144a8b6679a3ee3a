"""The interactive API docs, ``GET /docs`` (Swagger UI) and ``GET /redoc`` (ReDoc), built from
files the service serves itself (``serve/web``), so the pages work on a host without internet.

FastAPI's own pages load their JS and CSS from a public CDN and the favicon from another site;
the app is therefore built with ``docs_url=None, redoc_url=None`` and these routes take their place,
with the same HTML generators pointed at our static mount.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse

from esci_reranker.serve.web import FAVICON, REDOC_JS, REDOC_LOGO, SWAGGER_CSS, SWAGGER_JS, static_url

DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"

router = APIRouter(include_in_schema=False)


def _openapi_url(request: Request) -> str:
    root = request.scope.get("root_path", "").rstrip("/")
    return f"{root}{request.app.openapi_url}"


@router.get(DOCS_PATH)
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI over ``/openapi.json``; "Try it out" sends requests to this same host."""
    return get_swagger_ui_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=static_url(request, SWAGGER_JS),
        swagger_css_url=static_url(request, SWAGGER_CSS),
        swagger_favicon_url=static_url(request, FAVICON),
        # No OAuth2 flow: the API takes a static key (the "Authorize" button), so no redirect page.
        oauth2_redirect_url=None,
        swagger_ui_parameters=request.app.swagger_ui_parameters,
    )


@router.get(REDOC_PATH)
def redoc(request: Request) -> HTMLResponse:
    """ReDoc over ``/openapi.json``, with the system fonts (no Google Fonts)."""
    return get_redoc_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=static_url(request, REDOC_JS),
        redoc_favicon_url=static_url(request, FAVICON),
        with_google_fonts=False,
    )


@router.get(f"{REDOC_PATH}/logo-mini.svg")
def redoc_logo(request: Request) -> RedirectResponse:
    """ReDoc's sidebar logo. Upstream ReDoc fetches it from its CDN; the bundle we serve asks for it
    at ``<page path>/logo-mini.svg`` instead, and this sends it on to the copy in the static mount."""
    return RedirectResponse(static_url(request, REDOC_LOGO), status_code=307)
