"""API key: every scoring route and /info need it when API_KEY is set; probes stay open."""

from __future__ import annotations

import pytest

from tests.serve.helpers import body

PROTECTED = ["/rerank", "/classify", "/substitute", "/predict"]


@pytest.fixture
def keyed(make_client):
    return make_client(api_key="s3cret-key")


def test_missing_or_wrong_key_is_401(keyed):
    for path in PROTECTED:
        response = keyed.post(path, json=body(1))
        assert response.status_code == 401
        assert response.json()["error"] == "unauthorized"
        assert "X-API-Key" in response.json()["message"]
        assert response.headers["WWW-Authenticate"] == "Bearer"
    for headers in (
        {"X-API-Key": "wrong"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic s3cret-key"},
        {"X-API-Key": "s3cret-ke"},
    ):
        assert keyed.post("/rerank", json=body(1), headers=headers).status_code == 401, headers
    assert keyed.post("/v1/rerank", json={"query": "q", "documents": ["a"]}).status_code == 401
    assert keyed.get("/info").status_code == 401


@pytest.mark.parametrize("headers", [{"X-API-Key": "s3cret-key"}, {"Authorization": "Bearer s3cret-key"}])
def test_either_header_form_is_accepted(keyed, headers):
    for path in PROTECTED:
        assert keyed.post(path, json=body(2), headers=headers).status_code == 200, path
    assert (
        keyed.post("/v1/rerank", json={"query": "q", "documents": ["a"]}, headers=headers).status_code == 200
    )
    assert keyed.get("/info", headers=headers).json()["service"]["auth_required"] is True


def test_probes_need_no_key(keyed):
    assert keyed.get("/health").status_code == 200
    assert keyed.get("/ready").status_code == 200
    assert keyed.get("/metrics").status_code == 200


def test_non_ascii_key_in_header_does_not_crash(keyed):
    response = keyed.post("/rerank", json=body(1), headers={"X-API-Key": "clé".encode()})
    assert response.status_code == 401


def test_openapi_documents_the_security_schemes(keyed):
    schemes = keyed.get("/openapi.json").json()["components"]["securitySchemes"]
    assert set(schemes) == {"ApiKeyHeader", "Bearer"}
