"""The ESCI label set and its gain tables, defined once for the whole package.

ESCI labels every (query, product) pair as one of:

- ``E`` exact: the product is relevant to the query and satisfies every specification;
- ``S`` substitute: somewhat relevant, fails some aspect but can stand in for the item;
- ``C`` complement: does not fulfil the query but could be used with an exact item;
- ``I`` irrelevant.

Task 1 (ranking) uses the gains E=1.0, S=0.1, C=0.01, I=0.0 (the ESCI paper). The official KDD Cup
scorer script swaps S and C (S=0.01, C=0.1; reported in the esci-data repository); that table is kept here as
``OFFICIAL_SCRIPT_GAINS`` so evaluation can reproduce the leaderboard numbers when asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

import numpy as np

EsciLabel = Literal["E", "S", "C", "I"]

#: Class order used by every 4-class output in the package (logits, probabilities, confusion matrix).
ESCI_LABELS: Final[tuple[str, ...]] = ("E", "S", "C", "I")
LABEL_TO_INDEX: Final[Mapping[str, int]] = {label: i for i, label in enumerate(ESCI_LABELS)}
LABEL_NAMES: Final[Mapping[str, str]] = {
    "E": "exact",
    "S": "substitute",
    "C": "complement",
    "I": "irrelevant",
}

#: Task 1 gains from the ESCI paper; the regression target and the default nDCG gains.
ESCI_GAINS: Final[Mapping[str, float]] = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}
#: Gains as the official KDD Cup scorer script applies them (S and C swapped, reported in the esci-data repository).
OFFICIAL_SCRIPT_GAINS: Final[Mapping[str, float]] = {"E": 1.0, "S": 0.01, "C": 0.1, "I": 0.0}
GAIN_TABLES: Final[Mapping[str, Mapping[str, float]]] = {
    "esci": ESCI_GAINS,
    "official-script": OFFICIAL_SCRIPT_GAINS,
}

#: Task 3: the positive class of the binary "is substitute" task.
SUBSTITUTE_LABEL: Final[str] = "S"


def gain_table(name: str) -> Mapping[str, float]:
    """Return the gain table called ``name`` (``"esci"`` or ``"official-script"``)."""
    try:
        return GAIN_TABLES[name]
    except KeyError:
        raise ValueError(f"Unknown gains {name!r}: expected one of {sorted(GAIN_TABLES)}.") from None


def gain_vector(gains: Mapping[str, float] = ESCI_GAINS) -> np.ndarray:
    """The gains in ``ESCI_LABELS`` order, shape (4,): ``probs @ gain_vector()`` is the expected gain."""
    return np.array([gains[label] for label in ESCI_LABELS], dtype=np.float64)


def check_labels(labels: object, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` if any of ``labels`` is not one of E/S/C/I."""
    unknown = sorted({str(x) for x in labels} - set(ESCI_LABELS))  # type: ignore[attr-defined]
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5])
        raise ValueError(f"{where}: unknown esci_label value(s) {shown}; expected one of E, S, C, I.")
