"""``Scorer``: the face of ``reranker.Reranker`` that the layers below it are handed.

The stacker's training data (``stack.outputs``) and the evaluation runner (``eval.runner``) take a
loaded reranker as an argument; they type it with this protocol rather than by importing
``Reranker``, which builds on them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from esci_reranker.model.config import ModelConfig
    from esci_reranker.model.features import EncodedPairs, PairEncoder


class Scorer(Protocol):
    """A loaded model that scores pairs: its config, input builder, raw outputs and predictions."""

    config: ModelConfig
    pair_encoder: PairEncoder
    #: Where the model came from, for reports.
    name: str

    @property
    def substitute_threshold(self) -> float:
        """P(substitute) at or above which a pair is called a substitute."""
        ...

    def run_encoded(self, encoded: EncodedPairs, progress: bool = False) -> dict[str, np.ndarray]:
        """Raw model outputs (``score``, ``esci_logits``, ...) of every encoded pair."""
        ...

    def predict_frame(self, frame: pd.DataFrame, progress: bool = True) -> Any:
        """``Predictions`` (defined with ``Reranker``) for every row of a prepared split."""
        ...
