"""The server-latency benchmark's settings (no server is started here; tests/cli/test_speed.py runs one)."""

from __future__ import annotations

import pytest

from esci_reranker.bench.server import ServerLatency


def test_server_latency_settings_become_the_servers_environment():
    bench = ServerLatency(threads=2, precision="fp32", batch_wait_ms=3, max_batch_tokens=512)
    assert bench.env("off", "off") == {
        "CACHE_SIZE": "0",
        "BATCH_WAIT_MS": "0",
        "OMP_NUM_THREADS": "2",
        "PRECISION": "fp32",
        "TOWER_CACHE_SIZE": "0",  # cold unless asked
    }
    assert bench.env("on", "on") == {
        "CACHE_SIZE": "256",
        "BATCH_WAIT_MS": "3",
        "MAX_BATCH_TOKENS": "512",
        "OMP_NUM_THREADS": "2",
        "PRECISION": "fp32",
        "TOWER_CACHE_SIZE": "0",
    }
    assert "PRECISION" not in ServerLatency().env("on", "off")  # the service default decides
    assert ServerLatency(tower_cache_size=500).env("on", "off")["TOWER_CACHE_SIZE"] == "500"
    with pytest.raises(ValueError, match="tower_cache_size=-1"):
        ServerLatency(tower_cache_size=-1)
    with pytest.raises(ValueError, match="precision='fp16'"):
        ServerLatency(precision="fp16")
    with pytest.raises(ValueError, match="concurrency"):
        ServerLatency(concurrency=[0])
