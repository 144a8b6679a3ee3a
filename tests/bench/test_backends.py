"""Smoke test of the backend benchmark on the tiny checkpoint: JSON shape and sane values, no timings."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("sentence_transformers")

from esci_reranker.bench import (
    ANCHOR,
    BACKENDS,
    ONNX_FP32,
    ONNX_INT8,
    TORCH_BF16,
    TORCH_FP32,
    TORCH_INT8,
    candidate_lists,
    encoder_flops,
    format_table,
    run_backend_bench,
)
from esci_reranker.hardware import cpu_bf16_support
from esci_reranker.model.cpu import int8_available
from esci_reranker.model.onnx import CROSS_ENCODER_STAGE, WHOLE_MODEL


def test_encoder_flops_follows_the_formula():
    # L·(T·2·(4H² + 2HI) + 4·T²·H) for T=3, L=2, H=4, I=8: 2·(3·2·(64 + 64) + 4·9·4) = 1824
    assert encoder_flops([3], layers=2, hidden=4, intermediate=8) == 1824.0
    assert encoder_flops([3, 3], 2, 4, 8) == 2 * 1824.0
    assert encoder_flops([], 2, 4, 8) == 0.0


def test_workload_is_whole_candidate_lists_of_random_queries():
    import pandas as pd

    frame = pd.DataFrame({"query_id": [5, 5, 7, 9, 7, 9, 9, 5]}, index=[10, 11, 12, 13, 14, 15, 16, 17])
    rows = candidate_lists(frame, n_pairs=8)
    picked = frame["query_id"].to_numpy()[rows]
    # every query's rows together, in their original order, each list whole
    assert sorted(rows.tolist()) == list(range(8))
    blocks = [q for i, q in enumerate(picked) if i == 0 or picked[i - 1] != q]
    assert sorted(blocks) == [5, 7, 9]
    for q in (5, 7, 9):
        positions = rows[picked == q].tolist()
        assert positions == sorted(positions)
    # cut to n_pairs: the first lists whole, only the last one short; same seed, same draw
    short = candidate_lists(frame, n_pairs=4)
    assert short.tolist() == rows[:4].tolist()
    assert candidate_lists(frame, 8, seed=0).tolist() == rows.tolist()


#: The smallest settings that still run every part of the backend benchmark: one round of 8 pairs
#: on one thread, nothing written or printed.
SMALL_BENCH: dict[str, Any] = {
    "out_json": None,
    "batch_size": 8,
    "n_pairs": 8,
    "repeats": 1,
    "threads": 1,
    "test_queries": 2,
    "roofline_size": 64,
    "echo": None,
}


def _small_bench(checkpoint: Path, backends: Sequence[str], **settings: Any) -> dict[str, Any]:
    """``run_backend_bench`` of ``backends`` on ``checkpoint`` with ``SMALL_BENCH``'s settings,
    then ``settings`` over them."""
    return run_backend_bench(checkpoint, backends=backends, **(SMALL_BENCH | settings))


@pytest.mark.slow
def test_backend_bench_writes_sane_json(tiny_checkpoint, tmp_path):
    lines: list[str] = []
    out = tmp_path / "bench.json"
    result = _small_bench(
        tiny_checkpoint, BACKENDS, out_json=out, n_pairs=12, repeats=2, roofline_size=128, echo=lines.append
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["settings"]["n_pairs"] == 12
    assert result["settings"]["threads"] == 1
    assert result["settings"]["test_queries"] == 2
    assert result["roofline_fp32_gflops"] > 0
    assert result["flops_per_pair"]["pair_only"] > 0

    backends = result["backends"]
    expected = {TORCH_FP32, ONNX_FP32, ONNX_INT8, ANCHOR} | ({TORCH_BF16} if cpu_bf16_support()[0] else set())
    expected |= {TORCH_INT8} if int8_available() else set()
    ok = {name for name, e in backends.items() if e["status"] == "ok"}
    assert ok == expected
    for name in ok:
        e = backends[name]
        assert len(e["seconds"]) == 2
        assert e["pairs_per_second"] > 0
        assert e["vs_anchor"] > 0
        assert e["roofline_share"] > 0
        assert e["gflops"] == pytest.approx(e["roofline_share"] * result["roofline_fp32_gflops"])
    # the tiny model's mean pooling is not a stock cross-encoder: the anchor falls back, says so
    assert backends[ANCHOR]["kind"] == "backbone-fallback"
    assert backends[ANCHOR]["ndcg"] is None
    assert backends[ANCHOR]["vs_anchor"] == 1.0
    for name in ok - {ANCHOR}:
        assert 0 < backends[name]["ndcg"] <= 1
    # fp32 ONNX scores equal torch's; int8 is close
    assert backends[ONNX_FP32]["max_abs_score_diff_vs_torch_fp32"] < 1e-4
    assert backends[ONNX_FP32]["ndcg"] == pytest.approx(backends[TORCH_FP32]["ndcg"], abs=1e-9)
    assert backends[ONNX_INT8]["score_corr_vs_torch_fp32"] > 0.95
    loss = result["int8_ndcg_loss"]["vs_onnx_fp32"]
    assert math.isfinite(loss)
    assert loss == pytest.approx(backends[ONNX_FP32]["ndcg"] - backends[ONNX_INT8]["ndcg"])
    if TORCH_INT8 in ok:  # int8 torch: close to fp32 torch, not equal to it (int8 really ran)
        assert backends[TORCH_INT8]["score_corr_vs_torch_fp32"] > 0.95
        assert backends[TORCH_INT8]["max_abs_score_diff_vs_torch_fp32"] > 1e-6
        loss = result["int8_ndcg_loss"]["torch_int8_vs_torch_fp32"]
        assert loss == pytest.approx(backends[TORCH_FP32]["ndcg"] - backends[TORCH_INT8]["ndcg"])
    assert result["server_latency"]["status"] == "not measured"
    table = format_table(result)
    assert table in lines
    assert all(name in table for name in backends)


@pytest.mark.slow
def test_anchor_uses_the_st_export_when_the_model_is_exportable(tmp_path):
    from esci_reranker.model import save_checkpoint
    from tests.conftest import build_tiny_model

    model, tokenizer = build_tiny_model(pooling="cls", head_hidden=32)
    checkpoint = save_checkpoint(model, tokenizer, tmp_path / "exportable")
    result = _small_bench(checkpoint, [TORCH_FP32, ANCHOR])
    anchor = result["backends"][ANCHOR]
    assert anchor["kind"] == "export"
    # the same weights and head: CrossEncoder.predict ranks exactly like the reranker
    assert anchor["ndcg"] == pytest.approx(result["backends"][TORCH_FP32]["ndcg"], abs=1e-9)
    assert set(result["backends"]) == {TORCH_FP32, ANCHOR}
    assert result["int8_ndcg_loss"] == {
        "vs_onnx_fp32": None,
        "vs_torch_fp32": None,
        "torch_int8_vs_torch_fp32": None,
    }


@pytest.mark.slow
def test_onnx_rows_of_a_stacked_checkpoint_are_its_cross_encoder_stage(tiny_stacked_checkpoint, tmp_path):
    result = _small_bench(tiny_stacked_checkpoint, [TORCH_FP32, ONNX_FP32, ONNX_INT8])
    backends = result["backends"]
    assert backends[TORCH_FP32]["stage"] == WHOLE_MODEL  # the torch row runs the stacker too
    for name in (ONNX_FP32, ONNX_INT8):
        assert backends[name]["stage"] == CROSS_ENCODER_STAGE
        assert "cross-encoder stage only (no stacker)" in backends[name]["note"]
        # different stages: no score comparison with the stacked torch row
        assert "max_abs_score_diff_vs_torch_fp32" not in backends[name]
        assert 0 < backends[name]["ndcg"] <= 1
    loss = result["int8_ndcg_loss"]
    assert loss["vs_torch_fp32"] is None
    assert loss["vs_onnx_fp32"] == pytest.approx(backends[ONNX_FP32]["ndcg"] - backends[ONNX_INT8]["ndcg"])
    assert "cross-encoder stage only" in format_table(result)
