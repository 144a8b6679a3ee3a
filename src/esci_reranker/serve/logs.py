"""Logging of the service: one formatter for our lines and uvicorn's, as JSON or plain text.

``logging_config`` is a ``logging.config.dictConfig`` dict; it is also given to uvicorn as its
``log_config`` so every worker process formats the same way. Extra fields passed with
``logger.info(..., extra={...})`` become JSON keys (or ``key=value`` pairs in text).
"""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import UTC, datetime
from typing import Any, Final

#: The per-request access line; uvicorn's own access log is turned off in its favour.
ACCESS_LOGGER: Final[str] = "esci_reranker.serve.access"

_STANDARD_ATTRS: Final[frozenset[str]] = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__
) | {"message", "asctime", "color_message", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, extra fields, ``exc_info``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            first, newline, rest = line.partition("\n")
            first += " " + " ".join(f"{k}={v}" for k, v in extras.items())
            line = first + newline + rest
        return line


def logging_config(level: str = "INFO", fmt: str = "text") -> dict[str, Any]:
    """A ``dictConfig`` for the root logger and uvicorn's loggers at ``level`` in ``fmt`` (json|text)."""
    if fmt not in ("json", "text"):
        raise ValueError(f"log format {fmt!r}; expected 'json' or 'text' (LOG_FORMAT).")
    formatter = f"{__name__}.JsonFormatter" if fmt == "json" else f"{__name__}.TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": formatter}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Apply ``logging_config`` to this process."""
    logging.config.dictConfig(logging_config(level, fmt))
