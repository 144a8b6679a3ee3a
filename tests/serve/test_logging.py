"""One access line per request with its fields and no query text; JSON and text formatters."""

from __future__ import annotations

import json
import logging

import pytest

from esci_reranker.serve.logs import ACCESS_LOGGER, JsonFormatter, TextFormatter, logging_config
from tests.serve.helpers import body


def test_one_access_line_per_request_without_the_query(client, caplog):
    caplog.set_level(logging.DEBUG, logger=ACCESS_LOGGER)
    client.post("/rerank", json=body(3, query="secret customer query"), headers={"X-Request-ID": "log-1"})
    lines = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert len(lines) == 1
    record = lines[0]
    assert record.levelno == logging.INFO
    assert (record.method, record.path, record.status, record.request_id) == ("POST", "/rerank", 200, "log-1")
    assert record.num_candidates == 3
    assert record.client == "testclient"
    assert record.latency_ms > 0
    info_text = " ".join(
        r.getMessage() + str(r.__dict__) for r in caplog.records if r.levelno >= logging.INFO
    )
    assert "secret customer query" not in info_text


def test_probes_log_at_debug(client, caplog):
    caplog.set_level(logging.DEBUG, logger=ACCESS_LOGGER)
    client.get("/health")
    assert [r.levelno for r in caplog.records if r.name == ACCESS_LOGGER] == [logging.DEBUG]


def _record(**extra) -> logging.LogRecord:
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 1, "POST %s %d", ("/rerank", 200), None)
    record.__dict__.update(extra)
    return record


def test_json_formatter_writes_one_object_with_the_extras():
    line = JsonFormatter().format(_record(request_id="r1", latency_ms=1.5, num_candidates=None))
    data = json.loads(line)
    assert data["message"] == "POST /rerank 200"
    assert data["level"] == "INFO"
    assert data["logger"] == ACCESS_LOGGER
    assert data["request_id"] == "r1"
    assert data["latency_ms"] == 1.5
    assert data["num_candidates"] is None
    assert "ts" in data
    assert "\n" not in line


def test_text_formatter_appends_key_values():
    line = TextFormatter().format(_record(request_id="r1", status_code=200))
    assert line.endswith("POST /rerank 200 request_id=r1 status_code=200")


def test_logging_config_rejects_unknown_formats():
    assert logging_config("INFO", "json")["formatters"]["default"]["()"].endswith("JsonFormatter")
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        logging_config("INFO", "xml")
