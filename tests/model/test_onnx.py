"""ONNX export and the ONNX Runtime backend, on tiny random models (fp32 equals torch; int8 ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from esci_reranker.data.sample import sample_path  # noqa: E402
from esci_reranker.data.text import product_texts  # noqa: E402
from esci_reranker.model import CheckpointError, ModelConfig, PairEncoder, load_checkpoint, save_checkpoint  # noqa: E402
from esci_reranker.model.export import ExportError  # noqa: E402
from esci_reranker.model.onnx import (  # noqa: E402
    CROSS_ENCODER_STAGE,
    EXPORT_TOLERANCE,
    ONNX_INT8_NAME,
    ONNX_META_NAME,
    ONNX_NAME,
    WHOLE_MODEL,
    export_onnx,
    load_onnx_runner,
    resolve_backend,
)
from esci_reranker.reranker import Reranker  # noqa: E402
from tests.conftest import build_tiny_model  # noqa: E402

# Varied lengths, one longer than the tiny models' max_length of 64 tokens (truncated).
QUERIES = [
    "red running shoes",
    "usb c cable 2m braided fast charging for phone and laptop",
    "x",
    "coffee",
    "wireless noise cancelling headphones over ear",
    "lamp",
    "dog food grain free",
]
TEXTS = [
    "Nike Air Zoom | Nike | Red",
    "Anker USB-C to USB-C cable, 6 ft | Anker | White",
    "y",
    "Ground coffee, 1 lb bag | Peet's | " + "dark roast arabica beans " * 12,
    "Sony WH-1000XM4 Wireless Noise Canceling Overhead Headphones | Sony | Black",
    "Desk lamp LED dimmable | TaoTronics",
    "Blue Buffalo Wilderness High Protein Grain Free Natural Adult Dry Dog Food | Blue Buffalo",
]


@pytest.fixture(scope="module")
def prior_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cosine + lexical prior model whose heads also read the pair (heads start at zero otherwise)."""
    model, tokenizer = build_tiny_model(prior="cosine", lexical=True, seed=1)
    with torch.no_grad():
        for head in (model.score_head, model.esci_head, model.substitute_head):
            torch.nn.init.normal_(head.proj.weight, std=0.5)
            torch.nn.init.normal_(head.prior_weight, std=1.0)
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny-prior-heads")


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint: Path, tiny_single_task_checkpoint: Path, prior_checkpoint: Path) -> dict:
    return {"multi": tiny_checkpoint, "single": tiny_single_task_checkpoint, "prior": prior_checkpoint}


