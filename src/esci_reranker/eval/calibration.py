"""Calibration of predicted probabilities: reliability bins and the expected calibration error.

With the predictions of one class cut into ``bins`` equal-width bins of the predicted probability,

    ECE = sum_b (n_b / N) * | mean(y in b) - mean(p in b) |

where ``y`` is 1 when the class is the true one. Pure functions: they return numbers and never
write or log.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import numpy as np

#: Equal-width bins of the reliability diagram and the ECE.
DEFAULT_BINS: Final[int] = 10


def calibration_counts(
    probs: np.ndarray, truth: np.ndarray, bins: int = DEFAULT_BINS
) -> dict[str, list[float]]:
    """Per equal-width bin of ``probs`` (all ``bins`` of them): the rows, the sum of the predictions
    and the sum of ``truth`` (0/1). Unlike ``reliability``'s means, these add up across sets of
    rows, so the ECE of several sets together (``pooled_ece``) needs no rows. Rows whose
    probability is not a number (a model without that class) are left out."""
    probs = np.asarray(probs, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    finite = np.isfinite(probs)
    probs, truth = probs[finite], truth[finite]
    index = np.minimum((probs * bins).astype(np.int64), bins - 1)
    return {
        "rows": np.bincount(index, minlength=bins).astype(float).tolist(),
        "sum_predicted": np.bincount(index, weights=probs, minlength=bins).tolist(),
        "sum_observed": np.bincount(index, weights=truth, minlength=bins).tolist(),
    }


def reliability(probs: np.ndarray, truth: np.ndarray, bins: int = DEFAULT_BINS) -> dict[str, list[float]]:
    """Per equal-width bin of ``probs``: its share of rows, mean prediction and observed rate.

    Empty bins are left out. ``truth`` is 0/1 (is the class right). Pure: feeds the reliability
    plot; the bins are ``calibration_counts``'.
    """
    counts = calibration_counts(probs, truth, bins)
    total = sum(counts["rows"])
    out: dict[str, list[float]] = {"bin": [], "share": [], "predicted": [], "observed": []}
    for b, (n, predicted, observed) in enumerate(
        zip(counts["rows"], counts["sum_predicted"], counts["sum_observed"], strict=True)
    ):
        if n:
            out["bin"].append(float(b))
            out["share"].append(n / total)
            out["predicted"].append(predicted / n)
            out["observed"].append(observed / n)
    return out


def expected_calibration_error(probs: np.ndarray, truth: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """ECE of the module docstring (NaN for no rows)."""
    return pooled_ece([calibration_counts(probs, truth, bins)])


def pooled_ece(counts: Iterable[Mapping[str, Sequence[float]]]) -> float:
    """The ECE of the rows behind several ``calibration_counts`` taken together: the same number as
    ``expected_calibration_error`` of the concatenated rows (NaN for no rows)."""
    rows = predicted = observed = None
    for part in counts:
        r, p, o = (np.asarray(part[k], dtype=np.float64) for k in ("rows", "sum_predicted", "sum_observed"))
        rows, predicted, observed = (r, p, o) if rows is None else (rows + r, predicted + p, observed + o)
    if rows is None or rows.sum() == 0:
        return float("nan")
    full = rows > 0
    return float(np.abs(observed[full] - predicted[full]).sum() / rows.sum())
