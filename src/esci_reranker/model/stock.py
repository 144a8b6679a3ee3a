"""Stock classifier folders: a reranker saved as a plain transformers ``*ForSequenceClassification``.

The distilled students (``distill/``) are saved this way, so transformers, sentence-transformers
and text-embeddings-inference load them with no code of ours, and ``Reranker`` loads them too::

    folder/
      config.json        the transformers config of the classifier (architectures, id2label, ...)
                         plus ``esci_reranker``: our ``ModelConfig`` without its backbone
      model.safetensors  the classifier's weights, under transformers' own names
      tokenizer files    with ``model_max_length`` = the trained pair length

Only models a stock classifier computes exactly are saved so (``model.export``'s exportability
rule: CLS pooling, a tanh hidden layer as wide as the encoder, no prior): the single-task
cross-encoder (1 label, the Task 1 score) and the E/S/C/I classifier (4 labels, every other
output derived from them). Saving is checked numerically against the model, as every export is.
Loading maps the classifier's layers back onto our model (the inverse of
``export.build_sequence_classifier``), so the fast inference paths (padding-free encoder, int8,
oneDNN) apply to a stock folder as to any checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from esci_reranker.fsutil import staged_dir
from esci_reranker.model.config import (
    CLASSIFIER,
    CONFIG_NAME,
    SINGLE_TASK,
    STOCK_KEY,
    WEIGHTS_NAME,
    CheckpointError,
    ModelConfig,
)
from esci_reranker.model.export import (
    HEAD_LAYOUTS,
    ExportError,
    build_sequence_classifier,
    check_export_difference,
    check_exportable,
    write_classifier,
)
from esci_reranker.model.io import is_stock_folder as is_stock_folder  # where callers found it
from esci_reranker.model.io import load_tokenizer
from esci_reranker.model.modeling import MODEL_CLASSES, LossConfig, RerankerModel
from esci_reranker.model.registry import register_stock_layout

#: Families a stock classifier holds whole, and the head it is made of.
STOCK_HEADS: Final[Mapping[str, str]] = {SINGLE_TASK: "score", CLASSIFIER: "esci"}
#: The format name used in messages about stock folders.
STOCK_FORMAT: Final[str] = "stock classifier"


def save_stock(
    model: RerankerModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` to ``folder`` as a stock classifier (atomically, replacing what was there).

    ``extra_files`` maps file names to text written alongside (e.g. ``distill.json``).

    Raises:
        ExportError: the model's family or layout has no stock equivalent, or the stock model
            differs from it by more than ``export.EXPORT_TOLERANCE`` on the probe pairs.
    """
    head = STOCK_HEADS.get(model.config.model_type)
    if head is None:
        raise ExportError(
            f"{STOCK_FORMAT}: a {model.config.model_type} model has no stock equivalent; expected one "
            f"of {sorted(STOCK_HEADS)}."
        )
    model = model.eval()
    device = next(model.parameters()).device
    cpu_model = model.to("cpu")
    try:
        hf_model = build_sequence_classifier(cpu_model, head, STOCK_FORMAT)
        check_export_difference(cpu_model, hf_model, tokenizer, head, STOCK_FORMAT)
    finally:
        model.to(device)
    with staged_dir(Path(folder)) as tmp:
        write_classifier(tmp, hf_model, tokenizer, model.config, model.config.stock_settings())
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(folder)


def load_stock(
    folder: str | Path,
    device: str | torch.device = "cpu",
    loss_config: LossConfig | None = None,
) -> tuple[RerankerModel, PreTrainedTokenizerBase]:
    """Rebuild our model from a stock classifier folder written by ``save_stock`` (eval mode).

    Raises:
        CheckpointError: no weights, a family without a stock form, or weights that do not fit.
    """
    folder = Path(folder)
    config = ModelConfig.load(folder)  # reads our settings from the stock config.json
    head = STOCK_HEADS.get(config.model_type)
    if head is None:
        raise CheckpointError(
            f"{folder / CONFIG_NAME}: {STOCK_KEY}.model_type {config.model_type!r} has no stock "
            f"classifier form; expected one of {sorted(STOCK_HEADS)}."
        )
    if not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder}: {CONFIG_NAME} is present but {WEIGHTS_NAME} is missing.")
    backbone_type = str(config.backbone.get("model_type"))
    try:  # the settings must describe a model the stock classifier computes exactly
        check_exportable(config, int(config.backbone.get("hidden_size", 0)), backbone_type, STOCK_FORMAT)
    except ExportError as err:
        raise CheckpointError(f"{folder / CONFIG_NAME}: {err}") from None
    layout = HEAD_LAYOUTS[backbone_type]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the extra esci_reranker key is ours, not a warning
    try:
        hf_model = AutoModelForSequenceClassification.from_pretrained(folder).float()
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{folder}: transformers cannot load the stock classifier ({err}).") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model = MODEL_CLASSES[config.model_type](config, loss_config=loss_config)
    target = model.heads[head]
    expected_labels = 1 if head == "score" else 4
    if hf_model.config.num_labels != expected_labels:
        raise CheckpointError(
            f"{folder / CONFIG_NAME}: {hf_model.config.num_labels} label(s), but a {config.model_type} "
            f"model has {expected_labels}."
        )
    # the encoder (its own pooler, unused by the reranker, may be absent: RoBERTa-style models)
    missing, unexpected = model.encoder.load_state_dict(hf_model.base_model.state_dict(), strict=False)
    stray = [k for k in [*missing, *unexpected] if not k.startswith("pooler.")]
    if stray:
        raise CheckpointError(f"{folder / WEIGHTS_NAME}: encoder weights do not fit (keys {stray[:5]}).")
    target.body[0].load_state_dict(hf_model.get_submodule(layout.dense).state_dict())  # type: ignore[index]
    target.proj.load_state_dict(hf_model.get_submodule(layout.out).state_dict())
    del hf_model
    return model.to(device).eval(), load_tokenizer(folder)


register_stock_layout(
    lambda folder, config, device, loss_config: load_stock(folder, device=device, loss_config=loss_config)
)
