"""Error responses: one JSON shape (``ErrorResponse``) for every 4xx and 5xx the service sends."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from esci_reranker.serve.schemas import ErrorDetail, ErrorResponse

#: ``responses=`` entry for routes, so the OpenAPI document lists every error a route can answer.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "API_KEY is set and the request has no valid key."},
    413: {
        "model": ErrorResponse,
        "description": "More than MAX_CANDIDATES candidates, or body over MAX_BODY_BYTES.",
    },
    422: {
        "model": ErrorResponse,
        "description": "Invalid body: bad JSON, missing field, wrong type, text over MAX_TEXT_CHARS, ...",
    },
    429: {
        "model": ErrorResponse,
        "description": "RATE_LIMIT exceeded for this client (error rate_limited), or MAX_QUEUED_REQUESTS "
        "requests already in progress (error overloaded); see Retry-After.",
    },
    503: {"model": ErrorResponse, "description": "The model is still loading (or failed to load)."},
}

_STATUS_CODES: Mapping[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "task_not_supported",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """An expected failure with its HTTP status, a stable code and a message that says how to fix it."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _STATUS_CODES.get(status, "error")
        self.headers = dict(headers or {})


def request_id_of(scope: Scope) -> str | None:
    """The id ``RequestContextMiddleware`` gave this request (None outside it)."""
    return scope.get("state", {}).get("request_id")


def _safe(text: str) -> str:
    # Messages can quote client input; keep them encodable whatever the client sent.
    return text.encode("utf-8", "replace").decode("utf-8")


def error_response(
    scope: Scope,
    status: int,
    message: str,
    code: str | None = None,
    details: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The JSON error response every handler returns."""
    body = ErrorResponse(
        error=code or _STATUS_CODES.get(status, "error"),
        message=_safe(message),
        request_id=request_id_of(scope),
        details=[
            ErrorDetail(
                loc=[_safe(p) if isinstance(p, str) else p for p in d["loc"]],
                msg=_safe(str(d["msg"])),
                type=str(d["type"]),
            )
            for d in details
        ]
        if details
        else None,
    )
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=status, headers=headers)


def _location(loc: Sequence[Any]) -> str:
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """One readable sentence per error, e.g. ``candidates[2].product_id: Field required``."""
    messages = []
    for error in errors:
        kind, loc, msg = error.get("type", ""), tuple(error.get("loc", ())), str(error.get("msg", ""))
        if kind == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            messages.append(
                f"the request body is not valid JSON ({reason})"
                if reason
                else "the request body is not valid JSON"
            )
        elif loc == ("body",) and kind == "missing":
            messages.append(
                "the request body is missing: send a JSON object with Content-Type: application/json"
            )
        elif loc == ("body",) and kind in ("model_attributes_type", "dict_type", "model_type"):
            messages.append(
                "the request body must be a JSON object, sent with Content-Type: application/json"
            )
        else:
            msg = msg.removeprefix("Value error, ")
            messages.append(f"{_location(loc)}: {msg}")
    return "; ".join(messages[:10]) + (f"; and {len(messages) - 10} more" if len(messages) > 10 else "")


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    error = cast(ApiError, exc)
    return error_response(request.scope, error.status, error.message, error.code, headers=error.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    errors = list(cast(RequestValidationError, exc).errors())
    details = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in errors
    ]
    return error_response(request.scope, 422, describe_validation_errors(errors), details=details)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    error = cast(StarletteHTTPException, exc)
    message = error.detail if isinstance(error.detail, str) else str(error.detail)
    if error.status_code == 400 and message == "There was an error parsing the body":
        # FastAPI's answer to a body that is not UTF-8 (or otherwise undecodable): the same
        # "not valid JSON" 422 as any other unparseable body.
        return error_response(
            request.scope, 422, "the request body is not valid JSON (it must be UTF-8 encoded JSON text)"
        )
    if error.status_code == 404:
        message = f"no route {request.url.path}; see /docs for the API"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see /docs for the API"
    return error_response(request.scope, error.status_code, message, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Route ``ApiError``, validation errors and HTTP errors to the one JSON error shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
