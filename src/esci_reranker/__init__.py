"""esci_reranker: a multi-task cross-encoder reranker for product search (Amazon ESCI).

One shared transformer encoder reads "query [SEP] product text" and feeds three heads: a Task 1
relevance score, Task 2 E/S/C/I classification and Task 3 "is substitute" detection.

>>> from esci_reranker import Reranker
>>> reranker = Reranker.from_pretrained("runs/default/model")      # doctest: +SKIP
>>> reranker.rerank("running shoes", [("B01", "Nike Air Zoom | Nike")])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from esci_reranker.version import __version__

__all__ = ["Predictions", "RankedCandidate", "Reranker", "__version__"]

if TYPE_CHECKING:
    from esci_reranker.reranker import Predictions, RankedCandidate, Reranker


def __getattr__(name: str) -> Any:
    # Lazy so that `import esci_reranker` (and the CLI's --help) does not import torch.
    if name in {"Predictions", "RankedCandidate", "Reranker"}:
        from esci_reranker import reranker

        return getattr(reranker, name)
    raise AttributeError(f"module 'esci_reranker' has no attribute {name!r}")
