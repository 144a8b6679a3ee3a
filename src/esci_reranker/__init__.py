"""esci_reranker: a multi-task cross-encoder reranker for product search (Amazon ESCI).

One shared transformer encoder reads "query [SEP] product text" and feeds three heads: a Task 1
relevance score, Task 2 E/S/C/I classification and Task 3 "is substitute" detection.

>>> from esci_reranker import Reranker
>>> reranker = Reranker.from_pretrained("runs/default/model")      # doctest: +SKIP
>>> reranker.rerank("running shoes", [("B01", "Nike Air Zoom | Nike")])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esci_reranker.lazy import lazy_exports
from esci_reranker.version import __version__

__all__ = ["Predictions", "RankedCandidate", "Reranker", "__version__"]

if TYPE_CHECKING:
    from esci_reranker.reranker import Predictions, RankedCandidate, Reranker

# Lazy so that `import esci_reranker` (and the CLI's --help) does not import torch.
__getattr__ = lazy_exports(
    __name__, dict.fromkeys(["Predictions", "RankedCandidate", "Reranker"], "esci_reranker.reranker")
)
