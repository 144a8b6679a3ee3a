"""Lazy package attributes: a package names what it hands on, and the module holding each name is
imported on first use, so importing the package (the CLI's ``--help``, the settings check) stays
light and loads neither torch nor the optional extras."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``exports`` maps each public name to the
    module that defines it, imported when the name is first read. In the package's
    ``__init__.py``: ``__getattr__ = lazy_exports(__name__, {"Settings": "pkg.settings"})``.
    """

    def attribute(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return attribute
