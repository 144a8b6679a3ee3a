"""Each plot function writes a PNG, also for degenerate inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from esci_reranker.eval.plots import plot_confusion_matrix, plot_ndcg_histogram, plot_score_distribution

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path) -> None:
    run = pd.DataFrame({"esci_label": list("ESCIE"), "score": [0.9, 0.5, 0.2, -0.1, 0.7]})
    paths = [
        plot_confusion_matrix(
            [[2, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 3]], tmp_path / "a/cm.png"
        ),
        plot_ndcg_histogram({"model": [0.5, 1.0], "bm25": np.array([0.2])}, tmp_path / "h.png"),
        plot_score_distribution(run, tmp_path / "s.png"),
    ]
    for path in paths:
        assert path.read_bytes().startswith(PNG)


def test_plots_of_empty_inputs(tmp_path) -> None:
    empty = pd.DataFrame({"esci_label": pd.Series(dtype=str), "score": pd.Series(dtype=float)})
    assert plot_score_distribution(empty, tmp_path / "s.png").exists()
    assert plot_ndcg_histogram({}, tmp_path / "h.png").exists()
    assert plot_confusion_matrix(np.zeros((4, 4), int), tmp_path / "c.png").exists()
