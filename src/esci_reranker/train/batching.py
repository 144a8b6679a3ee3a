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


def query_batches(
    groups: Sequence[int], batch_size: int, group_size: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """The batches of one epoch built from whole query groups; a pure function of its arguments.

    A ranking loss compares a query's candidates with each other, so each batch must hold
    several pairs of the same query. Each query's pairs are shuffled and cut into slices of at
    most ``group_size``; the slices of all queries are shuffled and packed in order into batches
    of at most ``batch_size`` pairs (a slice is never split across batches). Every pair appears
    exactly once per epoch. Deterministic in ``(seed, epoch)`` so a resumed run rebuilds the
    same order.

    Raises:
        ValueError: ``group_size`` is below 2 or above ``batch_size``.
    """
    if not 2 <= group_size <= batch_size:
        raise ValueError(
            f"optim.group_size={group_size}: expected 2 <= group_size <= optim.batch_size ({batch_size})."
        )
    if len(groups) == 0:
        return []
    ids = np.unique(np.asarray(groups), return_inverse=True)[1]  # any id type -> 0..Q-1
    rng = np.random.default_rng([seed, epoch, 1])
    slices: list[np.ndarray] = []
    order = np.argsort(ids, kind="stable")  # one sort, not a scan per query: 1.8M pairs
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    for group in np.split(order, bounds):
        members = rng.permutation(group)
        # near-equal slices rather than a full run and a short tail: a tail of one pair has
        # nothing to be ranked against
        n_slices = -(-len(members) // group_size)
        slices.extend(np.array_split(members, n_slices))
    slices = [slices[i] for i in rng.permutation(len(slices))]
    batches: list[np.ndarray] = []
    current: list[np.ndarray] = []
    size = 0
    for piece in slices:
        if size + len(piece) > batch_size and current:
            batches.append(np.concatenate(current))
            current, size = [], 0
        current.append(piece)
        size += len(piece)
    if current:
        batches.append(np.concatenate(current))
    return batches
