"""The memory benchmark's separate client: what it sends, and how its answers are summarised."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from esci_reranker.bench.server_memory import ProbeOutcome, ServerMemory, _probe_cell, probe_requests


class _Shedding(BaseHTTPRequestHandler):
    """Answers every second POST 429 (with Retry-After) and the others 200; records the bodies."""

    seen: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Shedding.seen.append({"path": self.path, "body": body})
        shed = len(_Shedding.seen) % 2 == 0
        self.send_response(429 if shed else 200)
        if shed:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def shedding_url():
    _Shedding.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Shedding)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_probe_sends_the_body_one_request_at_a_time_and_times_each_answer(shedding_url):
    body = {"query": "usb lunch box", "candidates": [{"product_id": "p1", "text": "a lunch box"}]}
    answers = probe_requests(shedding_url, body, seconds=0.5, interval=0.02)
    assert len(answers) >= 2
    assert [status for status, _ in answers] == [("429" if i % 2 else "200") for i in range(len(answers))]
    assert all(ms > 0 for _, ms in answers)
    assert all(seen == {"path": "/rerank", "body": body} for seen in _Shedding.seen)


def test_probe_counts_a_server_that_does_not_answer_as_an_error():
    answers = probe_requests(
        "http://127.0.0.1:9", {"query": "q", "candidates": []}, seconds=0.05, interval=0.01
    )
    assert answers
    assert {status for status, _ in answers} == {"error"}


def test_probe_outcome_summarises_statuses_and_the_429_latency():
    answers = [("200", 900.0), ("429", 2.0), ("429", 4.0), ("error", 1.0), ("429", 6.0)]
    outcome = ProbeOutcome.of(answers)
    assert outcome.requests == 5
    assert outcome.statuses == {"200": 1, "429": 3, "error": 1}
    assert outcome.shed == 3
    assert outcome.shed_p50_ms == 4.0
    assert outcome.shed_max_ms == 6.0
    assert outcome.ok_p50_ms == 900.0
    assert _probe_cell(outcome.__dict__) == "3 of 5, 6 / 6"
    assert _probe_cell(ProbeOutcome.of([("200", 5.0)]).__dict__) == "0 of 1"
    assert _probe_cell(None) == "-"


def test_negative_probe_interval_is_refused_by_name():
    with pytest.raises(ValueError, match="probe_interval=-1"):
        ServerMemory(configs={"default": {}}, probe_interval=-1)


def test_memory_table_shows_both_clocks_of_the_429s_and_the_generators_cpu():
    from esci_reranker.bench.server_memory import format_memory_table

    rounds = [{"rss_end_mb": 900.0 + i} for i in range(4)]
    load = {"shed": 12, "shed_p99_ms": 375.0, "shed_max_ms": 555.0, "server_errors": 0}
    result = {
        "name": "default",
        "idle_rss_mb": 741.0,
        "plateau_rss_mb": 1069.0,
        "rounds": rounds,
        "requests_per_s": 6.78,
        "p50_ms": 2851.0,
        "p99_ms": 5535.0,
        "steady_p50_ms": 2912.0,
        "steady_p99_ms": 3310.0,
        "load": {**load, "health_failures": 0, "health_checks": 237},
        "probe": ProbeOutcome.of([("429", 6.9), ("200", 2000.0)]).__dict__,
        "generator_cpu_share": 0.021,
    }
    block = {
        "status": "ok",
        "results": [result],
        "candidates_per_request": 40,
        "concurrency": 64,
        "rounds": 4,
        "round_seconds": 30.0,
        "plateau": "highest RSS",
        "rss_goal_mb": 1024.0,
    }
    table = format_memory_table(block)
    row = table.splitlines()[1]
    assert "375 / 555" in row  # the load's clients' 429s: p99 / slowest
    assert "1 of 2, 7 / 7" in row  # the separate client's
    assert row.rstrip().endswith("2%")  # the generator's share of the host's CPU


def test_memory_breakdown_table_splits_the_libraries_by_import():
    from esci_reranker.bench.memory_breakdown import format_breakdown

    block = {
        "parts": [
            {
                "part": "libraries",
                "rss_delta_mb": 490.2,
                "note": "imports",
                "by_import": [
                    {"module": "torch", "rss_delta_mb": 192.8},
                    {"module": "sympy", "rss_delta_mb": 31.7},
                ],
            },
            {"part": "tokenizer", "rss_delta_mb": 13.0, "note": "tokenizer"},
        ],
        "arenas_trim_returns_mb": 296.0,
        "settings": {"cache_size": 0},
        "tower_cache": {},
        "feature_cache": {},
        "response_cache": {},
        "start_rss_mb": 11.0,
        "end_rss_mb": 933.0,
    }
    table = format_breakdown(block)
    assert "| libraries | 490 MiB | imports |" in table
    assert table.splitlines()[-1] == "libraries by import, one at a time: torch 193, sympy 32 MiB"
    del block["parts"][0]["by_import"]
    assert "by import" not in format_breakdown(block)
