"""The cross-encoder's outputs as named stacker inputs.

The stacker never sees tensors: it reads one float column per cross-encoder output, so the
same function serves out-of-fold training data and inference, and a column means the same in
both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from esci_reranker.labels import ESCI_LABELS

if TYPE_CHECKING:
    from esci_reranker.model.scorer import Scorer  # a Reranker, which builds on stack/


#: Columns ``cross_encoder_columns`` returns for a multi-task model with both priors, in order.
CE_COLUMNS: tuple[str, ...] = (
    "ce_score",
    "ce_gain",
    *(f"ce_p_{label}" for label in ESCI_LABELS),
    "ce_sub",
    "ce_cosine",
    "ce_coverage",
)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def cross_encoder_columns(
    out: Mapping[str, np.ndarray], prior_names: Sequence[str], gains: Mapping[str, float]
) -> dict[str, np.ndarray]:
    """Named float64 columns from ``Reranker.run_encoded`` outputs.

    Args:
        out: ``score`` (N,), and when present ``esci_logits`` (N, 4), ``substitute_logit`` (N,)
            and ``prior`` (N, F).
        prior_names: the model's ``config.prior_features`` (``cosine``, ``lexical``), naming
            ``prior``'s columns.
        gains: the gain of each label, for the expected gain.

    Returns:
        ``ce_score``; for a multi-task model ``ce_gain``, ``ce_p_E``..``ce_p_I``, ``ce_sub``; and
        ``ce_cosine`` / ``ce_coverage`` for the priors the model reads. Columns a model does not
        produce are absent (the stacker's manifest says which it needs).
    """
    cols: dict[str, np.ndarray] = {"ce_score": np.asarray(out["score"], dtype=np.float64)}
    if "esci_logits" in out:
        probs = _softmax(np.asarray(out["esci_logits"], dtype=np.float64))
        cols["ce_gain"] = probs @ np.array([gains[c] for c in ESCI_LABELS])
        for i, label in enumerate(ESCI_LABELS):
            cols[f"ce_p_{label}"] = probs[:, i]
        cols["ce_sub"] = 1.0 / (1.0 + np.exp(-np.asarray(out["substitute_logit"], dtype=np.float64)))
    if "prior" in out:
        prior = np.asarray(out["prior"], dtype=np.float64)
        names = {"cosine": "ce_cosine", "lexical": "ce_coverage"}
        for j, name in enumerate(prior_names):
            cols[names[name]] = prior[:, j]
    return cols


#: Columns of a split carried into an out-of-fold table beside the model outputs.
ID_COLUMNS: tuple[str, ...] = ("query_id", "product_id", "esci_label", "esci_query_source")


#: Raw outputs (``Scorer.run_encoded``'s) of parallel query and product-text lists.
RunFn = Callable[[list[str], list[str]], Mapping[str, np.ndarray]]


def frame_outputs(
    reranker: Scorer, frame: pd.DataFrame, progress: bool = False, run: RunFn | None = None
) -> pd.DataFrame:
    """The cross-encoder columns of every row of a prepared split, beside its id columns.

    Product text is built from the split's ``product_*`` columns with the model's own text
    fields, exactly as in training and ``Reranker.predict_frame``. ``run`` scores the pairs
    (default: tokenised and run here, in this process); a multi-process caller passes one that
    shares the passes out over its processes (``train.distributed.sharded_outputs``).
    """
    from esci_reranker.data.text import product_texts

    texts = product_texts(frame, reranker.config.text_fields, reranker.config.long_field_chars)
    queries, texts_list = frame["query"].astype(str).tolist(), texts.astype(str).tolist()
    if run is None:
        out = reranker.run_encoded(reranker.pair_encoder.encode(queries, texts_list), progress=progress)
    else:
        out = run(queries, texts_list)
    cols = cross_encoder_columns(out, reranker.config.prior_features, reranker.config.gains)
    table = frame[[c for c in ID_COLUMNS if c in frame.columns]].reset_index(drop=True).copy()
    for name, values in cols.items():
        table[name] = values
    return table
