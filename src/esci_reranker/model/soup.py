"""Weight averaging ("model soup") of checkpoints fine-tuned from one initialisation.

Models fine-tuned briefly from the same pretrained weights and head initialisation stay close
enough in weight space that the mean of their weights is itself a good model: the stacked
default's out-of-fold cross-encoders, each trained on all but one query fold, average into a
model of every train+val query without a further training (``stack.final_model: soup``).

The result is an ordinary checkpoint folder (``config.json``, ``model.safetensors``, tokenizer),
written atomically; ``soup.json`` beside it names the folders it averages.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from esci_reranker.fsutil import staged_dir
from esci_reranker.model.config import CONFIG_NAME, WEIGHTS_NAME, CheckpointError

#: Written beside the averaged weights: the source folders, in order.
SOUP_NAME: Final[str] = "soup.json"
#: Files of a source folder that describe that model alone, so the soup does not copy them.
_NOT_COPIED: Final[frozenset[str]] = frozenset({WEIGHTS_NAME, "metrics.json", SOUP_NAME})


def average_checkpoints(folders: Sequence[str | Path], dest: str | Path) -> Path:
    """Write the mean of ``folders``' weights to ``dest`` as a checkpoint; returns ``dest``.

    Floating-point tensors are averaged in float64 and stored in their own dtype; any other
    tensor (e.g. position ids) must be equal in every folder. The config and tokenizer files
    come from the first folder, whose ``config.json`` every other folder must match.

    Raises:
        ValueError: fewer than two folders, or ``dest`` is one of them.
        CheckpointError: a folder is not a checkpoint with ``model.safetensors``, or the folders
            differ in config, tensor names, shapes, dtypes or non-float values (named).
    """
    sources = [Path(f) for f in folders]
    if len(sources) < 2:
        raise ValueError(f"average_checkpoints: {len(sources)} folder(s); a soup needs at least two.")
    dest = Path(dest)
    if any(dest.resolve() == s.resolve() for s in sources):
        raise ValueError(f"average_checkpoints: dest {dest} is one of the folders averaged.")
    configs = [_config(folder) for folder in sources]
    for folder, config in zip(sources[1:], configs[1:], strict=True):
        if config != configs[0]:
            keys = sorted(k for k in set(config) | set(configs[0]) if config.get(k) != configs[0].get(k))
            raise CheckpointError(
                f"{folder}/{CONFIG_NAME} differs from {sources[0]}'s in {keys}; "
                "only models of one architecture and initialisation can be averaged."
            )
    mean = _mean_weights(sources)
    with staged_dir(dest) as tmp:
        for item in sources[0].iterdir():
            if item.name in _NOT_COPIED:
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        save_file(mean, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / SOUP_NAME).write_text(json.dumps({"mean_of": [str(s) for s in sources]}, indent=2) + "\n")
    return dest


def _config(folder: Path) -> dict:
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise CheckpointError(
                f"{folder}: no {name}; a soup averages checkpoint folders with {WEIGHTS_NAME}."
            )
    return json.loads((folder / CONFIG_NAME).read_text())


def _mean_weights(sources: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The mean tensors, reading one source at a time: the first source's tensors and a float64
    sum are held (about three times the weights in memory, whatever the number of sources)."""
    total: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    for index, folder in enumerate(sources):
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as weights:
            names = set(weights.keys())
            if index == 0:
                for name in names:
                    tensor = weights.get_tensor(name)
                    first[name] = tensor
                    if tensor.is_floating_point():
                        total[name] = tensor.to(torch.float64)
                continue
            if names != set(first):
                diff = sorted(names ^ set(first))[:5]
                raise CheckpointError(
                    f"{folder}/{WEIGHTS_NAME}: tensors {diff} are not in both it and {sources[0]}."
                )
            for name in names:
                tensor = weights.get_tensor(name)
                if tensor.shape != first[name].shape or tensor.dtype != first[name].dtype:
                    raise CheckpointError(
                        f"{folder}/{WEIGHTS_NAME}: tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                        f"against {tuple(first[name].shape)} {first[name].dtype} in {sources[0]}."
                    )
                if name in total:
                    total[name] += tensor.to(torch.float64)
                elif not torch.equal(tensor, first[name]):
                    raise CheckpointError(
                        f"{folder}/{WEIGHTS_NAME}: tensor {name!r} ({tensor.dtype}) differs from {sources[0]}'s, "
                        "and only floating-point tensors can be averaged."
                    )
    count = len(sources)
    return {
        name: (total[name] / count).to(tensor.dtype).contiguous() if name in total else tensor.contiguous()
        for name, tensor in first.items()
    }
