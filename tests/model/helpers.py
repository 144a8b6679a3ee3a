"""Helpers shared by the model family tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def small_train_config(name: str, splits: Path, backbone: Path | str, *overrides: str) -> Any:
    """The training config ``configs/<name>.yaml`` on the small splits and a tiny ``backbone``,
    with ``overrides`` (``--set`` style) after."""
    from esci_reranker.train.config import load_config

    return load_config(
        CONFIGS / f"{name}.yaml", [f"data.dir={splits}", f"model.backbone={backbone}", *overrides]
    )
