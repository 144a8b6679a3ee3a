"""Train / val / test by ``query_id``: a query's candidates never straddle two splits.

Two split vocabularies are understood, decided by the values in the input's ``split`` column:

- **ESCI** (``train`` / ``test``, Amazon's files): ``test`` rows are the test split; a seeded
  fraction of the ``train`` queries becomes ``val``.
- **train / dev / holdout** (the bundled sample and other joined files): mapped
  ``train -> train``, ``dev -> val``, ``holdout -> test``; nothing is re-split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

import numpy as np
import pandas as pd

from esci_reranker.data.io import DataError

SPLITS: Final[tuple[str, ...]] = ("train", "val", "test")
SplitScheme = Literal["esci", "train-dev-holdout"]
#: Input ``split`` value -> output split, per scheme.
SPLIT_MAPS: Final[Mapping[str, Mapping[str, str]]] = {
    "esci": {"train": "train", "test": "test"},
    "train-dev-holdout": {"train": "train", "dev": "val", "holdout": "test"},
}
DEFAULT_VAL_FRAC: Final[float] = 0.1


def split_scheme(values: set[str], where: str) -> SplitScheme:
    """The scheme whose vocabulary holds every value of ``values``; ESCI's when both do (``train`` only).

    Raises:
        DataError: the values fit neither vocabulary.
    """
    for scheme, mapping in SPLIT_MAPS.items():
        if values <= mapping.keys():
            return scheme  # type: ignore[return-value]
    raise DataError(
        f"{where}: column 'split' holds {sorted(values)}; expected ESCI's values train/test or "
        "the sample's train/dev/holdout (not a mix)."
    )


def check_query_splits(query_ids: pd.Series, split: pd.Series, where: str) -> None:
    """Raise ``DataError`` if a ``query_id`` carries two different ``split`` values."""
    pairs = pd.DataFrame({"query_id": query_ids.to_numpy(), "split": split.to_numpy()})
    pairs = pairs.drop_duplicates()
    repeated = pairs["query_id"].duplicated(keep=False)
    if repeated.any():
        bad = pairs[repeated].sort_values(["query_id", "split"])
        shown = bad.groupby("query_id", sort=True)["split"].agg(lambda s: "/".join(map(str, s)))
        examples = ", ".join(f"{qid} ({splits})" for qid, splits in shown.head(5).items())
        raise DataError(
            f"{where}: {shown.size} query_id(s) have rows in two splits, e.g. {examples}; "
            "expected every row of a query in one split."
        )


def sample_val_queries(train_query_ids: np.ndarray, val_frac: float, seed: int) -> np.ndarray:
    """Choose ``round(val_frac * n)`` of the ``n`` distinct training query ids for validation.

    Deterministic: the ids are sorted first and drawn with ``numpy.random.default_rng(seed)``, so
    the choice depends only on the set of ids, ``val_frac`` and ``seed`` (not on row order). With
    two or more queries at least one goes to val and at least one stays in train.
    """
    ids = np.unique(train_query_ids)
    if ids.size < 2:
        return ids[:0]
    n_val = min(max(round(val_frac * ids.size), 1), ids.size - 1)
    chosen = np.random.default_rng(seed).choice(ids, size=n_val, replace=False)
    return np.sort(chosen)


def assign_splits(
    query_ids: pd.Series,
    split: pd.Series,
    *,
    val_frac: float = DEFAULT_VAL_FRAC,
    seed: int = 0,
    where: str = "input",
) -> tuple[pd.Series, SplitScheme]:
    """Map each row's input ``split`` to ``train`` / ``val`` / ``test``; see the module docstring.

    Returns the per-row split (a categorical with categories ``SPLITS``, same index as
    ``query_ids``) and the scheme that was applied.

    Raises:
        DataError: unknown split values, or a query with rows in two splits.
    """
    values = {str(v) for v in pd.unique(split)}
    scheme = split_scheme(values, where)
    check_query_splits(query_ids, split, where)
    mapped = np.asarray(split.map(SPLIT_MAPS[scheme]), dtype=object)
    if scheme == "esci":
        train = mapped == "train"
        val_ids = sample_val_queries(query_ids.to_numpy()[train], val_frac, seed)
        mapped[train & np.isin(query_ids.to_numpy(), val_ids)] = "val"
    result = pd.Series(pd.Categorical(mapped, categories=SPLITS), index=query_ids.index)
    return result, scheme