@pytest.fixture(scope="module")
def exported(checkpoints: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """fp32 ONNX folders of the three tiny models, plus an int8 one of the multi-task model."""
    out = tmp_path_factory.mktemp("onnx")
    folders = {kind: export_onnx(ckpt, out / kind) for kind, ckpt in checkpoints.items()}
    folders["int8"] = export_onnx(checkpoints["multi"], out / "int8", quantize="int8")
    return folders


def _torch_outputs(model, batch: dict) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        out = model(**batch)
    result = {"score": out.score.numpy()}
    if out.esci_logits is not None:
        result["esci_logits"] = out.esci_logits.numpy()
        result["substitute_logit"] = out.substitute_logit.numpy()
    return result


@pytest.mark.parametrize("kind", ["multi", "single", "prior"])
def test_fp32_onnx_equals_torch_on_every_output_and_batch_size(kind, checkpoints, exported):
    model, tokenizer = load_checkpoint(checkpoints[kind])
    config, _, runner = load_onnx_runner(exported[kind], "cpu", num_threads=1)
    assert config == model.config
    encoder = PairEncoder(tokenizer, config)
    encoded = encoder.encode(QUERIES, TEXTS)
    assert any(encoded.truncated)
    # all 7 (traced with 2), one pair alone, and a batch without padding in the pair input
    for index in (list(range(7)), [3], [2], [0, 4, 5], [5, 5]):
        batch = encoder.collate(encoded, index)
        ours, theirs = _torch_outputs(model, batch), runner(batch)
        assert sorted(theirs) == sorted(ours)
        for name, value in ours.items():
            assert theirs[name].dtype == np.float32
            assert theirs[name].shape == value.shape
            np.testing.assert_allclose(theirs[name], value, atol=1e-4, rtol=0, err_msg=f"{kind} {name}")


def test_graph_has_the_model_inputs_with_separate_dynamic_axes(exported):
    graph = onnx.load(str(exported["prior"] / ONNX_NAME)).graph
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {
        "input_ids": ["batch", "pair_seq"],
        "attention_mask": ["batch", "pair_seq"],
        "token_type_ids": ["batch", "pair_seq"],
        "query_input_ids": ["query_batch", "query_seq"],
        "query_attention_mask": ["query_batch", "query_seq"],
        "query_index": ["batch"],
        "product_input_ids": ["product_batch", "product_seq"],
        "product_attention_mask": ["product_batch", "product_seq"],
        "product_index": ["batch"],
        "lexical": ["batch"],
    }
    assert {i.name: i.type.tensor_type.elem_type for i in graph.input}["lexical"] == onnx.TensorProto.FLOAT
    assert [o.name for o in graph.output] == ["score", "esci_logits", "substitute_logit"]
    single = onnx.load(str(exported["single"] / ONNX_NAME)).graph
    assert [o.name for o in single.output] == ["score"]
    assert "query_input_ids" not in {i.name for i in single.input}


def test_graphs_without_tower_index_inputs_get_one_tower_row_per_pair():
    """Folders exported before the towers were deduplicated declare no ``*_index`` inputs."""
    from types import SimpleNamespace

    from esci_reranker.model.onnx import _feed

    names = ["input_ids", "query_input_ids", "query_attention_mask", "product_input_ids"]
    session = SimpleNamespace(
        get_inputs=lambda: [SimpleNamespace(name=n, type="tensor(int64)") for n in names]
    )
    batch = {
        "input_ids": torch.zeros(3, 4, dtype=torch.long),
        "query_input_ids": torch.tensor([[7, 8], [9, 0]]),
        "query_attention_mask": torch.tensor([[1, 1], [1, 0]]),
        "query_index": torch.tensor([1, 0, 1]),
        "product_input_ids": torch.tensor([[5], [6], [4]]),
        "product_attention_mask": torch.ones(3, 1, dtype=torch.long),
        "product_index": torch.tensor([0, 1, 2]),
    }
    feed = _feed(session, batch)
    assert sorted(feed) == sorted(names)
    assert feed["query_input_ids"].tolist() == [[9, 0], [7, 8], [9, 0]]
    assert feed["query_attention_mask"].tolist() == [[1, 0], [1, 1], [1, 0]]
    assert feed["product_input_ids"].tolist() == [[5], [6], [4]]


def test_folder_holds_config_sidecar_and_tokenizer(exported, tiny_checkpoint):
    folder = exported["multi"]
    assert ModelConfig.load(folder) == ModelConfig.load(tiny_checkpoint)  # config.json unchanged
    meta = json.loads((folder / ONNX_META_NAME).read_text())
    assert meta["file"] == ONNX_NAME
    assert meta["quantize"] is None
    assert meta["opset"] == 17
    assert 0 <= meta["max_abs_diff_fp32_vs_torch"] <= EXPORT_TOLERANCE
    assert meta["stage"] == WHOLE_MODEL
    assert "It holds the checkpoint's whole model." in (folder / "README.md").read_text()
    assert (folder / "tokenizer.json").is_file()
    assert not (folder / "model.safetensors").exists()


def test_stacked_checkpoint_is_refused_unless_its_first_stage_is_asked_for(
    tiny_stacked_checkpoint: Path, tmp_path: Path
):
    stacked = tiny_stacked_checkpoint
    with pytest.raises(ExportError) as err:
        export_onnx(stacked, tmp_path / "refused")
    message = str(err.value)
    for fragment in (
        f"export --format onnx: {stacked} is a stacked model",
        "the ONNX graph would hold the cross-encoder alone and score differently",
        f"esci-reranker distill --teacher {stacked}",
        "pass --cross-encoder-only",
    ):
        assert fragment in message
    assert not (tmp_path / "refused").exists()

    folder = export_onnx(stacked, tmp_path / "first-stage", cross_encoder_only=True)
    meta = json.loads((folder / ONNX_META_NAME).read_text())
    assert meta["stage"] == CROSS_ENCODER_STAGE
    assert "stacker" in meta["stage_note"]
    readme = (folder / "README.md").read_text()
    assert "**This is the first stage of a stacked model only.**" in readme
    assert "--cross-encoder-only" in readme
    assert not (folder / "stacker").exists()
    # it scores as the checkpoint's cross-encoder does without its stacker
    pairs = list(zip(QUERIES, TEXTS, strict=True))
    first = Reranker.from_pretrained(stacked, device="cpu", stacked=False).predict(pairs)
    onnx_preds = Reranker.from_pretrained(folder, device="cpu").predict(pairs)
    np.testing.assert_allclose(onnx_preds.scores, first.scores, atol=1e-4)
    np.testing.assert_allclose(onnx_preds.esci_probs, first.esci_probs, atol=1e-4)


@pytest.mark.parametrize("kind", ["multi", "single", "prior"])
def test_reranker_onnx_backend_predicts_like_torch_backend(kind, checkpoints, exported):
    pairs = list(zip(QUERIES, TEXTS, strict=True))
    torch_preds = Reranker.from_pretrained(checkpoints[kind], device="cpu", batch_size=3).predict(pairs)
    onnx_reranker = Reranker.from_pretrained(exported[kind], device="cpu", batch_size=3, backend="onnx")
    assert onnx_reranker.info()["backend"] == "onnx"
    onnx_preds = onnx_reranker.predict(pairs)
    np.testing.assert_allclose(onnx_preds.scores, torch_preds.scores, atol=1e-4)
    np.testing.assert_allclose(onnx_preds.esci_probs, torch_preds.esci_probs, atol=1e-4)
    np.testing.assert_allclose(onnx_preds.substitute_probs, torch_preds.substitute_probs, atol=1e-4)
    np.testing.assert_array_equal(onnx_preds.truncated, torch_preds.truncated)


def test_default_backend_loads_an_onnx_only_folder_as_onnx(exported, tiny_checkpoint):
    assert resolve_backend(exported["multi"], "torch") == "onnx"
    assert resolve_backend(tiny_checkpoint, "torch") == "torch"
    reranker = Reranker.from_pretrained(exported["int8"], device="cpu")
    assert reranker.backend == "onnx"
    assert reranker.model is None


def test_int8_export_loads_and_ranks_like_fp32(exported):
    folder = exported["int8"]
    assert (folder / ONNX_INT8_NAME).is_file()
    assert not (folder / ONNX_NAME).exists()
    meta = json.loads((folder / ONNX_META_NAME).read_text())
    assert meta["quantize"] == "int8"
    assert meta["quantization"]["per_channel"] is True
    assert (folder / ONNX_INT8_NAME).stat().st_size < (exported["multi"] / ONNX_NAME).stat().st_size

    frame = pd.read_parquet(sample_path()).iloc[:64]
    queries, texts = frame["query"].tolist(), product_texts(frame).tolist()
    int8 = Reranker.from_pretrained(folder, device="cpu", backend="onnx")
    fp32 = Reranker.from_pretrained(exported["multi"], device="cpu", backend="onnx")
    a, b = int8.predict_texts(queries, texts), fp32.predict_texts(queries, texts)
    assert np.isfinite(a.scores).all()
    assert np.isfinite(a.esci_probs).all()
    assert np.corrcoef(a.scores, b.scores)[0, 1] > 0.95

    ranked = int8.rerank("red shoes", [("p1", "Nike red running shoe"), ("p2", "coffee mug"), ("p3", "x")])
    assert sorted(c.product_id for c in ranked) == ["p1", "p2", "p3"]
    assert [c.rank for c in ranked] == [1, 2, 3]
    assert all(c.esci_class in "ESCI" and np.isfinite(c.score) for c in ranked)


def test_runner_ignores_extra_inputs_and_names_missing_ones(exported):
    config, tokenizer, runner = load_onnx_runner(exported["multi"], num_threads=1)
    batch = PairEncoder(tokenizer, config).collate(PairEncoder(tokenizer, config).encode(["a"], ["b"]), [0])
    assert set(runner(batch | {"labels": torch.zeros(1, dtype=torch.long)})) == {
        "score",
        "esci_logits",
        "substitute_logit",
    }
    del batch["attention_mask"]
    with pytest.raises(ValueError, match=r"lacks input\(s\) \['attention_mask'\]"):
        runner(batch)


def test_export_of_a_folder_that_is_not_a_checkpoint_fails_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json; this is not an esci-reranker checkpoint"):
        export_onnx(empty, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        export_onnx(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_rejects_bad_options_and_an_occupied_target(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"quantize='int4'; expected one of \[None, 'int8'\]"):
        export_onnx(tiny_checkpoint, tmp_path / "out", quantize="int4")
    with pytest.raises(ValueError, match="opset=11; expected an integer >= 14"):
        export_onnx(tiny_checkpoint, tmp_path / "out", opset=11)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="already exists and is not empty; pass --overwrite"):
        export_onnx(tiny_checkpoint, occupied)
    with pytest.raises(ExportError, match="would replace the checkpoint"):
        export_onnx(tiny_checkpoint, tiny_checkpoint)


def test_onnx_backend_on_a_pytorch_checkpoint_says_how_to_fix(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match=r"no model.onnx or model_int8.onnx.*backend='torch'"):
        Reranker.from_pretrained(tiny_checkpoint, backend="onnx")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        CheckpointError, match="write one with `esci-reranker export CHECKPOINT --format onnx`"
    ):
        load_onnx_runner(empty)


def test_broken_onnx_file_is_a_checkpoint_error(exported, tmp_path):
    import shutil

    folder = shutil.copytree(exported["single"], tmp_path / "broken")
    (folder / ONNX_NAME).write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="onnxruntime cannot load it"):
        load_onnx_runner(folder)
