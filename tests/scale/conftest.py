"""One local Ray cluster for the whole test session (starting Ray takes seconds), shut down at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from esci_reranker.reranker import Reranker, score_parquet


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A local Ray with 3 logical CPUs: 2 scoring actors plus a slot for reading and writing."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def score_in_one_process(tiny_checkpoint: Path, tmp_path: Path) -> Callable[..., Path]:
    """``score_in_one_process(rows, checkpoint=None)``: the reference the distributed paths must
    match, ``score_parquet``'s output for ``rows`` (a parquet file under ``tmp_path``) with
    ``checkpoint``, by default the tiny checkpoint."""

    def score(rows: pd.DataFrame, checkpoint: Path | None = None) -> Path:
        rows.to_parquet(tmp_path / "good.parquet", index=False)
        score_parquet(
            Reranker.from_pretrained(checkpoint or tiny_checkpoint, device="cpu"),
            tmp_path / "good.parquet",
            tmp_path / "single.parquet",
            progress=False,
        )
        return tmp_path / "single.parquet"

    return score
