"""Calibrated E/S/C/I probabilities: a temperature and per-class biases on the log-probabilities.

The multiclass trees are fitted with catalogue negatives and class weights, so their raw
probabilities need not match how often a class is right on judged pairs. ``ClassCalibration``
maps raw probabilities ``p`` to ``softmax(log p / T + b)`` with ``b_E = 0``: one temperature
that widens or narrows every distribution and a bias per class that moves its base rate. It is
fitted (``fit_calibration``) by minimising the log-loss on out-of-fold predictions of the
training queries, never on the rows it is then measured on (evaluation reports its expected
calibration error: ``eval.calibration``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from esci_reranker.labels import ESCI_LABELS


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class ClassCalibration:
    """``softmax(log p / temperature + bias)``; the identity is ``temperature=1``, zero biases."""

    temperature: float = 1.0
    bias: list[float] = field(default_factory=lambda: [0.0] * len(ESCI_LABELS))

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """(N, 4) calibrated probabilities of (N, 4) raw ones (E/S/C/I order)."""
        if len(probs) == 0:
            return np.asarray(probs, dtype=np.float64).reshape(0, len(ESCI_LABELS))
        return _softmax(_log_probs(probs) / self.temperature + np.asarray(self.bias)[None, :])

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (``stacker.json``)."""
        return {
            "temperature": float(self.temperature),
            "bias": dict(zip(ESCI_LABELS, map(float, self.bias), strict=True)),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ClassCalibration:
        """Inverse of ``to_dict``; raises ``ValueError`` naming a missing or bad field."""
        bias = data.get("bias")
        if not isinstance(bias, Mapping) or set(bias) != set(ESCI_LABELS):
            raise ValueError(f"calibration: bias must map {list(ESCI_LABELS)} to numbers, got {bias!r}.")
        temperature = float(data.get("temperature", 1.0))  # type: ignore[arg-type]
        if not np.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"calibration: temperature={temperature}; expected a positive number.")
        return cls(temperature, [float(bias[c]) for c in ESCI_LABELS])


def fit_calibration(
    probs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> ClassCalibration:
    """The temperature and biases (``b_E = 0``) minimising the weighted log-loss of ``labels``.

    Args:
        probs: (N, 4) out-of-fold class probabilities, E/S/C/I order.
        labels: (N,) true class indices.
        weights: (N,) row weights (default 1).
    """
    from scipy.optimize import minimize

    logp = _log_probs(probs)
    labels = np.asarray(labels, dtype=np.int64)
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    k = logp.shape[1]
    onehot = np.eye(k)[labels]

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        # theta = (log T, b_S, b_C, b_I); log T keeps the temperature positive
        inv_t = np.exp(-theta[0])
        bias = np.concatenate([[0.0], theta[1:]])
        z = logp * inv_t + bias[None, :]
        z = z - z.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(z).sum(axis=1))
        nll = float(np.sum(w * (log_norm - (z * onehot).sum(axis=1))))
        resid = (_softmax(z) - onehot) * w[:, None]  # d nll / d z
        grad_t = float(np.sum(resid * logp) * -inv_t)
        return nll, np.concatenate([[grad_t], resid.sum(axis=0)[1:]])

    result = minimize(
        loss, np.zeros(k), jac=True, method="L-BFGS-B", bounds=[(-3.0, 3.0)] + [(-10, 10)] * (k - 1)
    )
    theta = result.x
    return ClassCalibration(float(np.exp(theta[0])), [0.0, *map(float, theta[1:])])
