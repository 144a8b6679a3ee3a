"""Fit the heads' prior weights to the training data before training starts.

A model with prior features (bi-encoder cosine, query-word coverage) starts with its heads'
projections at zero, so each head is an affine function of the priors. Left at the generic
start (score = sum of priors, flat class logits), the first steps spend their gradient on
rescaling: the cosine lives in ~[0.2, 0.8] while the gains are 0 or 1, and that error flows
back into the shared encoder. Fitting the affine maps first (least squares for the score,
class-weighted logistic regression for the two classifiers, on the zero-shot features of the
training pairs) makes step 0 the best a priors-only model can do on the training data, and
training learns only the correction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from esci_reranker.hardware import autocast
from esci_reranker.model import PairEncoder, RerankerModel
from esci_reranker.model.features import EncodedPairs
from esci_reranker.model.modeling import SUBSTITUTE_INDEX
from esci_reranker.model.tower_cache import TowerCache
from esci_reranker.model.unpadded import Sequences


@torch.inference_mode()
def prior_features(
    model: RerankerModel,
    encoder: PairEncoder,
    encoded: EncodedPairs,
    batch_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
    tower_cache: TowerCache | None = None,
) -> np.ndarray:
    """The (N, F) prior features (``model.config.prior_features``) of every encoded pair.

    The towers run padding-free where the encoder allows (``enable_unpadded``). With
    ``tower_cache``, a text whose embedding is in it skips its tower, and new ones are added:
    pass ``model.tower_cache.shared_tower_cache`` of the model's weights and ``autocast_dtype``,
    and the trainings of one process (a cross-validation's folds, the final model) embed each
    text once between them, as they all start from the same pretrained weights.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    previous_cache, previous_unpadded = model.tower_cache, model.unpadded
    model.tower_cache = tower_cache
    if model.config.prior == "cosine" and model.unpadded is None and len(encoded):
        probe = encoder.collate(encoded, list(range(min(len(encoded), 8))))
        model.enable_unpadded(
            [
                Sequences(probe[f"{side}_input_ids"].to(device), probe[f"{side}_attention_mask"].to(device))
                for side in ("query", "product")
            ]
        )
    rows = []
    try:
        for start in range(0, len(encoded), batch_size):
            index = list(range(start, min(start + batch_size, len(encoded))))
            batch = {k: v.to(device) for k, v in encoder.collate(encoded, index).items()}
            with autocast(device, autocast_dtype):
                rows.append(model.prior_features(batch).float().cpu().numpy())
    finally:
        # detached before train(): entering training mode clears the model's tower cache
        model.tower_cache = previous_cache
        model.train(was_training)
        model.unpadded = None if was_training else previous_unpadded
    return np.concatenate(rows) if rows else np.zeros((0, len(model.config.prior_features)), np.float32)


def _logistic(
    x: np.ndarray, y: np.ndarray, classes: Sequence[int], weights: dict[int, float] | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """Coefficients (K, F) and intercepts (K,) of a logistic regression, or None if a class is absent."""
    if set(np.unique(y)) != set(classes):
        return None
    fit = LogisticRegression(C=1.0, class_weight=weights, max_iter=1000).fit(x, y)
    return fit.coef_, fit.intercept_


def fit_prior_heads(
    model: RerankerModel, features: np.ndarray, labels: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fit each head's (prior weight, bias) to the features and E/S/C/I label indices, set them, return them.

    Score: least squares to the ESCI gain. E/S/C/I: multinomial logistic regression with the
    loss config's class weights. Substitute: binary logistic regression with its positive
    weight. A classifier whose classes are not all present in ``labels`` keeps its start.
    """
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels.")
    gains = model.gain_vector.cpu().numpy()[labels]  # (N,)
    design = np.hstack([features, np.ones((len(features), 1))])  # (N, F + 1)
    coef, *_ = np.linalg.lstsq(design, gains, rcond=None)
    fitted: dict[str, tuple[np.ndarray, np.ndarray]] = {"score": (coef[None, :-1], coef[-1:])}
    heads = model.heads
    loss = model.loss_config
    if "esci" in heads:
        weights = dict(enumerate(loss.class_weights)) if loss.class_weights is not None else None
        esci = _logistic(features, labels, range(4), weights)
        if esci is not None:
            fitted["esci"] = esci
    if "substitute" in heads:
        is_sub = (labels == SUBSTITUTE_INDEX).astype(int)
        pos = {0: 1.0, 1: loss.substitute_pos_weight} if loss.substitute_pos_weight else None
        sub = _logistic(features, is_sub, (0, 1), pos)
        if sub is not None:
            fitted["substitute"] = sub
    model.set_prior_heads(fitted)
    return fitted
