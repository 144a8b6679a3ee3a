"""From a query to ranked products: retriever training, catalogue index (BM25 + HNSW), fusion, search.

>>> from esci_reranker.retrieval import Searcher
>>> searcher = Searcher.from_paths("runs/default/index", model="runs/default/model")  # doctest: +SKIP
>>> [hit.title for hit in searcher.search("wireless earbuds", top_k=3).hits]  # doctest: +SKIP

Needs the ``retrieval`` extra (sentence-transformers, usearch): ``pip install 'esci-reranker[retrieval]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esci_reranker.lazy import lazy_exports

__all__ = [
    "CatalogueIndex",
    "DenseEncoder",
    "IndexMismatchError",
    "Retrieved",
    "SearchHit",
    "SearchResults",
    "Searcher",
    "build_sample_index",
]

if TYPE_CHECKING:
    from esci_reranker.retrieval.encoder import DenseEncoder, IndexMismatchError
    from esci_reranker.retrieval.index import CatalogueIndex, Retrieved
    from esci_reranker.retrieval.sample import build_sample_index
    from esci_reranker.retrieval.search import Searcher, SearchHit, SearchResults

_EXPORTS = {
    "CatalogueIndex": "esci_reranker.retrieval.index",
    "Retrieved": "esci_reranker.retrieval.index",
    "DenseEncoder": "esci_reranker.retrieval.encoder",
    "IndexMismatchError": "esci_reranker.retrieval.encoder",
    "SearchHit": "esci_reranker.retrieval.search",
    "SearchResults": "esci_reranker.retrieval.search",
    "Searcher": "esci_reranker.retrieval.search",
    "build_sample_index": "esci_reranker.retrieval.sample",
}

# Lazy, so importing the package (the CLI's --help) loads neither torch nor usearch.
__getattr__ = lazy_exports(__name__, _EXPORTS)
