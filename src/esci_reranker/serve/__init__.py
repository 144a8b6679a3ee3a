"""The HTTP service: FastAPI app factory, routes, settings, auth, rate limit, cache, metrics.

>>> from esci_reranker.serve import create_app, load_settings
>>> app = create_app(load_settings(model_path="runs/default/model"))  # doctest: +SKIP

Needs the ``serve`` extra: ``pip install 'esci-reranker[serve]'``. See docs/serving.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esci_reranker.lazy import lazy_exports

__all__ = ["Settings", "SettingsError", "create_app", "create_app_from_env", "load_settings"]

if TYPE_CHECKING:
    from esci_reranker.serve.app import create_app, create_app_from_env
    from esci_reranker.serve.settings import Settings, SettingsError, load_settings

_EXPORTS = {
    "create_app": "esci_reranker.serve.app",
    "create_app_from_env": "esci_reranker.serve.app",
    "Settings": "esci_reranker.serve.settings",
    "SettingsError": "esci_reranker.serve.settings",
    "load_settings": "esci_reranker.serve.settings",
}

# Lazy, so the CLI can validate settings and configure logging without importing torch.
__getattr__ = lazy_exports(__name__, _EXPORTS)
