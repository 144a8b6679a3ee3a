"""Fusing the ranked lists of several retrievers (BM25, dense) into one: pure functions.

Each input is one retriever's ranked list for one query: ``(keys, scores)`` best first, where a
key is any hashable id (the index uses its integer row keys). The output is a ``Fused`` list of
every key that appears in at least one input, best first, with the fused score and, per input,
the key's 1-based rank in that input (0 where it was absent).

Two rules, chosen in cross-validation (``retrieval.train``):

- **Reciprocal rank fusion** (Cormack, Clarke and Büttcher, 2009):
  ``RRF(d) = Σ_s w_s / (k + rank_s(d))``, summed over the inputs ``s`` that contain ``d``.
  Scores are ignored; only ranks count, so no calibration between retrievers is needed.
- **Weighted z-scores**: each input's scores are standardised over that input's own list,
  ``z_s(d) = (score_s(d) - mean_s) / std_s`` (``std_s = 0`` gives ``z = 0`` for every key), a key
  missing from an input takes that input's lowest z in the list (it ranked no better than the
  last retrieved key), and ``Z(d) = Σ_s w_s · z_s(d)``.

Ties in the fused score are broken by the best (lowest) rank over the inputs, then by the order
in which keys first appear when the inputs are read in order; the result never depends on
anything else.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

FusionMethod = Literal["rrf", "zscore"]
FUSION_METHODS: Final[tuple[str, ...]] = ("rrf", "zscore")
#: The RRF constant of Cormack et al.; it damps the weight of the very first ranks.
DEFAULT_RRF_K: Final[int] = 60


@dataclass(frozen=True)
class Ranking:
    """One retriever's list for one query: ``keys`` best first and their ``scores`` (same length)."""

    keys: Sequence[Hashable]
    scores: Sequence[float]

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.scores):
            raise ValueError(f"Ranking: {len(self.keys)} keys but {len(self.scores)} scores; expected equal.")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("Ranking: a key appears twice; each key must appear at most once per list.")


@dataclass(frozen=True)
class Fused:
    """The fused list, best first: ``keys``, ``scores`` and ``ranks`` (N, inputs): each key's
    1-based rank in each input, 0 where the input did not contain it."""

    keys: list[Hashable]
    scores: np.ndarray
    ranks: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


def _check_weights(rankings: Sequence[Ranking], weights: Sequence[float] | None) -> np.ndarray:
    if weights is None:
        return np.ones(len(rankings), dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(rankings),):
        raise ValueError(f"fusion: {len(w)} weights for {len(rankings)} rankings; expected one per ranking.")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"fusion: weights {w.tolist()}; expected finite numbers >= 0.")
    return w


def _rank_table(rankings: Sequence[Ranking]) -> tuple[list[Hashable], np.ndarray]:
    """Every distinct key (first-appearance order) and its 1-based rank per input (0 = absent)."""
    position: dict[Hashable, int] = {}
    for ranking in rankings:
        for key in ranking.keys:
            position.setdefault(key, len(position))
    ranks = np.zeros((len(position), len(rankings)), dtype=np.int64)
    for j, ranking in enumerate(rankings):
        for r, key in enumerate(ranking.keys, start=1):
            ranks[position[key], j] = r
    return list(position), ranks


def _order(keys: list[Hashable], scores: np.ndarray, ranks: np.ndarray) -> Fused:
    if not keys:
        return Fused(
            keys=[], scores=np.zeros(0), ranks=ranks.reshape(0, ranks.shape[1] if ranks.ndim == 2 else 0)
        )
    best = np.where(ranks > 0, ranks, np.iinfo(np.int64).max).min(axis=1)
    first_seen = np.arange(len(keys))
    # lexsort: last key is primary. Score descending, then best rank, then first appearance.
    order = np.lexsort((first_seen, best, -scores))
    return Fused(keys=[keys[i] for i in order], scores=scores[order], ranks=ranks[order])


def reciprocal_rank_fusion(
    rankings: Sequence[Ranking], k: float = DEFAULT_RRF_K, weights: Sequence[float] | None = None
) -> Fused:
    """``RRF(d) = Σ_s w_s / (k + rank_s(d))`` over the inputs containing ``d`` (see the module docstring).

    Raises:
        ValueError: ``k < 0`` or bad weights.
    """
    if not k >= 0:
        raise ValueError(f"reciprocal_rank_fusion: k={k}; expected a number >= 0.")
    w = _check_weights(rankings, weights)
    keys, ranks = _rank_table(rankings)
    contrib = np.where(ranks > 0, w / (k + np.maximum(ranks, 1)), 0.0)  # (N, S)
    return _order(keys, contrib.sum(axis=1), ranks)


def zscore_fusion(rankings: Sequence[Ranking], weights: Sequence[float] | None = None) -> Fused:
    """``Z(d) = Σ_s w_s · z_s(d)`` with per-list standardised scores (see the module docstring).

    Raises:
        ValueError: bad weights, or a score that is NaN or infinite.
    """
    w = _check_weights(rankings, weights)
    keys, ranks = _rank_table(rankings)
    total = np.zeros(len(keys), dtype=np.float64)
    for j, ranking in enumerate(rankings):
        if len(ranking.keys) == 0:
            continue
        scores = np.asarray(ranking.scores, dtype=np.float64)
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"zscore_fusion: ranking {j} has a NaN or infinite score.")
        std = scores.std()
        z = (scores - scores.mean()) / std if std > 0 else np.zeros_like(scores)
        column = np.full(len(keys), z.min())  # absent keys: the list's lowest z
        present = ranks[:, j] > 0
        column[present] = z[ranks[present, j] - 1]
        total += w[j] * column
    return _order(keys, total, ranks)


def fuse(
    rankings: Sequence[Ranking],
    method: FusionMethod = "rrf",
    weights: Sequence[float] | None = None,
    rrf_k: float = DEFAULT_RRF_K,
) -> Fused:
    """``reciprocal_rank_fusion`` or ``zscore_fusion`` by name.

    Raises:
        ValueError: an unknown ``method``.
    """
    if method == "rrf":
        return reciprocal_rank_fusion(rankings, k=rrf_k, weights=weights)
    if method == "zscore":
        return zscore_fusion(rankings, weights=weights)
    raise ValueError(f"fusion method {method!r}: unknown; expected one of {list(FUSION_METHODS)}.")
