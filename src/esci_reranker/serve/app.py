"""The app factory: ``create_app(settings, reranker=None)``.

Nothing is loaded at import time. With a ``reranker`` the app serves it (warming it up at
start-up); without one it loads the model from the settings in a background thread during
start-up, so ``/health`` answers at once and ``/ready`` is 503 until the model is warm.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI
from slowapi.errors import RateLimitExceeded
from starlette.concurrency import run_in_threadpool

from esci_reranker import __version__
from esci_reranker.serve.admission import AdmissionMiddleware
from esci_reranker.serve.auth import require_api_key
from esci_reranker.serve.errors import install_error_handlers
from esci_reranker.serve.metrics import Metrics
from esci_reranker.serve.middleware import RequestContextMiddleware
from esci_reranker.serve.ratelimit import RateLimitMiddleware, build_limiter, rate_limit_exceeded
from esci_reranker.serve.routes import compat, docs, info, ops, page, scoring, search
from esci_reranker.serve.settings import Settings, load_settings
from esci_reranker.serve.state import Loader, ServiceState, load_reranker
from esci_reranker.serve.web import STATIC_NAME, STATIC_URL, static_files

if TYPE_CHECKING:
    from esci_reranker.reranker import Reranker

DESCRIPTION = """\
Multi-task ESCI reranker for product search: Task 1 ranking (`/rerank`), Task 2 E/S/C/I
classification (`/classify`), Task 3 substitute detection (`/substitute`), all three
(`/predict`), a Cohere/Jina-compatible `/v1/rerank`, a Cohere v2 `/v2/rerank`, and `/search` over a catalogue index
(`INDEX_PATH`: retrieve, rerank, label; the page at `/`). See docs/serving.md.
"""


def create_app(
    settings: Settings | None = None, reranker: Reranker | None = None, *, loader: Loader | None = None
) -> FastAPI:
    """Build the service.

    Args:
        settings: service settings (default: read from the environment with ``load_settings``).
        reranker: a loaded model to serve; None loads one from ``settings`` in the background.
        loader: builds the model from settings when ``reranker`` is None (default:
            ``Reranker.from_pretrained`` on ``MODEL_PATH`` / ``HF_MODEL_REPO_ID`` / the default).
    """
    settings = settings if settings is not None else load_settings()
    metrics = Metrics()
    state = ServiceState(settings, metrics, loader or load_reranker)
    if reranker is not None:
        state.attach(reranker)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.open()
        try:
            if state.scorer is not None:
                await run_in_threadpool(state.load_and_warm_up)  # warm-up only: the model is given
            else:
                state.start_loading()
            yield
        finally:
            state.close()  # stop the dynamic batcher; requests still queued get a 503

    app = FastAPI(
        title="ESCI reranker",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's own /docs and /redoc load their assets from a CDN; ours (routes/docs.py) load
        # them from the static mount below, so the pages work offline.
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = state

    app.include_router(ops.router)
    app.include_router(docs.router)
    app.include_router(page.router)  # the search page; /search itself is protected below
    # The one static mount for every page the app serves (see serve/web).
    app.mount(STATIC_URL, static_files(), name=STATIC_NAME)
    protected = [Depends(require_api_key)] if settings.api_key is not None else []
    app.include_router(info.router, dependencies=protected)
    app.include_router(scoring.router, dependencies=protected)
    app.include_router(compat.router, dependencies=protected)
    app.include_router(search.router, dependencies=protected)

    install_error_handlers(app)
    # Inside the rate limit (a client over its own limit is told so first) and the request
    # context (a 429 is counted and logged like any answer).
    model_paths = {
        getattr(route, "path", "")
        for router in (scoring.router, compat.router, search.router)
        for route in router.routes
    }
    app.add_middleware(AdmissionMiddleware, bound=state.queue, paths=model_paths)
    if settings.rate_limit:
        app.state.limiter = build_limiter(settings.rate_limit)
        app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded)
        app.add_middleware(RateLimitMiddleware, limiter=app.state.limiter)
    # Added last, so it is the outermost: it sees every response, 429s and 500s included.
    routers = (
        ops.router,
        docs.router,
        page.router,
        info.router,
        scoring.router,
        compat.router,
        search.router,
    )
    known_paths = {getattr(route, "path", "") for router in routers for route in router.routes}
    if app.openapi_url:
        known_paths.add(app.openapi_url)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        known_paths=known_paths,
        mounts=[STATIC_URL],
    )
    return app


def create_app_from_env() -> FastAPI:
    """``create_app()`` with settings from the environment: the import-string factory that
    ``uvicorn --factory`` (and ``esci-reranker serve --workers N``) calls in each worker."""
    return create_app(load_settings())
