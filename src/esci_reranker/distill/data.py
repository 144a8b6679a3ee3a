"""The distillation pairs: train+val pairs of a prepared folder plus unlabelled pairs made from them.

A student learns from the teacher's outputs, not from labels, so any (query, product) pair the
teacher can score is a training example. Two kinds are used:

- **labelled**: the train and val pairs (their labels only feed the validation metrics);
- **unlabelled**: each train/val query paired with products of *other* train/val queries, never
  its own candidates. A share (``retrieved_share``) is the top of what a search of the train+val
  catalogue retrieves for the query (its judged products skipped): what a user's search brings
  back, often about something else, which neither of the other draws reaches. A share
  (``similar_share``) is drawn from the candidates of the query's most similar other queries
  (TF-IDF cosine of the query words): near misses the teacher tells apart (same kind of product,
  another size or brand), the rest uniformly from every product.
- **synthetic** (``synthetic_queries``, off by default): queries the set does not have, each a
  few words of a pool product's title in title order (as short as the real queries are), with
  the products a TF-IDF search of the pool's titles ranks first for it. The teacher meets them
  as it meets a user's new query, so the student learns how its teacher labels a search's
  results for queries neither was trained on, not only for the ~100 queries of the sample.

The retrieved lists come in as plain data (query id -> product ids in retrieval order): this
package sits beside ``retrieval`` and does not import it; ``esci-reranker distill`` retrieves them
(``retrieval.flow.catalogue_lists``). Only products of the pool (the train/val rows kept by the
test rules) are ever taken from a list, with their text from the pool, so a list from any
catalogue cannot bring in a test product, or any product or text from outside the set.

**The test split is never part of it**, and that is checked, not assumed: the test rows are
read only to drop every train/val row whose product or query (id, or text after lower-casing
and collapsing spaces) also appears there, so no test product's text and no test query reaches
the student, and ``check_no_test_leak`` raises if any does (it runs on every set built here).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

from esci_reranker.distill.config import DistillData

#: Columns that identify a pair.
PAIR_KEY: Final[tuple[str, str]] = ("query_id", "product_id")
#: Columns that describe the query of a pair (the rest, ``product_*``, describe the product).
QUERY_COLUMNS: Final[tuple[str, ...]] = ("query_id", "query", "esci_query_source")
#: ``source`` values of the pairs: a real query's judged and unjudged pairs, a synthetic query's.
LABELLED: Final[str] = "labelled"
UNLABELLED: Final[str] = "unlabelled"
SYNTHETIC: Final[str] = "synthetic"
#: ``draw`` values of the unlabelled pairs: where ``sample_unlabelled`` took each product from.
DRAWS: Final[tuple[str, ...]] = ("retrieved", "similar", "uniform", "synthetic")
#: Title words a synthetic query is drawn from: the first ones, where titles name the product.
SYNTHETIC_TITLE_WORDS: Final[int] = 12
#: query id -> product ids in retrieval order (``retrieval.flow.catalogue_lists``' output, as plain data).
RetrievedLists = Mapping[object, Sequence[str]]


class TestLeakError(ValueError):
    """A distillation set holds a test-split query or product."""

    __test__ = False  # not a pytest test class, despite the name


@dataclass(frozen=True)
class DistillPairs:
    """The distillation set and what the test rules removed.

    Attributes:
        frame: one row per pair: ``query_id``, ``query``, ``product_id``, the ``product_*``
            columns, ``esci_label`` (None for unlabelled pairs), ``source`` (``labelled``,
            ``unlabelled`` or ``synthetic``) and ``esci_query_source`` when the splits have it.
        excluded: rows of train+val left out, by reason (``test_product``, ``test_query``).
        draws: unlabelled pairs by where their product was drawn from (``DRAWS``).
    """

    frame: pd.DataFrame
    excluded: dict[str, int] = field(default_factory=dict)
    draws: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Pairs, queries and products of the set, labelled, unlabelled and synthetic pairs."""
        frame = self.frame
        synthetic = (frame["source"] == SYNTHETIC).to_numpy()
        return {
            "pairs": len(frame),
            "labelled_pairs": int((frame["source"] == LABELLED).sum()),
            "unlabelled_pairs": int((frame["source"] == UNLABELLED).sum()),
            "synthetic_pairs": int(synthetic.sum()),
            "queries": int(frame.loc[~synthetic, "query_id"].nunique()),
            "synthetic_queries": int(frame.loc[synthetic, "query_id"].nunique()),
            "products": int(frame["product_id"].nunique()),
        }


