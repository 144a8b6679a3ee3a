"""A tiny catalogue index for the /search and search-page tests (a fixture module: import the fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of 82 products (80 real, 2 made up: ZZ-1 'Quokkaphone wireless earbuds', ZZ-2
    'Zebrawood cutting board') built with a tiny random retriever; read-only."""
    pytest.importorskip("usearch", reason="the retrieval extra is not installed")
    from esci_reranker.retrieval.index import CatalogueIndex
    from tests.retrieval.conftest import build_tiny_retriever, small_catalogue

    root = tmp_path_factory.mktemp("search-index")
    retriever = build_tiny_retriever(root / "retriever")
    products = root / "products.parquet"
    small_catalogue().to_parquet(products, index=False)
    CatalogueIndex.build(products, root / "index", retriever=str(retriever))
    return root / "index"


@pytest.fixture(scope="session")
def other_tiny_retriever(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A retriever the tiny index was not built with."""
    from tests.retrieval.conftest import build_tiny_retriever

    return build_tiny_retriever(tmp_path_factory.mktemp("other-retriever") / "st", seed=1)
