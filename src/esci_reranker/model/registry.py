"""Model families by ``model_type``: how each is loaded, saved, fed and exported.

The checkpoint code (``model.io``), the input builders (``model.features``) and the exports
(``model.export``) consult this table instead of importing any family by name. A family
registers itself when its module is imported (``register``); ``family(model_type)`` imports that
module on demand from ``FAMILY_MODULES``, so loading a checkpoint of a type needs nothing else.
A new family is one module that calls ``register`` plus one row in ``FAMILY_MODULES``.

Stock transformers classifier folders (the distilled students, ``model.stock``) are a second
checkpoint layout of the encoder families rather than a family: ``stock_layout()`` returns the
loader that ``model.stock`` registers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from esci_reranker.model.config import CLASSIFIER, LISTWISE, LLM, MULTI_TASK, SINGLE_TASK, CheckpointError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from esci_reranker.model.config import ModelConfig

#: How a checkpoint keeps its weights (``model.io.CheckpointFiles.weights``).
WeightsKind = Literal["safetensors", "stock", "lora-adapter", "merged-lm"]

#: ``load(folder, config, device, loss_config) -> (model, tokenizer)``.
Loader = Callable[[Path, "ModelConfig", "str | torch.device", Any], "tuple[Any, PreTrainedTokenizerBase]"]
#: ``save(model, tokenizer, folder, extra_files) -> folder``.
Saver = Callable[[Any, "PreTrainedTokenizerBase", Path, "dict[str, str] | None"], Path]

#: The module that registers each ``model_type``: imported on first use.
FAMILY_MODULES: Final[dict[str, str]] = {
    MULTI_TASK: "esci_reranker.model.modeling",
    SINGLE_TASK: "esci_reranker.model.modeling",
    CLASSIFIER: "esci_reranker.model.modeling",
    LISTWISE: "esci_reranker.model.listwise",
    LLM: "esci_reranker.model.llm",
}
#: The module that registers the stock classifier layout (``stock_layout``).
STOCK_MODULE: Final[str] = "esci_reranker.model.stock"


@dataclass(frozen=True)
class Family:
    """What the core needs to know about one ``model_type``.

    Attributes:
        model_type: the ``config.json`` value.
        model_class: the ``nn.Module`` built from a ``ModelConfig`` (``cls(config, loss_config=)``)
            for families saved as one ``model.safetensors``; None when ``load`` builds it.
        load: rebuild a saved model; None = the native ``model.safetensors`` loader of ``model.io``.
        save: write a model; None = the native writer of ``model.io``.
        weights: check a folder's weight files and say how it keeps them (``CheckpointError`` when
            missing); None = ``model.safetensors`` (or a stock classifier folder).
        pair_encoder: the input builder class (``PairEncoder`` subclass); None = ``PairEncoder``.
        export_refusal: why no stock classifier or pairwise ONNX graph can express this family,
            given ``(source, fmt, config, weights)``: the message; None = exportable under ``model.export``'s rule.
    """

    model_type: str
    model_class: type | None = None
    load: Loader | None = None
    save: Saver | None = None
    weights: Callable[[Path, ModelConfig], WeightsKind] | None = None
    # a ``model.features.PairEncoder`` subclass (not named here: features builds on this table)
    pair_encoder: type | None = None
    export_refusal: Callable[[Path, str, ModelConfig, WeightsKind], str] | None = None


_FAMILIES: dict[str, Family] = {}
_STOCK: list[Loader] = []


def register(family: Family) -> Family:
    """Add (or replace) ``family`` under its ``model_type``; returns it."""
    _FAMILIES[family.model_type] = family
    return family


def family(model_type: str) -> Family:
    """The registered family of ``model_type``, importing its module on first use.

    Raises:
        CheckpointError: no family has that ``model_type``.
    """
    if model_type not in _FAMILIES and model_type in FAMILY_MODULES:
        importlib.import_module(FAMILY_MODULES[model_type])
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise CheckpointError(
            f"model_type {model_type!r} has no registered model family; expected one of "
            f"{sorted(set(FAMILY_MODULES) | set(_FAMILIES))}."
        ) from None


def register_stock_layout(load: Loader) -> None:
    """Set the loader of stock classifier folders (called by ``model.stock`` on import)."""
    _STOCK[:] = [load]


def stock_layout() -> Loader:
    """The loader of stock classifier folders, importing ``model.stock`` on first use."""
    if not _STOCK:
        importlib.import_module(STOCK_MODULE)
    return _STOCK[0]
