"""The server-latency benchmark's settings (no server is started here; tests/cli/test_speed.py runs one)."""

from __future__ import annotations

import pytest

from esci_reranker.bench.server import ServerLatency, format_server_table, summarize


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


def test_summarize_compares_the_p50_with_the_anchor_median():
    load = {
        "latencies": [30.0, 10.0, 20.0],
        "errors": 0,
        "hits": [],
        "forward": [],
        "wall": 1.0,
        "timed_out": False,
    }
    result = summarize("off", "off", 1, load, anchor_ms=[10.0, 20.0, 16.0, 14.0])
    assert result.p50_ms == 20.0
    assert result.anchor_p50_ms == 15.0  # median of the anchor calls
    assert result.p50_vs_anchor == 1.333  # 20 / 15
    plain = summarize("off", "off", 1, load)
    assert (plain.anchor_p50_ms, plain.p50_vs_anchor) == (None, None)
    with pytest.raises(ValueError, match="anchor_calls=0"):
        ServerLatency(anchor_calls=0)


def _run_one_setting(checkpoint) -> tuple[dict, list[str]]:
    """One cheap setting (concurrency 1, batching off, cache off) of the real server benchmark."""
    lines: list[str] = []
    bench = ServerLatency(
        concurrency=(1,), batching=("off",), requests=3, distinct=3, threads=1, anchor_calls=2,
        max_seconds=60, echo=lines.append,
    )  # fmt: skip
    return bench(checkpoint), lines


@pytest.mark.slow
def test_server_latency_reports_the_in_process_anchor_per_setting(tmp_path):
    pytest.importorskip("uvicorn")
    pytest.importorskip("sentence_transformers")
    import torch

    from esci_reranker.model import save_checkpoint
    from tests.conftest import build_tiny_model

    model, tokenizer = build_tiny_model(pooling="cls", head_hidden=32)  # a stock cross-encoder
    checkpoint = save_checkpoint(model, tokenizer, tmp_path / "exportable")
    threads = torch.get_num_threads()
    block, lines = _run_one_setting(checkpoint)
    assert torch.get_num_threads() == threads  # the anchor's thread count is not left behind
    assert block["status"] == "ok", block
    anchor = block["anchor"]
    assert anchor["status"] == "ok", anchor
    assert anchor["kind"] == "export"
    assert anchor["service_extras"] == []
    assert (anchor["threads"], anchor["batch_size"], anchor["calls_per_setting"]) == (1, 40, 4)
    (result,) = block["results"]
    assert result["anchor_p50_ms"] > 0
    assert result["p50_vs_anchor"] > 0
    assert result["p50_vs_anchor"] == pytest.approx(result["p50_ms"] / result["anchor_p50_ms"], abs=6e-4)
    goal = block["concurrency_1"]["batching_off"]
    assert goal["anchor_p50_ms"] == result["anchor_p50_ms"]
    assert goal["p50_vs_anchor"] == result["p50_vs_anchor"]
    table = format_server_table(block)
    assert "p50/anchor" in table
    assert f"{result['p50_vs_anchor']:.2f}" in table
    assert "CrossEncoder.predict" in table
    assert "st-cross-encoder export" in table
    assert any("anchor" in line and "x)" in line for line in lines)  # the progress line


@pytest.mark.slow
def test_anchor_of_a_stacked_model_is_its_encoder_and_says_what_it_lacks(tiny_stacked_checkpoint, tmp_path):
    pytest.importorskip("sentence_transformers")
    from esci_reranker.bench.server import build_requests, load_anchor
    from esci_reranker.data.sample import sample_path

    predict, info = load_anchor(tiny_stacked_checkpoint, tmp_path, batch_size=40)
    assert predict is not None, info
    assert info["kind"] == "backbone-fallback"  # what bench.backends' anchor does for it
    assert "stacked" in info["export_error"]
    extras = info["service_extras"]
    assert any("stacker" in e for e in extras)
    assert any("towers" in e for e in extras)  # its cosine prior
    assert any("lexical" in e for e in extras)
    assert "fresh 1-label head" in info["label"]
    assert "stacker" in info["label"]
    assert "includes their cost" in info["label"]
    (body,) = build_requests(sample_path(), candidates=40, distinct=1)
    texts = [c["text"] for c in body["candidates"]]
    assert len(predict([body["query"]] * 40, texts)) == 40


def test_anchor_is_reported_missing_for_a_folder_that_is_not_a_checkpoint(tmp_path):
    from esci_reranker.bench.server import load_anchor

    predict, info = load_anchor("org/some-hub-model", tmp_path, batch_size=40)
    assert predict is None
    assert info["status"] == "skipped"
    assert "local checkpoint folder" in info["reason"]
    (tmp_path / "empty").mkdir()
    predict, info = load_anchor(tmp_path / "empty", tmp_path, batch_size=40)
    assert predict is None
    assert info["status"] == "failed"
    assert "empty" in info["reason"]
