"""The bundled sample's catalogue as an index: what ``make run`` builds for ``search`` and the page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esci_reranker.retrieval.encoder import PACKAGED_RETRIEVER


def build_sample_index(out_dir: str | Path, retriever: str | Path | None = None, log: Any = None) -> Path:
    """Index every product of the bundled sample (6,613 products) into ``out_dir``; return it.

    The catalogue is all the sample's products, the test split's included: an index is what a
    user searches, not training data (the retriever itself is trained on train+val queries only).

    Args:
        out_dir: the index folder (replaced in one rename when the build finishes).
        retriever: a sentence-transformers folder (e.g. ``train-retriever``'s ``OUT/model``);
            None = the packaged zero-shot all-MiniLM-L6-v2.
    """
    from esci_reranker.data.sample import sample_path
    from esci_reranker.retrieval.flow import CATALOGUE_FIELDS
    from esci_reranker.retrieval.index import CatalogueIndex

    CatalogueIndex.build(
        sample_path(),
        out_dir,
        retriever=str(retriever) if retriever is not None else PACKAGED_RETRIEVER,
        source="bundled ESCI sample (esci_us_sample.parquet)",
        # every field the stacker reads, so search results carry what the model saw in training
        store_fields=CATALOGUE_FIELDS,
        log=log,
        # one thread: the same graph in every build, so the main job's search-flow figures depend
        # on the model alone (with both cores a few of 4,100 retrieved products moved between
        # runs); the sample's 6,613 products take well under a second either way
        threads=1,
    )
    return Path(out_dir)
