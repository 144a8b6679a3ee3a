"""The tower-embedding cache: same outputs, fewer tower rows encoded, cleared by training."""

from __future__ import annotations

import pytest
import torch

from esci_reranker.model import PairEncoder
from esci_reranker.model.tower_cache import TowerCache
from esci_reranker.model.unpadded import Sequences
from esci_reranker.reranker import Reranker
from tests.model.test_unpadded import _randomised_prior_model

QUERIES = ["red shoes", "red shoes", "usb cable"]
TEXTS = ["Nike Air | Nike | Red", "Adidas Run | Adidas", "Anker USB-C cable 6 ft | Anker"]


def _batch(model, tokenizer, queries=QUERIES, texts=TEXTS):
    encoder = PairEncoder(tokenizer, model.config)
    return encoder.collate(encoder.encode(queries, texts), list(range(len(queries))))


class _Spy:
    """Records the rows of every batch the encoder is asked to run."""

    def __init__(self, model):
        self.rows: list[list[int]] = []
        self._inner = model._hidden_states
        model._hidden_states = self

    def __call__(self, batches: list[Sequences]):
        self.rows.append([len(b.input_ids) for b in batches])
        return self._inner(batches)


@pytest.mark.parametrize("unpadded", [True, False])
def test_cached_towers_give_the_same_outputs_and_skip_the_tower_pass(unpadded):
    model, tokenizer = _randomised_prior_model()
    batch = _batch(model, tokenizer)
    with torch.inference_mode():
        reference = model(**batch)
    if unpadded:
        assert model.enable_unpadded([Sequences(batch["input_ids"], batch["attention_mask"])])
    model.tower_cache = TowerCache(100)
    spy = _Spy(model)
    with torch.inference_mode():
        cold, warm = model(**batch), model(**batch)
    # cold: the pair (3 rows), 2 distinct queries, 3 distinct products; warm: the pair alone
    assert spy.rows == [[3, 2, 3], [3]]
    assert model.tower_cache.stats() == {"size": 100, "entries": 5, "hits": 5, "misses": 5}
    for out in (cold, warm):
        for name in ("score", "esci_logits", "substitute_logit", "prior"):
            torch.testing.assert_close(getattr(out, name), getattr(reference, name), atol=1e-5, rtol=1e-5)

    # A new product among known ones: only it goes through the product tower.
    mixed = _batch(model, tokenizer, ["red shoes", "usb cable"], ["Puma Speed | Puma", TEXTS[2]])
    with torch.inference_mode():
        out = model(**mixed)
    assert spy.rows[-1] == [2, 1]
    model.tower_cache = None
    with torch.inference_mode():
        torch.testing.assert_close(out.score, model(**mixed).score, atol=1e-5, rtol=1e-5)


def test_training_mode_clears_the_cache_and_never_reads_it():
    model, tokenizer = _randomised_prior_model()
    batch = _batch(model, tokenizer)
    model.tower_cache = TowerCache(10)
    with torch.inference_mode():
        model(**batch)
    assert model.tower_cache.stats()["entries"] == 5
    model.train()
    assert model.tower_cache.stats()["entries"] == 0
    spy = _Spy(model)
    model(**batch, labels=torch.tensor([0, 1, 3])).loss.backward()
    assert spy.rows == [[3, 2, 3]]
    assert model.tower_cache.stats()["entries"] == 0


def test_least_recently_used_entries_go_first():
    cache = TowerCache(2)
    ids = torch.tensor([[101, 7, 102, 0], [101, 8, 102, 0], [101, 9, 9, 102]])
    mask = (ids != 0).long()
    keys = TowerCache.keys(ids, mask)
    assert len(set(keys)) == 3
    # the padded and an unpadded copy of a row share a key
    assert TowerCache.keys(ids[:1, :3], mask[:1, :3]) == keys[:1]
    cache.put({keys[0]: torch.ones(4), keys[1]: torch.zeros(4)})
    assert cache.plan(ids[:1], mask[:1]).missing.tolist() == []  # row 0 used: row 1 is now oldest
    cache.put({keys[2]: torch.full((4,), 2.0)})
    plan = cache.plan(ids, mask)
    assert plan.missing.tolist() == [1]
    assert sorted(plan.found) == [0, 2]


@pytest.mark.parametrize("size", [0, -3, True, 2.5])
def test_cache_size_must_be_a_positive_integer(size):
    with pytest.raises(ValueError, match="tower cache size"):
        TowerCache(size)


def test_reranker_option(tiny_prior_checkpoint, tiny_checkpoint):
    cached = Reranker.from_pretrained(tiny_prior_checkpoint, device="cpu", tower_cache=50)
    plain = Reranker.from_pretrained(tiny_prior_checkpoint, device="cpu")
    assert plain.info()["tower_cache"] is None
    first = cached.predict_texts(QUERIES, TEXTS)
    again = cached.predict_texts(QUERIES, TEXTS)
    assert cached.info()["tower_cache"] == {"size": 50, "entries": 5, "hits": 5, "misses": 5}
    expected = plain.predict_texts(QUERIES, TEXTS).scores
    for preds in (first, again):
        torch.testing.assert_close(
            torch.from_numpy(preds.scores), torch.from_numpy(expected), atol=1e-5, rtol=1e-5
        )
    # a model without towers has nothing to cache: the option is ignored and info() says so
    assert (
        Reranker.from_pretrained(tiny_checkpoint, device="cpu", tower_cache=50).info()["tower_cache"] is None
    )
    with pytest.raises(ValueError, match="tower_cache=-1"):
        Reranker.from_pretrained(tiny_prior_checkpoint, device="cpu", tower_cache=-1)
