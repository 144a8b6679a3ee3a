"""CLI glue of the speed work: `export --format onnx [--quantize int8]` and `bench` (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esci_reranker.cli.inference import EXPORT_FORMATS
from esci_reranker.reranker import Reranker
from tests.cli.helpers import assert_fails, run

pytest.importorskip("onnxruntime")


BENCH_KEYS = {
    "model_dir",
    "model",
    "machine",
    "settings",
    "flops_per_pair",
    "roofline_fp32_gflops",
    "roofline_rounds_gflops",
    "roofline_matrix_size",
    "backends",
    "int8_ndcg_loss",
    "server_latency",
}


def test_export_onnx_int8_loads_with_the_reranker_and_ranks(tiny_checkpoint: Path, tmp_path: Path):
    assert EXPORT_FORMATS["onnx"] == "esci_reranker.model.onnx:export_onnx"
    out = tmp_path / "onnx-int8"
    result = run("export", "--model", tiny_checkpoint, "--format", "onnx", "--quantize", "int8", "--out", out)
    assert result.exit_code == 0, result.output
    assert "as onnx (int8)" in result.output
    assert (out / "model_int8.onnx").is_file()
    assert json.loads((out / "onnx.json").read_text())["quantize"] == "int8"

    reranker = Reranker.from_pretrained(out, device="cpu")  # no backend=: an ONNX-only folder
    assert reranker.backend == "onnx"
    ranked = reranker.rerank(
        "red running shoes", [("a", "red running shoes | Nike"), ("b", "coffee mug"), ("c", "blue hat")]
    )
    assert sorted(c.product_id for c in ranked) == ["a", "b", "c"]
    assert [c.rank for c in ranked] == [1, 2, 3]
    assert all(c.esci_class in {"E", "S", "C", "I"} for c in ranked)


def test_quantize_is_only_for_onnx(tiny_checkpoint: Path, tmp_path: Path):
    assert_fails(
        run(
            "export", "--model", tiny_checkpoint, "--format", "hf-classifier", "--quantize", "int8",
            "--out", tmp_path / "x",
        ),
        "--quantize int8",
        "only --format onnx",
        "not hf-classifier",
    )  # fmt: skip
    assert_fails(
        run(
            "export", "--model", tiny_checkpoint, "--format", "onnx", "--quantize", "fp16",
            "--out", tmp_path / "y",
        ),
        "--quantize 'fp16'",
        "int8",
    )  # fmt: skip
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "y").exists()


SMALL_BENCH = ("--pairs", 8, "--repeats", 1, "--batch-size", 4, "--threads", 1, "--test-queries", 2)
SMALL_BENCH += ("--roofline-size", 64)


def test_bench_writes_json_with_the_expected_keys(tiny_checkpoint: Path, tmp_path: Path):
    out = tmp_path / "bench.json"
    result = run(
        "bench", "--model", tiny_checkpoint, "--out", out, *SMALL_BENCH,
        "--backends", "torch_fp32,onnx_int8", "--no-server",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "pairs/s" in result.output  # the table
    data = json.loads(out.read_text())
    assert set(data) >= BENCH_KEYS
    assert set(data["backends"]) == {"torch_fp32", "onnx_int8"}
    assert all(entry["status"] == "ok" for entry in data["backends"].values())
    assert data["settings"]["n_pairs"] == 8
    assert data["settings"]["threads"] == 1
    assert data["server_latency"]["status"] == "not measured"


def test_bench_rejects_bad_options(tiny_checkpoint: Path, tmp_path: Path):
    assert_fails(run("bench", "--model", tiny_checkpoint, "--backends", "tensorrt"), "tensorrt", "torch_fp32")
    assert_fails(run("bench", "--model", tiny_checkpoint, "--pairs", 0), "--pairs 0")
    assert_fails(run("bench", "--model", tmp_path / "nothing"), "no such checkpoint folder")
    assert_fails(
        run("bench", "--model", tiny_checkpoint, "--server-concurrency", "0"),
        "--server-concurrency '0'",
        "integers >= 1",
    )
    assert_fails(
        run("bench", "--model", tiny_checkpoint, "--server-concurrency", "1,x"), "'1,x'", "e.g. 1,2,3"
    )
    assert_fails(
        run("bench", "--model", tiny_checkpoint, "--server-precision", "fp16"), "--server-precision", "'fp16'"
    )


@pytest.mark.slow
def test_bench_with_server_reports_rerank_latency(tiny_checkpoint: Path, tmp_path: Path):
    pytest.importorskip("uvicorn")
    from esci_reranker.model.cpu import int8_available

    precision = "int8" if int8_available() else "fp32"  # the server loads with PRECISION=int8
    out = tmp_path / "bench.json"
    result = run(
        "bench", "--model", tiny_checkpoint, "--out", out, *SMALL_BENCH, "--backends", "torch_fp32",
        "--server", "--server-requests", 3, "--server-concurrency", 2, "--server-seconds", 60,
        "--server-precision", precision,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    server = json.loads(out.read_text())["server_latency"]
    assert server["status"] == "ok", server
    assert server["precision"] == precision
    assert server["endpoint"] == "/rerank"
    assert server["candidates_per_request"] == 40
    assert [(r["batching"], r["cache"], r["concurrency"]) for r in server["results"]] == [
        ("off", "off", 2),
        ("on", "off", 2),
    ]
    for setting in ("batching_off", "batching_on"):
        numbers = server["concurrency_2"][setting]
        assert numbers["requests"] == 3
        assert numbers["errors"] == 0
        assert numbers["p50_ms"] > 0
        assert numbers["p99_ms"] >= numbers["p50_ms"]
    assert "p99 ms" in result.output  # the server table
