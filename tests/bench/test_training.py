"""`bench-train`: the training step padded and padding-free on real sample batches, table and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.helpers import assert_fails, run

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "multi_task.yaml"


def test_bench_train_times_both_steps_on_the_same_batches(tiny_backbone: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    result = run(
        "bench-train", "--config", CONFIG, "--set", f"model.backbone={tiny_backbone}", "--out", out,
        "--batches", 2, "--repeats", 2, "--precisions", "fp32", "--roofline-size", 64, "--no-memory",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    variants = data["variants"]
    assert set(variants) == {
        "padded_fp32",
        "packed_torch_dropout_fp32",
        "packed_torch_linear_fp32",
        "packed_fp32",
    }
    work = data["work"]
    # the default's query-slice batches of the sample: 2 batches of at most 32 pairs
    assert 2 < work["pairs_per_round"] <= 64
    assert 0 < work["real_tokens_per_round"] < work["padded_tokens_per_round"]
    assert work["training_flops_per_pair"] == pytest.approx(3 * work["forward_flops_per_pair"])
    for name, entry in variants.items():
        assert entry["status"] == "ok", name
        assert len(entry["seconds"]) == 2
        rate = work["pairs_per_round"] / min(entry["seconds"])
        assert entry["pairs_per_second"] == pytest.approx(rate)
        # both variants are credited the same useful work
        assert entry["gflops"] == pytest.approx(
            work["training_flops_per_pair"] * entry["pairs_per_second"] / 1e9
        )
        assert entry["roofline_share"] == pytest.approx(entry["gflops"] / data["roofline_fp32_gflops"])
        assert entry["peak_rss_mb"] is None
    ratio = variants["packed_fp32"]["pairs_per_second"] / variants["padded_fp32"]["pairs_per_second"]
    assert data["speedup"]["fp32"] == pytest.approx(ratio)
    masks = (
        variants["packed_fp32"]["pairs_per_second"]
        / variants["packed_torch_dropout_fp32"]["pairs_per_second"]
    )
    assert data["dropout_speedup"]["fp32"] == pytest.approx(masks)
    linears = (
        variants["packed_fp32"]["pairs_per_second"] / variants["packed_torch_linear_fp32"]["pairs_per_second"]
    )
    assert data["linear_speedup"]["fp32"] == pytest.approx(linears)
    assert "of which oneDNN's linear layers: fp32" in result.output
    assert "padded_fp32" in result.output
    assert "speed-up of the padding-free step" in result.output
    assert "of which the faster dropout masks: fp32" in result.output
    optimizer = data["optimizer_step_ms"]
    assert optimizer["per_parameter"] > 0
    assert optimizer["fused"] > 0
    assert optimizer["speedup"] == pytest.approx(optimizer["per_parameter"] / optimizer["fused"])
    assert "AdamW update:" in result.output


def test_bench_train_rejects_bad_options(tmp_path: Path) -> None:
    assert_fails(run("bench-train", "--batches", 0), "--batches 0")
    assert_fails(run("bench-train", "--precisions", "fp16"), "--precisions 'fp16'")
    assert_fails(run("bench-train", "--config", tmp_path / "none.yaml"), "no such file")


def test_frozen_layers_are_credited_a_forward_pass_only():
    """bench-train's FLOP count with ``model.freeze_layers``: a frozen layer runs forward only, a
    trainable one forward and a backward twice its size."""
    from esci_reranker.bench.training import TRAINING_FLOPS_FACTOR, training_flops_factor

    assert training_flops_factor(6, 0) == TRAINING_FLOPS_FACTOR == 3.0
    assert training_flops_factor(6, 3) == pytest.approx(2.0)
    assert training_flops_factor(6, 6) == pytest.approx(1.0)
