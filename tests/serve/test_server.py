"""The real server: `esci-reranker serve` in a subprocess (uvicorn) called over loopback HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from esci_reranker.bench.server import answers_ready
from tests.serve.conftest import SETTINGS_ENV
from tests.serve.helpers import body

READY_TIMEOUT = 90.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("esci-reranker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "esci_reranker.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    return env


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.stderr.read() if proc.stderr else ""


@pytest.fixture
def server(tiny_checkpoint: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = _free_port()
    proc = subprocess.Popen(
        [*_cli(), "serve", "--model", str(tiny_checkpoint), "--port", str(port)],
        env=_env(LOG_FORMAT="json", API_KEY="k3y", RATE_LIMIT="1000/minute"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.captured_stderr = _stop(proc)  # type: ignore[attr-defined]


def _wait_ready(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        if answers_ready(url):
            return
        time.sleep(0.2)
    pytest.fail(f"server not ready within {READY_TIMEOUT} s")


@pytest.mark.slow
def test_cli_serves_over_http(server):
    url, proc = server
    _wait_ready(url, proc)
    headers = {"Authorization": "Bearer k3y", "X-Request-ID": "live-1"}
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").json()["model_loaded"] is True
        response = client.post("/predict", json=body(4, top_k=2), headers=headers)
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "live-1"
        assert len(response.json()["ranked"]) == 2
        assert client.post("/rerank", json=body(4)).status_code == 401
        v1 = client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]}, headers=headers)
        assert [r["index"] for r in v1.json()["results"]] in ([0, 1], [1, 0])
        assert (
            'esci_http_requests_total{endpoint="/predict",method="POST",status="200"} 1.0'
            in client.get("/metrics").text
        )
    stderr = _stop(proc)
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("logger") == "esci_reranker.serve.access"]
    predict = [line for line in access if line.get("path") == "/predict"]
    assert predict
    assert predict[0]["request_id"] == "live-1"
    assert predict[0]["num_candidates"] == 4
    assert predict[0]["status"] == 200
    assert predict[0]["client"] == "127.0.0.1"


def _serve_fails(cwd: Path, *args: str, **env: str) -> str:
    """Run ``esci-reranker serve`` with ``args`` and ``env``; it must exit 2. Its stderr."""
    result = subprocess.run(
        [*_cli(), "serve", *args], env=_env(**env), cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    return result.stderr


@pytest.mark.slow
def test_cli_fails_clearly_without_a_model(tmp_path):
    stderr = _serve_fails(tmp_path, "--port", str(_free_port()))
    assert "runs/default/model" in stderr
    assert "run `make run` first or pass --model" in stderr


@pytest.mark.slow
def test_cli_names_the_invalid_variable(tmp_path, tiny_checkpoint):
    assert "CACHE_SIZE='many'" in _serve_fails(tmp_path, "--model", str(tiny_checkpoint), CACHE_SIZE="many")


@pytest.mark.slow
def test_cli_with_workers_builds_each_app_from_the_environment(tiny_checkpoint, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [*_cli(), "serve", "--model", str(tiny_checkpoint), "--port", str(port), "--workers", "2"],
        env=_env(CACHE_SIZE="0"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_ready(url, proc)
        deadline = time.monotonic() + READY_TIMEOUT
        with httpx.Client(base_url=url, timeout=30) as client:
            while True:  # the other worker may still be loading: it answers 503 meanwhile
                response = client.post("/rerank", json=body(3))
                if response.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert response.status_code == 200
            assert response.json()["stats"]["cache_hit"] is False
            assert client.get("/info").json()["model"]["name"] == str(tiny_checkpoint)
    finally:
        _stop(proc)