def normalise_query(text: object) -> str:
    """A query as compared across splits: lower case, single spaces, no outer spaces."""
    return " ".join(str(text).lower().split())


def read_labelled_and_test(data_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train+val rows (one frame) and the test rows of a prepared folder.

    Raises:
        FileNotFoundError: a split is missing; the test split is needed to keep it out.
    """
    from esci_reranker.train.loop import read_train_val, required_test_split

    test_path = required_test_split(data_dir, "its queries and products out of the distillation set")
    return read_train_val(data_dir), pd.read_parquet(test_path)


def drop_test_overlap(labelled: pd.DataFrame, test: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """``labelled`` without rows whose product or query (id or normalised text) is in ``test``."""
    test_products = set(test["product_id"].astype(str))
    test_queries = set(test["query"].map(normalise_query))
    test_query_ids = set(test["query_id"])
    product_hit = labelled["product_id"].astype(str).isin(test_products).to_numpy()
    query_hit = (
        labelled["query"].map(normalise_query).isin(test_queries) | labelled["query_id"].isin(test_query_ids)
    ).to_numpy()
    excluded = {
        "test_product": int(product_hit.sum()),
        "test_query": int((query_hit & ~product_hit).sum()),
    }
    return labelled[~(product_hit | query_hit)].reset_index(drop=True), excluded


def check_no_test_leak(pairs: pd.DataFrame, test: pd.DataFrame) -> None:
    """Raise ``TestLeakError`` if any test-split product id, query id or query text is in ``pairs``.

    The message names how many pairs leak and a few of the offending ids.
    """
    products = pairs["product_id"].astype(str).isin(set(test["product_id"].astype(str)))
    query_ids = pairs["query_id"].isin(set(test["query_id"]))
    query_texts = pairs["query"].map(normalise_query).isin(set(test["query"].map(normalise_query)))
    problems = []
    for name, hit, column in (
        ("test product id(s)", products, "product_id"),
        ("test query id(s)", query_ids, "query_id"),
        ("test query text(s)", query_texts, "query"),
    ):
        if hit.any():
            shown = pairs.loc[hit, column].astype(str).unique()[:3].tolist()
            problems.append(f"{int(hit.sum())} pair(s) with {name}, e.g. {shown}")
    if problems:
        raise TestLeakError(
            "the distillation set holds test-split data: " + "; ".join(problems) + ". The test split "
            "must never reach training: build the set with distill.data.distillation_pairs."
        )


def similar_queries(queries: pd.Series, k: int) -> np.ndarray:
    """(Q, min(k, Q-1)) row indices of each query's most similar *other* queries (TF-IDF cosine)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.neighbors import NearestNeighbors

    n = len(queries)
    k = min(k, n - 1)
    if k < 1:
        return np.zeros((n, 0), dtype=np.int64)
    vectors = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b").fit_transform(queries.map(normalise_query))
    # brute force in chunks on the sparse vectors: no Q x Q matrix is ever held
    _, index = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(vectors).kneighbors(vectors)
    rows = []
    for i, neighbours in enumerate(index):
        others = [j for j in neighbours if j != i][:k]  # ties may put the query itself anywhere
        rows.append(others)
    return np.asarray(rows, dtype=np.int64)


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int, exclude: set[int], chosen: list[int]) -> None:
    """Append up to ``n`` distinct entries of ``pool`` (product indices) not in ``exclude`` to ``chosen``."""
    allowed = pool[~np.isin(pool, list(exclude))] if exclude else pool
    take = min(n, len(allowed))
    if take:
        picked = rng.choice(allowed, size=take, replace=False).tolist()
        chosen.extend(picked)
        exclude.update(picked)


