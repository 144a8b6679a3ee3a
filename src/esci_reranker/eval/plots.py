"""PNG plots of an evaluation: confusion matrix, per-query nDCG histogram, scores per true label.

Figures are built with ``matplotlib.figure.Figure`` and saved with the Agg renderer, so nothing
touches pyplot's global state or needs a display. Each function writes one file and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from esci_reranker.labels import ESCI_LABELS, LABEL_NAMES

_DPI = 120
_LABEL_COLORS = {"E": "#2a9d8f", "S": "#e9c46a", "C": "#f4a261", "I": "#e76f51"}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def plot_confusion_matrix(
    matrix: np.ndarray | Sequence[Sequence[int]],
    path: str | Path,
    labels: Sequence[str] = ESCI_LABELS,
    title: str = "Task 2 confusion matrix",
) -> Path:
    """Heat map of the row-normalised matrix (share of each true class), annotated with counts."""
    counts = np.asarray(matrix, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig = Figure(figsize=(4.8, 4.2))
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of true class")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            color = "white" if shares[i, j] > 0.6 else "black"
            ax.text(
                j, i, f"{counts[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center", color=color, fontsize=8
            )
    return _save(fig, path)


def plot_ndcg_histogram(
    per_query: Mapping[str, Sequence[float] | np.ndarray],
    path: str | Path,
    metric: str = "nDCG",
    bins: int = 20,
) -> Path:
    """Histogram of per-query values (one step outline per run), bins over [0, 1]."""
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot()
    edges = np.linspace(0.0, 1.0, bins + 1)
    for name, values in per_query.items():
        values = np.asarray(values, dtype=np.float64)
        mean = float(values.mean()) if len(values) else 0.0
        ax.hist(
            values, bins=edges.tolist(), histtype="step", linewidth=1.6, label=f"{name} (mean {mean:.3f})"
        )
    ax.set_xlabel(f"{metric} per query")
    ax.set_ylabel("queries")
    ax.set_xlim(0.0, 1.0)
    ax.set_title(f"{metric} per query")
    if per_query:
        ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_score_distribution(
    run: pd.DataFrame, path: str | Path, score_column: str = "score", bins: int = 40
) -> Path:
    """Density histogram of ``score_column`` for each true label (E, S, C, I) of a run frame."""
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot()
    scores = run[score_column].to_numpy(dtype=np.float64)
    finite = scores[np.isfinite(scores)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    labels = run["esci_label"].astype(str).to_numpy()
    for label in ESCI_LABELS:
        values = scores[(labels == label) & np.isfinite(scores)]
        if len(values):
            ax.hist(
                values,
                bins=edges.tolist(),
                density=True,
                histtype="step",
                linewidth=1.6,
                color=_LABEL_COLORS[label],
                label=f"{label} {LABEL_NAMES[label]} (n={len(values)})",
            )
    ax.set_xlabel(score_column)
    ax.set_ylabel("density")
    ax.set_title(f"{score_column} by true label")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_reliability(
    bins: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    title: str = "Calibration (judged pairs)",
) -> Path:
    """Reliability diagram: observed rate against mean predicted probability per bin, one line per
    class (``eval.calibration.reliability`` output by label), the diagonal for reference."""
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="calibrated")
    for label, table in bins.items():
        ax.plot(
            table["predicted"],
            table["observed"],
            marker="o",
            color=_LABEL_COLORS.get(label),
            label=f"P({label}) {LABEL_NAMES.get(label, label)}",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("observed share of the class")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)
