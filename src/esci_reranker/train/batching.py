"""Seeded, length-bucketed batch order: similar lengths share a batch, so padding stays small."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bucketed_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket_size: int = 50
) -> list[np.ndarray]:
    """The batches of one epoch, as index arrays; a pure function of (lengths, seed, epoch).

    The examples are shuffled, cut into pools of ``bucket_size`` batches, each pool is sorted by
    length and cut into batches, and the batches are shuffled again. Being deterministic in
    ``(seed, epoch)`` lets a resumed run rebuild the exact order and skip what it already did.
    """
    n = len(lengths)
    if n == 0:
        return []
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    lens = np.asarray(lengths)
    pool = batch_size * bucket_size
    batches: list[np.ndarray] = []
    for start in range(0, n, pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lens[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]
