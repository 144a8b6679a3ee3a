"""``distill`` end to end: a stacked teacher -> stock students that stock libraries and Reranker load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from esci_reranker.distill import distill, load_distill_config
from esci_reranker.distill.run import LOG_NAME, MODEL_DIR, PAIRS_NAME, SUMMARY_NAME
from esci_reranker.distill.teacher import CACHE_META_NAME, CACHE_NAME
from esci_reranker.labels import ESCI_GAINS, ESCI_LABELS
from esci_reranker.reranker import Reranker

PAIRS = [
    ("red running shoes", "Nike Air Zoom Pegasus | Nike | Red"),
    ("usb c cable", "Anker USB-C to USB-C cable, 6 ft | Anker"),
    ("coffee", "x"),
    ("hiking boots waterproof", "Merrell Moab 3 mid waterproof hiking boot " * 12),  # cut at max_length
]


@pytest.fixture(scope="module")
def score_run(
    stacked_teacher: Path, tiny_student_overrides: list[str], tmp_path_factory: pytest.TempPathFactory
):
    cfg = load_distill_config("configs/distill_score.yaml", tiny_student_overrides)
    out = tmp_path_factory.mktemp("distill") / "student-score"
    lines: list[str] = []
    return distill(stacked_teacher, cfg, out, progress=False, log=lines.append), out, lines


@pytest.fixture(scope="module")
def esci_run(
    stacked_teacher: Path, tiny_student_overrides: list[str], tmp_path_factory: pytest.TempPathFactory
):
    cfg = load_distill_config("configs/distill_esci.yaml", tiny_student_overrides)
    out = tmp_path_factory.mktemp("distill") / "student-esci"
    return distill(stacked_teacher, cfg, out, progress=False, log=lambda _line: None), out


def test_score_student_is_a_stock_one_label_classifier(score_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result, out, _ = score_run
    assert result.model_dir == out / MODEL_DIR
    config = json.loads((out / MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "score"}
    assert config["esci_reranker"]["model_type"] == "esci-cross-encoder"
    model = AutoModelForSequenceClassification.from_pretrained(out / MODEL_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / MODEL_DIR)
    assert tokenizer.model_max_length == 32  # the trained pair length travels with the tokenizer
    batch = tokenizer(
        [q for q, _ in PAIRS], [t for _, t in PAIRS], truncation=True, padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        logits = model(**batch).logits[:, 0].numpy()
    preds = Reranker.from_pretrained(out / MODEL_DIR, device="cpu").predict(PAIRS)
    assert preds.truncated.tolist() == [False, False, False, True]
    np.testing.assert_allclose(logits, preds.scores, atol=1e-4)
    assert np.isnan(preds.expected_gains).all()  # a score student has no classes


def test_score_student_ranks_with_sentence_transformers_like_ours(score_run):
    from sentence_transformers import CrossEncoder

    result, _, _ = score_run
    cross_encoder = CrossEncoder(str(result.model_dir))
    reranker = Reranker.from_pretrained(result.model_dir, device="cpu")
    np.testing.assert_allclose(cross_encoder.predict(PAIRS), reranker.predict(PAIRS).scores, atol=1e-4)
    docs = [t for _, t in PAIRS[:3]]
    ranked = cross_encoder.rank("red running shoes", docs)
    ours = reranker.rerank("red running shoes", [(str(i), d) for i, d in enumerate(docs)])
    assert [r["corpus_id"] for r in ranked] == [int(c.product_id) for c in ours]


def test_score_student_scores_on_the_teachers_scale(score_run):
    result, out, _ = score_run
    summary = result.summary
    scale = summary["standardisation"]
    teacher = pd.read_parquet(out / CACHE_NAME)
    assert scale["mean"] == pytest.approx(
        teacher.merge(
            pd.read_parquet(out / PAIRS_NAME).query("split == 'train'"), on=["query_id", "product_id"]
        )["t_score"].mean()
    )
    # the standardisation is folded into the last layer: the saved bias is std * b + mean
    from safetensors import safe_open

    with safe_open(str(out / MODEL_DIR / "model.safetensors"), "pt") as weights:
        bias = float(weights.get_tensor("classifier.bias")[0])
    assert abs(bias - scale["mean"]) < 10 * scale["std"]


def test_esci_student_is_a_stock_four_label_classifier_ranking_by_expected_gain(esci_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result, _out = esci_run
    model = AutoModelForSequenceClassification.from_pretrained(result.model_dir).eval()
    assert model.config.id2label == dict(enumerate(ESCI_LABELS))
    assert model.config.label2id == {label: i for i, label in enumerate(ESCI_LABELS)}
    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    batch = tokenizer(
        [q for q, _ in PAIRS], [t for _, t in PAIRS], truncation=True, padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        probs = model(**batch).logits.softmax(-1).numpy()
    reranker = Reranker.from_pretrained(result.model_dir, device="cpu")
    preds = reranker.predict(PAIRS)
    np.testing.assert_allclose(probs, preds.esci_probs, atol=1e-4)
    gains = probs @ np.array([ESCI_GAINS[c] for c in ESCI_LABELS])
    np.testing.assert_allclose(preds.scores, gains, atol=1e-4)  # ranks by the expected gain
    np.testing.assert_allclose(preds.substitute_probs, probs[:, 1], atol=1e-4)  # Task 3 = P(S)
    assert preds.esci_classes.tolist() == [ESCI_LABELS[i] for i in probs.argmax(1)]
    threshold = json.loads((result.model_dir / "config.json").read_text())["esci_reranker"][
        "substitute_threshold"
    ]
    assert reranker.substitute_threshold == pytest.approx(threshold)
    assert 0.0 <= threshold <= 1.0
    assert result.summary["substitute_threshold"] == pytest.approx(threshold)
    rules = result.summary["decision_rules"]  # the shipped config: the plain argmax, no offsets
    assert rules["fitted"] is False
    assert rules["class_offsets"] == dict.fromkeys(ESCI_LABELS, 0.0)
    assert reranker.info()["model_type"] == "esci-classifier"


def test_output_folder_layout_and_training_log(score_run, distill_data: Path):
    result, out, lines = score_run
    assert {p.name for p in out.iterdir()} >= {
        MODEL_DIR,
        CACHE_NAME,
        CACHE_META_NAME,
        PAIRS_NAME,
        LOG_NAME,
        SUMMARY_NAME,
    }
    assert (out / MODEL_DIR / SUMMARY_NAME).is_file()
    records = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    val = [r for r in records if r["type"] == "val"]
    assert [r["step"] for r in val] == [0, 2, 4]
    assert {"val_loss", "val_mse", "val_listnet", "val_ndcg"} <= set(val[0])
    assert result.summary["best_step"] in (0, 2, 4)
    assert result.summary["teacher"]["stacked"] is True
    assert result.summary["excluded_for_test"] == {"test_product": 1, "test_query": 1}
    pairs = pd.read_parquet(out / PAIRS_NAME)
    assert set(pairs["split"]) == {"train", "val"}
    assert pairs.groupby("query_id")["split"].nunique().eq(1).all()  # split by query
    test = pd.read_parquet(distill_data / "test.parquet")
    assert not set(pairs["product_id"]) & set(test["product_id"])
    assert any("distillation pairs:" in line for line in lines)


def test_rerun_reads_the_cached_teacher_outputs(score_run, stacked_teacher: Path, tiny_student_overrides):
    _, out, _ = score_run
    lines: list[str] = []
    cfg = load_distill_config("configs/distill_score.yaml", [*tiny_student_overrides, "optim.max_steps=1"])
    again = distill(stacked_teacher, cfg, out, progress=False, log=lines.append)
    assert again.summary["teacher_outputs_cached"] is True
    assert any("read from" in line for line in lines)


def test_student_serves_evaluation_through_reranker(esci_run, distill_data: Path):
    from esci_reranker.eval.evaluator import evaluate_run
    from esci_reranker.eval.runner import predictions_frame

    result, _ = esci_run
    reranker = Reranker.from_pretrained(result.model_dir, device="cpu")
    metrics = evaluate_run(
        predictions_frame(reranker, pd.read_parquet(distill_data / "val.parquet"), progress=False)
    )
    assert {"task1", "task2", "task3"} <= set(metrics)


def test_esci_student_needs_a_teacher_with_classes(
    tiny_single_task_checkpoint: Path, tiny_student_overrides: list[str], tmp_path: Path
):
    cfg = load_distill_config("configs/distill_esci.yaml", tiny_student_overrides)
    with pytest.raises(ValueError, match="this teacher has no class outputs"):
        distill(tiny_single_task_checkpoint, cfg, tmp_path, progress=False, log=lambda _line: None)


def test_students_serve_through_the_http_service(score_run, esci_run):
    from fastapi.testclient import TestClient

    from esci_reranker.serve.app import create_app
    from esci_reranker.serve.settings import load_settings

    body = {
        "query": "red running shoes",
        "candidates": [
            {"product_id": "a", "title": "Nike Pegasus", "brand": "Nike", "color": "red"},
            {"product_id": "b", "text": "Shoe polish kit"},
        ],
    }
    for result, classes in ((score_run[0], False), (esci_run[0], True)):
        reranker = Reranker.from_pretrained(result.model_dir, device="cpu")
        with TestClient(create_app(load_settings(), reranker)) as client:
            ranked = client.post("/rerank", json=body)
            assert ranked.status_code == 200, ranked.text
            expected = {c.product_id: c.score for c in reranker.rerank(body["query"], body["candidates"])}
            got = {r["product_id"]: r["score"] for r in ranked.json()["ranked"]}
            assert got == pytest.approx(expected, abs=1e-5)
            classify = client.post("/classify", json=body)
            assert classify.status_code == (200 if classes else 409)


def test_bf16_trained_student_leaves_training_as_a_plain_fp32_module(
    stacked_teacher: Path,
    tiny_student_overrides: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    """Under bf16 mixed precision accelerate patches the module's own forward with autocast. The
    student must leave training without it: the export check compares it with its fp32 stock copy
    (on an AMX / AVX-512 BF16 host a real student differed by 3e-3 and was refused), and every
    other library runs the student in fp32. The tiny model's outputs are tiny, so the check here
    is relative to their size."""
    from esci_reranker.distill import run as run_module
    from esci_reranker.model.export import build_sequence_classifier
    from esci_reranker.model.features import pair_encoder_for

    results = []
    real = run_module.train_student

    def recording(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(run_module, "train_student", recording)
    cfg = load_distill_config("configs/distill_score.yaml", [*tiny_student_overrides, "mixed_precision=bf16"])
    distill(stacked_teacher, cfg, tmp_path / "out", progress=False, log=lambda _line: None)
    (result,) = results
    student = result.model
    encoder = pair_encoder_for(result.tokenizer, student.config)
    batch = encoder.collate(encoder.encode([q for q, _ in PAIRS], [t for _, t in PAIRS]), range(len(PAIRS)))
    stock = build_sequence_classifier(student, "score").eval()
    with torch.inference_mode():
        ours = student(**batch).score
        theirs = stock(**batch).logits[:, 0]
    assert ours.dtype == torch.float32
    # accelerate keeps the fp32 module's forward in ``_original_forward`` while it patches it.
    assert not hasattr(student, "_original_forward")
    scale = float(theirs.abs().max())
    assert scale > 0
    # fp32 against fp32: equal here; the autocast-patched forward differed by ~3e-6 of the scale.
    assert float((ours - theirs).abs().max()) <= 1e-6 * scale
    assert (tmp_path / "out" / MODEL_DIR / "config.json").is_file()
