"""Epoch batch orders: length buckets and query groups, both deterministic for resume."""

from __future__ import annotations

import numpy as np
import pytest

from esci_reranker.train.batching import bucketed_batches, query_batches

# 7 queries of 1..13 pairs, ids interleaved so grouping cannot rely on the input order
SIZES = [1, 2, 3, 5, 8, 13, 9]
GROUPS = np.random.default_rng(0).permutation(np.repeat(np.arange(len(SIZES)) * 10 + 3, SIZES))


def test_bucketed_batches_cover_every_example_once_and_are_deterministic():
    lengths = np.random.default_rng(1).integers(5, 90, size=101)
    batches = bucketed_batches(lengths, 8, seed=3, epoch=0, bucket_size=4)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(101))
    assert max(len(b) for b in batches) == 8
    again = bucketed_batches(lengths, 8, seed=3, epoch=0, bucket_size=4)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    other = bucketed_batches(lengths, 8, seed=3, epoch=1, bucket_size=4)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other, strict=False))


def test_query_batches_cover_every_pair_once_in_whole_query_slices():
    batches = query_batches(GROUPS, batch_size=12, group_size=4, seed=0, epoch=0)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(GROUPS)))
    assert all(len(b) <= 12 for b in batches)
    for batch in batches:
        ids, counts = np.unique(GROUPS[batch], return_counts=True)
        # near-equal slices (13 pairs: 4,3,3,3, never 4,4,4,1): no query is alone in a batch
        # unless it has one pair
        for value, count in zip(ids, counts, strict=True):
            assert count >= min(int((value == GROUPS).sum()), 2)
    # every query with at least two pairs meets at least one of its own pairs in a batch
    for value in np.unique(GROUPS):
        if (value == GROUPS).sum() >= 2:
            assert any((GROUPS[b] == value).sum() >= 2 for b in batches)


def test_query_batches_are_a_pure_function_of_seed_and_epoch():
    first = query_batches(GROUPS, 12, 4, seed=5, epoch=2)
    again = query_batches(GROUPS, 12, 4, seed=5, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    shuffled = query_batches(GROUPS, 12, 4, seed=5, epoch=3)
    assert [b.tolist() for b in first] != [b.tolist() for b in shuffled]


def test_query_batches_accept_string_ids_and_no_pairs():
    ids = np.array(["b", "a", "b", "a", "c"])
    flat = np.concatenate(query_batches(ids, 4, 2, seed=0, epoch=0))
    assert sorted(flat.tolist()) == [0, 1, 2, 3, 4]
    assert query_batches(np.array([], dtype=int), 4, 2, seed=0, epoch=0) == []


@pytest.mark.parametrize(("batch_size", "group_size"), [(8, 1), (4, 5)])
def test_query_batches_reject_a_bad_group_size(batch_size, group_size):
    with pytest.raises(ValueError, match=r"optim\.group_size"):
        query_batches(GROUPS, batch_size, group_size, seed=0, epoch=0)
