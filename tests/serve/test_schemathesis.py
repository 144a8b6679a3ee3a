"""Property-based API test: schemathesis generates requests from the OpenAPI schema (valid and,
for the POST routes, invalid ones); no input may produce a 5xx, and every response must match
the documented status codes, content types and schemas.

Bounded (25 examples per operation and mode, derandomized) to fit the test budget; see
docs/serving.md for the unbounded run against a live server. Uses ``APIOperation.as_strategy``
with Hypothesis directly: schemathesis' lazy pytest fixture loader reads a private pytest
attribute that pytest 9 removed.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from esci_reranker.serve import create_app, load_settings  # noqa: E402

POSTS = ["/rerank", "/classify", "/substitute", "/predict", "/v1/rerank", "/v2/rerank"]
GETS = ["/health", "/ready", "/info", "/metrics"]
CASES = [("POST", p, mode) for p in POSTS for mode in ("positive", "negative")] + [
    ("GET", p, "positive") for p in GETS
]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(tiny_reranker):
    # Small limits so generated requests also reach the 413/422 limit paths.
    app = create_app(load_settings(max_candidates=20, max_text_chars=300, cache_size=64), tiny_reranker)
    app.state.service.warm_up()  # schemathesis' ASGI client runs no lifespan: warm up here
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {g}" for m, p, g in CASES])
def test_no_server_errors_and_documented_responses(api_schema, method, path, mode):
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

    @given(case=strategy)
    @settings(
        max_examples=25,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        case.call_and_validate(checks=CHECKS)

    run()
