"""Fitting the prior heads before training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esci_reranker.model import PairEncoder
from esci_reranker.train.prior_init import fit_prior_heads, prior_features
from tests.conftest import build_tiny_model

# (query, product text, label index in E, S, C, I): more query words found -> more relevant.
ROWS = [
    ("aa batteries", "Duracell AA Battery 24 pack", 0),
    ("aa batteries", "Energizer AA batteries", 0),
    ("aa batteries", "AAA battery charger", 1),
    ("aa batteries", "Battery organizer box", 2),
    ("aa batteries", "Garden hose 50 ft", 3),
    ("usb c cable", "Anker USB C cable", 0),
    ("usb c cable", "USB cable micro", 1),
    ("usb c cable", "USB wall charger", 2),
    ("usb c cable", "Desk lamp", 3),
    ("usb c cable", "Coffee mug", 3),
]


def _data(model, tokenizer):
    encoder = PairEncoder(tokenizer, model.config)
    encoded = encoder.encode([r[0] for r in ROWS], [r[1] for r in ROWS])
    return encoder, encoded, np.array([r[2] for r in ROWS])


def test_fitted_heads_reproduce_least_squares_and_logistic_fits():
    model, tokenizer = build_tiny_model(prior="cosine", lexical=True)
    encoder, encoded, labels = _data(model, tokenizer)
    features = prior_features(model, encoder, encoded, batch_size=4)
    assert features.shape == (len(ROWS), 2)
    np.testing.assert_allclose(features[:, 1], encoded.lexical, rtol=1e-6)
    fitted = fit_prior_heads(model, features, labels)
    assert set(fitted) == {"score", "esci", "substitute"}

    with torch.inference_mode():
        out = model(**encoder.collate(encoded, list(range(len(ROWS)))))
    design = np.hstack([features, np.ones((len(ROWS), 1))])
    gains = np.array([1.0, 0.1, 0.01, 0.0])[labels]
    coef, *_ = np.linalg.lstsq(design, gains, rcond=None)
    np.testing.assert_allclose(out.score.numpy(), design @ coef, atol=1e-5)
    # The fit beats the generic start (score = cosine + coverage) on the training data.
    assert np.mean((design @ coef - gains) ** 2) < np.mean((features.sum(1) - gains) ** 2)
    weight, bias = fitted["esci"]
    np.testing.assert_allclose(out.esci_logits.numpy(), features @ weight.T + bias, atol=1e-5)
    assert out.esci_logits.argmax(-1)[labels == 0].eq(0).float().mean() > 0.5


def test_a_class_missing_from_the_labels_keeps_that_head_flat():
    model, tokenizer = build_tiny_model(lexical=True)
    encoder, encoded, _ = _data(model, tokenizer)
    labels = np.array([0, 0, 3, 3, 3, 0, 3, 3, 3, 3])  # no S, no C
    fitted = fit_prior_heads(model, prior_features(model, encoder, encoded), labels)
    assert set(fitted) == {"score"}
    torch.testing.assert_close(model.esci_head.prior_weight, torch.zeros(4, 1))


def test_mismatched_rows_are_an_error():
    model, _ = build_tiny_model(lexical=True)
    with pytest.raises(ValueError, match="3 feature rows but 2 labels"):
        fit_prior_heads(model, np.zeros((3, 1)), np.array([0, 1]))


def test_a_shared_tower_cache_gives_the_same_features_and_embeds_each_text_once():
    from esci_reranker.model.tower_cache import TowerCache, shared_tower_cache, weights_fingerprint

    model, tokenizer = build_tiny_model(prior="cosine", lexical=True)
    encoder, encoded, _ = _data(model, tokenizer)
    plain = prior_features(model, encoder, encoded, batch_size=4)
    cache = TowerCache(100)
    first = prior_features(model, encoder, encoded, batch_size=4, tower_cache=cache)
    texts = {r[1] for r in ROWS} | {r[0] for r in ROWS}
    assert cache.stats()["entries"] == len(texts)
    misses = cache.stats()["misses"]
    second = prior_features(model.train(), encoder, encoded, batch_size=3, tower_cache=cache)
    assert cache.stats()["misses"] == misses  # all looked up, none encoded again
    assert cache.stats()["entries"] == len(texts)  # the model's train() did not clear it
    assert model.training
    assert model.tower_cache is None
    assert model.unpadded is None
    np.testing.assert_allclose(first, plain, atol=1e-5)
    np.testing.assert_allclose(second, plain, atol=1e-5)
    key = weights_fingerprint(model.encoder)
    assert shared_tower_cache(key) is shared_tower_cache(key)
    other, _ = build_tiny_model(prior="cosine", seed=1)
    assert weights_fingerprint(other.encoder) != key