def _draw_range(rng: np.random.Generator, size: int, n: int, exclude: set[int], chosen: list[int]) -> None:
    """``_draw`` from the pool ``0 .. size-1`` (every product) without building the pool.

    Drawing from every product while leaving out a query's own candidates cost a pass over
    all products per query (~1.2M on the full data, for each of ~75k queries). Here the draw
    is made on positions among the allowed products, with the same random stream as ``_draw``'s
    (``Generator.choice`` of n items from L draws the same positions whether given L or an
    array of length L), and each position is mapped to its product by counting the excluded
    products before it: the same products as ``_draw``.
    """
    excluded = np.sort(np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
    allowed = size - len(excluded)
    take = min(n, allowed)
    if take:
        positions = rng.choice(allowed, size=take, replace=False)
        # excluded[j] - j allowed products lie before the j-th excluded one
        picked = (
            positions + np.searchsorted(excluded - np.arange(len(excluded)), positions, side="right")
        ).tolist()
        chosen.extend(picked)
        exclude.update(picked)


def _take_retrieved(
    ranked: Sequence[str], product_index: pd.Series, n: int, exclude: set[int], chosen: list[int]
) -> None:
    """Append the first ``n`` products of ``ranked`` (ids in retrieval order) that are in the pool
    (``product_index``: id -> row) and not in ``exclude`` to ``chosen``; no randomness."""
    taken = 0
    for product_id in ranked:
        if taken >= n:
            break
        row = product_index.get(str(product_id))
        # not in the pool: a product of a row the test rules dropped, or of another catalogue
        if row is None or int(row) in exclude:
            continue
        chosen.append(int(row))
        exclude.add(int(row))
        taken += 1


def sample_unlabelled(
    labelled: pd.DataFrame,
    cfg: DistillData,
    retrieved: RetrievedLists | None = None,
    avoid_queries: Collection[str] = (),
) -> pd.DataFrame:
    """Unlabelled pairs: each query of ``labelled`` with ``cfg.unlabelled_per_query`` products of
    other queries of ``labelled`` (never its own candidates); seeded by ``cfg.seed``.

    In each query's pairs, first the top of its ``retrieved`` list (``cfg.retrieved_share`` of
    them; products of ``labelled`` only, its own skipped), then the similar queries' candidates
    (``cfg.similar_share``), then uniform draws for the rest; a query whose list runs short gets
    more uniform draws. The retrieved part takes no random draw, so with ``retrieved_share`` 0 the
    random stream, and every pair, is what it was without the option. After them come the
    ``cfg.synthetic_queries`` synthetic queries' pairs (``synthetic_pairs``; their own stream).

    Args:
        retrieved: query id -> product ids in retrieval order; needed when ``cfg.retrieved_share``
            is above 0 (a query missing from it gets no retrieved products).
        avoid_queries: normalised query texts no synthetic query may be (the test split's).

    Returns:
        Rows with the query's columns, the product's ``product_*`` columns, ``esci_label`` None,
        ``source`` (``unlabelled``, or ``synthetic`` for a synthetic query's pairs) and ``draw``
        (``DRAWS``: where the product was taken from).

    Raises:
        ValueError: ``cfg.retrieved_share`` > 0 and no ``retrieved`` lists.
    """
    per_query = cfg.unlabelled_per_query
    query_cols = [c for c in QUERY_COLUMNS if c in labelled.columns]
    product_cols = [
        "product_id",
        *[c for c in labelled.columns if c.startswith("product_") and c != "product_id"],
    ]
    if per_query == 0 or labelled.empty:
        return pd.DataFrame(columns=[*query_cols, *product_cols, "esci_label", "source", "draw"])
    n_retrieved = round(per_query * cfg.retrieved_share)
    if n_retrieved and retrieved is None:
        raise ValueError(
            f"data.retrieved_share={cfg.retrieved_share}: the sampling needs each query's retrieved "
            "products (query id -> product ids); `esci-reranker distill` retrieves them from the "
            "train+val catalogue, or set data.retrieved_share=0."
        )
    products = labelled[product_cols].drop_duplicates("product_id").reset_index(drop=True)
    product_index = pd.Series(np.arange(len(products)), index=products["product_id"].astype(str))
    queries = labelled[query_cols].drop_duplicates("query_id").reset_index(drop=True)
    rows_of_query = {
        qid: product_index[ids.astype(str)].to_numpy()
        for qid, ids in labelled.groupby("query_id", sort=False)["product_id"]
    }
    neighbours = similar_queries(queries["query"], cfg.similar_queries)
    rng = np.random.default_rng([cfg.seed, 20_251_127])
    n_similar = round(per_query * cfg.similar_share)
    query_rows: list[int] = []
    product_rows: list[int] = []
    draws: list[str] = []
    for qi, qid in enumerate(queries["query_id"]):
        own = set(rows_of_query[qid].tolist())
        chosen: list[int] = []
        if n_retrieved and retrieved is not None:
            _take_retrieved(retrieved.get(qid, ()), product_index, n_retrieved, own, chosen)
        n_first = len(chosen)
        if n_similar and neighbours.shape[1]:
            near = np.unique(np.concatenate([rows_of_query[queries["query_id"][j]] for j in neighbours[qi]]))
            # capped: both shares rounded up can exceed the query's pairs by one
            _draw(rng, near, min(n_similar, per_query - n_first), own, chosen)
        n_near = len(chosen) - n_first
        _draw_range(rng, len(products), per_query - len(chosen), own, chosen)
        query_rows += [qi] * len(chosen)
        product_rows += chosen
        draws += (
            ["retrieved"] * n_first + ["similar"] * n_near + ["uniform"] * (len(chosen) - n_first - n_near)
        )
    frame = pd.concat(
        [
            queries.iloc[query_rows].reset_index(drop=True),
            products.iloc[product_rows].reset_index(drop=True),
        ],
        axis=1,
    )
    frame["esci_label"] = None
    frame["source"] = UNLABELLED
    frame["draw"] = draws
    if cfg.synthetic_queries:
        synthetic = synthetic_pairs(labelled, products, cfg, avoid_queries)
        frame = pd.concat([frame, synthetic[frame.columns]], ignore_index=True)
    return frame


def title_words(title: object) -> list[str]:
    """The first ``SYNTHETIC_TITLE_WORDS`` words of a title, lower case (letters and digits,
    with inner apostrophes and points kept: "women's", "2.5"); none for a missing title."""
    if title is None or (isinstance(title, float) and np.isnan(title)):
        return []
    words = re.findall(r"[a-z0-9]+(?:['.][a-z0-9]+)*", str(title).lower())
    return words[:SYNTHETIC_TITLE_WORDS]


def synthetic_query_texts(
    titles: Sequence[object],
    lengths: np.ndarray,
    n: int,
    rng: np.random.Generator,
    avoid: Collection[str] = (),
) -> tuple[list[str], list[int]]:
    """Up to ``n`` distinct query texts made from ``titles``, and the title each came from.

    Titles are visited in a random order; each gives a query of ``k`` of its first words
    (``title_words``) kept in title order, ``k`` drawn from ``lengths`` (the real queries'
    word counts, so the queries are as short as real ones) and capped at the title's words.
    A text already made, or in ``avoid`` (normalised), is skipped.
    """
    texts: list[str] = []
    origins: list[int] = []
    seen = set(avoid)
    for i in rng.permutation(len(titles)):
        if len(texts) >= n:
            break
        words = title_words(titles[i])
        if not words:
            continue
        k = min(int(rng.choice(lengths)), len(words))
        picked = np.sort(rng.choice(len(words), size=k, replace=False))
        text = " ".join(words[j] for j in picked)
        if text in seen:
            continue
        seen.add(text)
        texts.append(text)
        origins.append(int(i))
    return texts, origins


def title_search(titles: Sequence[object], queries: Sequence[str], k: int) -> np.ndarray:
    """(Q, min(k, P)) rows of ``titles`` a TF-IDF search ranks first for each query (cosine)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.neighbors import NearestNeighbors

    vectorizer = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b", sublinear_tf=True)
    vectors = vectorizer.fit_transform([normalise_query(t) for t in titles])
    k = min(k, len(titles))
    _, index = (
        NearestNeighbors(n_neighbors=k, metric="cosine")
        .fit(vectors)
        .kneighbors(vectorizer.transform(list(queries)))
    )
    return np.asarray(index, dtype=np.int64)


def synthetic_query_ids(existing: pd.Series, n: int) -> list[object]:
    """``n`` query ids no real query has: negative integers below every id when the ids are
    integers (the prepared splits' ``int64``), else ``synthetic-<i>``."""
    if pd.api.types.is_integer_dtype(existing):
        start = min(int(existing.min()) if len(existing) else 0, 0) - 1
        return [start - i for i in range(n)]
    taken = set(existing.astype(str))
    ids = [f"synthetic-{i}" for i in range(n)]
    if taken.intersection(ids):
        raise ValueError("synthetic_query_ids: the data already has query ids named synthetic-<i>.")
    return list(ids)


def synthetic_pairs(
    labelled: pd.DataFrame, products: pd.DataFrame, cfg: DistillData, avoid_queries: Collection[str] = ()
) -> pd.DataFrame:
    """The synthetic queries' pairs over ``products`` (the pool; see the module docstring).

    ``cfg.synthetic_queries`` queries (``synthetic_query_texts``: fewer if the titles run out),
    each paired with the ``cfg.synthetic_per_query`` products ``title_search`` ranks first for
    it, in that order. Seeded by ``cfg.seed`` on a stream of their own.

    Raises:
        ValueError: the products have no ``product_title`` to make queries from.
    """
    if "product_title" not in products.columns:
        raise ValueError(
            "data.synthetic_queries: the products have no product_title column to make queries "
            "from; set data.synthetic_queries=0."
        )
    titles = products["product_title"].fillna("").astype(str).tolist()
    query_cols = [c for c in QUERY_COLUMNS if c in labelled.columns]
    real = labelled.drop_duplicates("query_id")["query"].map(normalise_query)
    lengths = np.clip(real.str.split().str.len().to_numpy(), 1, None)
    rng = np.random.default_rng([cfg.seed, 20_261_207])
    avoid = {*map(normalise_query, avoid_queries), *real}
    texts, _ = synthetic_query_texts(titles, lengths, cfg.synthetic_queries, rng, avoid)
    if not texts:
        return pd.DataFrame(columns=[*query_cols, *products.columns, "esci_label", "source", "draw"])
    ranked = title_search(titles, texts, cfg.synthetic_per_query)
    ids = synthetic_query_ids(labelled["query_id"], len(texts))
    frame = products.iloc[ranked.ravel()].reset_index(drop=True)
    frame.insert(0, "query_id", np.repeat(np.asarray(ids, dtype=object), ranked.shape[1]))
    frame.insert(1, "query", np.repeat(np.asarray(texts, dtype=object), ranked.shape[1]))
    if "esci_query_source" in query_cols:
        frame.insert(2, "esci_query_source", SYNTHETIC)
    if pd.api.types.is_integer_dtype(labelled["query_id"]):
        frame["query_id"] = frame["query_id"].astype(labelled["query_id"].dtype)
    frame["esci_label"] = None
    frame["source"] = SYNTHETIC
    frame["draw"] = "synthetic"
    return frame


def distillation_pairs(
    data_dir: str | Path, cfg: DistillData, retrieved: RetrievedLists | None = None
) -> DistillPairs:
    """Build the distillation set of a prepared folder (see the module docstring).

    Args:
        retrieved: query id -> product ids in retrieval order from the train+val catalogue
            (``sample_unlabelled``); needed when ``cfg.retrieved_share`` is above 0.

    Raises:
        FileNotFoundError: a split is missing.
        ValueError: ``cfg.retrieved_share`` > 0 and no ``retrieved`` lists.
        TestLeakError: the set would hold test data (never expected: it is a last check).
    """
    labelled, test = read_labelled_and_test(data_dir)
    kept, excluded = drop_test_overlap(labelled, test)
    kept = kept.assign(source=LABELLED)
    unlabelled = sample_unlabelled(kept, cfg, retrieved, avoid_queries=test["query"].astype(str))
    draws = {name: int((unlabelled["draw"] == name).sum()) for name in DRAWS}
    frame = pd.concat(
        [kept, unlabelled[[c for c in unlabelled.columns if c in kept.columns]]], ignore_index=True
    )
    check_no_test_leak(frame, test)
    return DistillPairs(frame=frame, excluded=excluded, draws=draws)


def distillation_queries(data_dir: str | Path) -> pd.DataFrame:
    """``query_id`` and ``query`` of every query of the distillation set (train+val after the test
    rules): the queries whose retrieved lists ``distillation_pairs`` reads."""
    labelled, test = read_labelled_and_test(data_dir)
    kept, _ = drop_test_overlap(labelled, test)
    return kept[["query_id", "query"]].drop_duplicates("query_id").reset_index(drop=True)


def validation_queries(pairs: pd.DataFrame, share: float, seed: int) -> set[object]:
    """The held-out share of the real queries of ``pairs`` (seeded, by query; ``data.splits``'
    rule). Synthetic queries are never held out: validation watches the queries users ask, and
    the draw is the same with and without them."""
    from esci_reranker.data.splits import sample_val_queries

    real = pairs["query_id"] if "source" not in pairs else pairs.loc[pairs["source"] != SYNTHETIC, "query_id"]
    return set(sample_val_queries(np.asarray(pd.unique(real)), share, seed).tolist())


def label_counts(frame: pd.DataFrame) -> Mapping[str, int]:
    """How many pairs carry each label (labelled pairs only)."""
    labels = frame.loc[frame["source"] == LABELLED, "esci_label"].astype(str)
    return {str(k): int(v) for k, v in labels.value_counts().sort_index().items()}
