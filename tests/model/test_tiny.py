"""The tiny random encoder: its sizes, overrides, and a saved folder that loads the same weights."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from esci_reranker.model.tiny import TINY_BERT_SIZES, save_tiny_backbone, tiny_bert_config


def test_tiny_config_has_the_tiny_sizes_and_takes_overrides():
    config = tiny_bert_config(hidden_dropout_prob=0.0)
    assert config["model_type"] == "bert"
    assert {k: config[k] for k in TINY_BERT_SIZES} == dict(TINY_BERT_SIZES)
    assert config["hidden_dropout_prob"] == 0.0
    assert tiny_bert_config(hidden_size=48)["hidden_size"] == 48


def test_saved_backbone_loads_and_the_seed_fixes_its_weights(tmp_path: Path):
    first = save_tiny_backbone(tmp_path / "a", seed=3)
    again = AutoModel.from_pretrained(save_tiny_backbone(tmp_path / "b", seed=3)).state_dict()
    other = AutoModel.from_pretrained(save_tiny_backbone(tmp_path / "c", seed=4)).state_dict()
    weights = AutoModel.from_pretrained(first).state_dict()
    assert weights["embeddings.word_embeddings.weight"].shape[1] == 32
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert not torch.equal(weights["pooler.dense.weight"], other["pooler.dense.weight"])
    assert AutoTokenizer.from_pretrained(first)("red shoes")["input_ids"][0] == 101  # [CLS]
