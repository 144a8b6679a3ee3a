"""Checkpoint folders: ``config.json`` + ``model.safetensors`` + tokenizer files.

A family that keeps its weights otherwise (the LLM family: peft's adapter files or a merged LM
folder instead of ``model.safetensors``) registers its own load and save in ``model.registry``;
this module consults that table and imports no family by name.

Loading needs nothing but the folder. Saving is atomic: files go to a temporary sibling folder
that is renamed over the target only when complete, so a kill never leaves a half-written model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_model
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from esci_reranker.fsutil import recover_dir, staged_dir
from esci_reranker.model.config import (
    CONFIG_NAME,
    STOCK_KEY,
    WEIGHTS_NAME,
    CheckpointError,
    ModelConfig,
    has_stacker,
)
from esci_reranker.model.registry import WeightsKind, family, stock_layout

if TYPE_CHECKING:
    from esci_reranker.model.modeling import LossConfig


def save_checkpoint(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` to ``folder`` atomically (replacing what was there).

    ``extra_files`` maps file names to text content written alongside (e.g. ``metrics.json``).

    Raises:
        ValueError: the model runs in int8 (``quantize_int8``): its fp32 weights are gone.
    """
    if getattr(model, "int8", False):
        raise ValueError(
            "cannot save an int8 model (quantize_int8): its fp32 weights are gone; save the "
            "model before quantising, or export int8 with `esci-reranker export --format onnx --quantize int8`."
        )
    folder = Path(folder)
    save = family(model.config.model_type).save
    if save is not None:
        return save(model, tokenizer, folder, extra_files)
    with staged_dir(folder) as tmp:
        model.config.save(tmp)
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return folder


def existing_checkpoint_dir(folder: str | Path) -> Path:
    """``folder`` as a ``Path`` once it is known to be a folder.

    Raises:
        CheckpointError: there is no such folder.
    """
    folder = Path(folder)
    recover_dir(folder)  # a save interrupted between its two renames leaves the old copy aside
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder.")
    return folder


def is_stock_folder(folder: str | Path) -> bool:
    """Whether ``folder``'s ``config.json`` is a transformers config carrying our settings (a
    stock classifier folder, ``model.stock``)."""
    path = Path(folder) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get(STOCK_KEY), dict)


@dataclass(frozen=True)
class CheckpointFiles:
    """What a checkpoint folder holds, for code that ships it as files (``hub.push_to_hub``).

    Attributes:
        config: its ``ModelConfig``.
        weights: ``safetensors`` (our ``model.safetensors``), ``stock`` (a transformers classifier
            folder: a distilled student), ``lora-adapter`` (llm family: peft's adapter files over
            the base LM named by ``llm.base_model``) or ``merged-lm`` (llm family: ``merged/``).
        stacked: a ``stacker/`` (trees and decision rules over the model's outputs) is beside it.
    """

    config: ModelConfig
    weights: WeightsKind
    stacked: bool


def checkpoint_files(folder: str | Path) -> CheckpointFiles:
    """Check that ``folder`` is a complete checkpoint of some family and say what it holds.

    Nothing is loaded but ``config.json``.

    Raises:
        CheckpointError: no such folder, not our checkpoint, or its weight files are missing.
    """
    folder = existing_checkpoint_dir(folder)
    config = ModelConfig.load(folder)
    check = family(config.model_type).weights or _native_weights
    return CheckpointFiles(config=config, weights=check(folder, config), stacked=has_stacker(folder))


def _native_weights(folder: Path, config: ModelConfig) -> WeightsKind:
    """``model.safetensors`` (ours, or a stock classifier's) must be there."""
    if not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder}: {CONFIG_NAME} is present but {WEIGHTS_NAME} is missing.")
    return "stock" if is_stock_folder(folder) else "safetensors"


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a checkpoint folder (torch or ONNX).

    Raises:
        CheckpointError: the tokenizer files are missing or broken.
    """
    # config.json is ours, not a transformers config: keep AutoTokenizer's warning about it quiet.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: tokenizer files are missing or broken ({err}).") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_checkpoint(
    folder: str | Path,
    device: str | torch.device = "cpu",
    loss_config: LossConfig | None = None,
) -> tuple[Any, PreTrainedTokenizerBase]:
    """Rebuild the model and tokenizer saved in ``folder`` (in eval mode, on ``device``).

    A ``RerankerModel`` (the encoder families) or, for ``esci-llm``, an ``LLMReranker``. A stock
    transformers classifier folder with our settings (a distilled student, ``model.stock``) is
    loaded as the ``RerankerModel`` it was saved from.

    Raises:
        CheckpointError: the folder is missing, is another kind of model, or its weights do not
            match its config.
    """
    folder = existing_checkpoint_dir(folder)
    config = ModelConfig.load(folder)
    if is_stock_folder(folder):
        return stock_layout()(folder, config, device, loss_config)
    fam = family(config.model_type)
    if fam.load is not None:
        return fam.load(folder, config, device, loss_config)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder}: {CONFIG_NAME} is present but {WEIGHTS_NAME} is missing.")
    assert fam.model_class is not None, f"family {fam.model_type} registers neither load nor model_class"
    model = fam.model_class(config, loss_config=loss_config)
    state = load_file(str(weights))
    for key, value in state.items():
        # Checkpoints from before the lexical prior stored one cosine weight per output, (out,).
        if key.endswith("prior_weight") and value.ndim == 1:
            state[key] = value.unsqueeze(-1)  # (out, 1): the cosine as the only prior feature
    missing, unexpected = model.load_state_dict(state, strict=False)
    # gain_vector is a buffer rebuilt from the config; anything else missing is a broken file.
    missing = [k for k in missing if k != "gain_vector"]
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: weights do not match {CONFIG_NAME} "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})."
        )
    tokenizer = load_tokenizer(folder)
    model.to(device).eval()
    return model, tokenizer
