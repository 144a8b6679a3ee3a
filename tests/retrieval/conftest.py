"""Fixtures for retrieval tests: tiny random sentence-transformers retrievers and a small catalogue."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("sentence_transformers", reason="the retrieval extra is not installed")
pytest.importorskip("usearch", reason="the retrieval extra is not installed")

SAMPLE = Path(__file__).resolve().parents[2] / "src/esci_reranker/data/sample/esci_us_sample.parquet"


def build_tiny_retriever(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    """A tiny random BERT with mean pooling, saved as a sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer, models

    from esci_reranker.model.tiny import save_tiny_backbone

    bert = save_tiny_backbone(folder.parent / f"{folder.name}-bert", seed, hidden_size=hidden)
    word = models.Transformer(str(bert), max_seq_length=64)
    pooling = models.Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[word, pooling], device="cpu").save(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_retriever(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_retriever(tmp_path_factory.mktemp("retriever") / "tiny-st", seed=0)


@pytest.fixture(scope="session")
def other_retriever(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shape as ``tiny_retriever``, other random weights."""
    return build_tiny_retriever(tmp_path_factory.mktemp("retriever") / "other-st", seed=1)


@pytest.fixture(scope="session")
def wide_retriever(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny retriever with 48-dimensional embeddings (the others make 32)."""
    return build_tiny_retriever(tmp_path_factory.mktemp("retriever") / "wide-st", seed=0, hidden=48)


def small_catalogue() -> pd.DataFrame:
    """80 real products of the sample's train queries (ESCI column names), plus two made-up ones
    with words found nowhere else."""
    frame = pd.read_parquet(SAMPLE)
    frame = frame[frame["split"] == "train"].drop_duplicates("product_id").head(80)
    cols = ["product_id", "product_title", "product_brand", "product_color", "product_bullet_point"]
    extra = pd.DataFrame(
        {
            "product_id": ["ZZ-1", "ZZ-2"],
            "product_title": ["Quokkaphone wireless earbuds", "Zebrawood cutting board"],
            "product_brand": ["Acme", "Woodly"],
            "product_color": ["Teal", ""],
            "product_bullet_point": ["", ""],
        }
    )
    return pd.concat([frame[cols], extra], ignore_index=True)


@pytest.fixture
def catalogue_file(tmp_path: Path) -> Path:
    path = tmp_path / "products.parquet"
    small_catalogue().to_parquet(path, index=False)
    return path
