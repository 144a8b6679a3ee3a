"""API-key check for the scoring and info routes (installed only when ``API_KEY`` is set).

The key may come as ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``. Keys are compared
with ``hmac.compare_digest`` so the time taken does not reveal how much of a guess was right.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from esci_reranker.serve.errors import ApiError

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="The service's API_KEY.", scheme_name="ApiKeyHeader"
)
bearer = HTTPBearer(
    auto_error=False, description="The service's API_KEY as a bearer token.", scheme_name="Bearer"
)


async def require_api_key(
    request: Request,
    header_key: Annotated[str | None, Security(api_key_header)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    """Raise 401 unless the request carries the configured API key in either header.

    ``async`` so it runs on the event loop (a few µs) instead of costing a worker-thread hop.
    """
    secret = request.app.state.service.settings.api_key
    if secret is None:
        return
    expected = secret.get_secret_value().encode("utf-8")
    given = [key for key in (header_key, credentials.credentials if credentials else None) if key]
    # Compare every given key (no early exit) so timing does not depend on which header matched.
    # Starlette decodes header bytes as latin-1: encoding back gives the bytes the client sent.
    matches = [hmac.compare_digest(key.encode("latin-1"), expected) for key in given]
    if not any(matches):
        raise ApiError(
            401,
            "invalid API key: send 'X-API-Key: <key>' or 'Authorization: Bearer <key>'"
            if given
            else "this service needs an API key: send 'X-API-Key: <key>' or 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
