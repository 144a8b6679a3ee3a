"""Tokenised pairs cached per process: the same inputs as tokenising again, each pair once."""

from __future__ import annotations

from esci_reranker.model import PairEncoder
from esci_reranker.train.token_cache import encode_pairs
from tests.conftest import build_tiny_model

QUERIES = ["aa batteries", "aa batteries", "usb c cable", "lamp"]
TEXTS = ["Duracell AA Battery 24 pack", "Garden hose " * 30, "Anker USB C cable", "Desk lamp | Ikea"]


class _CountingTokenizer:
    """The real tokenizer, counting the texts it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.inner = tokenizer
        self.texts = 0

    def __call__(self, text, *args, **kwargs):
        self.texts += len(text)
        return self.inner(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)


def test_cached_pairs_equal_a_fresh_encoding_and_are_tokenised_once():
    model, tokenizer = build_tiny_model(prior="cosine", lexical=True, max_length=16)
    counting = _CountingTokenizer(tokenizer)
    encoder = PairEncoder(counting, model.config)  # type: ignore[arg-type]
    subset = encode_pairs(encoder, QUERIES[:2], TEXTS[:2])
    tokenised = counting.texts
    full = encode_pairs(encoder, QUERIES, TEXTS)
    alone = _CountingTokenizer(tokenizer)
    PairEncoder(alone, model.config).encode(QUERIES[2:], TEXTS[2:])  # type: ignore[arg-type]
    assert counting.texts - tokenised == alone.texts  # only the two new pairs were tokenised
    again = counting.texts
    reordered = encode_pairs(encoder, QUERIES[::-1], TEXTS[::-1])
    assert counting.texts == again  # all four from the cache
    fresh = PairEncoder(tokenizer, model.config).encode(QUERIES, TEXTS)
    assert full == fresh
    assert subset.pair_ids == fresh.pair_ids[:2]
    assert reordered.product_ids == fresh.product_ids[::-1]
    assert fresh.truncated[1]  # the long text was cut, and the flag comes through the cache
    assert reordered.truncated == fresh.truncated[::-1]


def test_another_max_length_is_another_cache():
    model, tokenizer = build_tiny_model(prior="cosine", max_length=16)
    short = encode_pairs(PairEncoder(tokenizer, model.config), QUERIES, TEXTS)
    model.config.max_length = 64
    long = encode_pairs(PairEncoder(tokenizer, model.config), QUERIES, TEXTS)
    assert long == PairEncoder(tokenizer, model.config).encode(QUERIES, TEXTS)
    assert len(long.pair_ids[1]) > len(short.pair_ids[1])
