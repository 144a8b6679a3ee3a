"""Scale-out: batch scoring on Ray Data (``ray_scoring``), the per-batch work (``batch``).

``esci-reranker score --engine ray`` runs ``score_with_ray``. Ray is an optional extra
(``pip install 'esci-reranker[ray]'``); ``batch`` does not need it, ``ray_scoring`` imports it
only when called.
"""

from esci_reranker.scale.batch import REJECT_COLUMN, BatchScorer, reject_reasons, rejected_rows
from esci_reranker.scale.ray_scoring import (
    RAY_EXTRA,
    RayScoreResult,
    ScaleError,
    import_ray,
    resolve_inputs,
    score_with_ray,
)

__all__ = [
    "RAY_EXTRA",
    "REJECT_COLUMN",
    "BatchScorer",
    "RayScoreResult",
    "ScaleError",
    "import_ray",
    "reject_reasons",
    "rejected_rows",
    "resolve_inputs",
    "score_with_ray",
]
