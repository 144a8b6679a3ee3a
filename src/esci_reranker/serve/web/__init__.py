"""The files behind every page the service serves, under one static mount.

``STATIC_URL`` (``/static``) serves, in this order:

1. ``serve/web/static/`` — our own files (the favicon, the search page's CSS and JS);
2. the ``static/`` folder of the ``fastapi-standalone-docs`` package — the Swagger UI and ReDoc
   dist files with their licences (``swagger/``, ``redoc/``), so ``/docs`` and ``/redoc`` load
   nothing from a CDN.

Both are package data, so ``pip install`` (and the Docker image) carries them. Pages build
their asset URLs with :func:`static_url`, which keeps a proxy's ``root_path``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Final

from starlette.requests import Request
from starlette.staticfiles import StaticFiles

#: Where the mount answers; a page's assets are ``/static/<path>``.
STATIC_URL: Final[str] = "/static"
#: The route name of the mount (``request.url_for(STATIC_NAME, path=...)`` also works).
STATIC_NAME: Final[str] = "static"
#: Our own files, shipped as package data.
STATIC_DIR: Final[Path] = Path(__file__).resolve().parent / "static"
#: Jinja2 templates of the pages (the search page at ``/``).
TEMPLATES_DIR: Final[Path] = Path(__file__).resolve().parent / "templates"
#: The package that ships the Swagger UI and ReDoc dist files, and its folder that holds them.
DOCS_ASSETS_PACKAGE: Final[str] = "fastapi_standalone_docs"
DOCS_ASSETS_DIR: Final[str] = "static"

#: Paths under ``STATIC_URL`` of the files the API docs pages load.
SWAGGER_JS: Final[str] = "swagger/swagger-ui-bundle.js"
SWAGGER_CSS: Final[str] = "swagger/swagger-ui.css"
REDOC_JS: Final[str] = "redoc/redoc.standalone.js"
REDOC_LOGO: Final[str] = "redoc/logo-mini.svg"
FAVICON: Final[str] = "favicon.svg"


def static_files() -> StaticFiles:
    """The one ``StaticFiles`` app for ``STATIC_URL``: our folder first, then the docs assets.

    Raises:
        ImportError: ``fastapi-standalone-docs`` (part of the ``serve`` extra) is not installed.
    """
    if importlib.util.find_spec(DOCS_ASSETS_PACKAGE) is None:
        raise ImportError(
            f"the API docs pages need the Swagger UI and ReDoc files of package {DOCS_ASSETS_PACKAGE!r} "
            "(PyPI: fastapi-standalone-docs), which is not installed; install the serve extra: "
            "pip install 'esci-reranker[serve]'"
        )
    return StaticFiles(directory=STATIC_DIR, packages=[(DOCS_ASSETS_PACKAGE, DOCS_ASSETS_DIR)])


def static_url(request: Request, path: str) -> str:
    """The URL path of static file ``path`` as the browser must ask for it (with the request's
    ``root_path``, so pages still work behind a proxy that serves the app under a prefix).

    Relative to the host rather than absolute (``url_for``): an absolute URL is built from the
    Host header and scheme uvicorn saw, which behind a TLS-terminating proxy would be ``http://``.
    """
    root = request.scope.get("root_path", "").rstrip("/")
    return f"{root}{STATIC_URL}/{path.lstrip('/')}"
