"""Per-client rate limit: 429 with Retry-After past the limit; probes are exempt."""

from __future__ import annotations

from tests.serve.helpers import body


def test_requests_past_the_limit_get_429_with_retry_after(make_client):
    client = make_client(rate_limit="3/minute")
    statuses = [client.post(path, json=body(1)).status_code for path in ("/rerank", "/classify", "/predict")]
    assert statuses == [200, 200, 200]
    limited = client.post("/substitute", json=body(1))  # one counter for every route of a client
    assert limited.status_code == 429
    data = limited.json()
    assert data["error"] == "rate_limited"
    assert "3 per 1 minute" in data["message"]
    assert data["request_id"] == limited.headers["X-Request-ID"]
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert client.get("/info").status_code == 429

    for _ in range(5):
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'esci_http_requests_total{endpoint="/substitute",method="POST",status="429"} 1.0' in metrics.text


def test_no_limit_when_rate_limit_is_empty(client):
    assert all(client.post("/rerank", json=body(1)).status_code == 200 for _ in range(12))
