"""Hand-made features of (query, product) pairs for the stacker, and features across each query's list.

Every function here is pure and needs only the pairs themselves (and, for list features, the
other candidates of the same query), so a pair gets the same features at training and at
inference whatever else is scored with it. Missing information is NaN, never 0: the trees tell
"no brand given" from "brand not in the query".

Groups of features (``feature_table`` builds them all):

- **priors per field**: query-word coverage (``model.lexical.query_coverage``) of the title, of
  brand + colour, of bullets + description and of all text; BM25 of the title, of title +
  brand + colour and of bullets + description within the query's candidate list.
- **structured matches**: the product's brand named in the query; another candidate's brand
  named in the query but not this product's; colour words of the query present in, or
  contradicted by, the product; numbers, sizes with units and model numbers of the query found
  in the product text.
- **negation**: for "without X" / "no X" / "not X" / "non X" / "X-free" queries, whether X
  appears in the product text.
- **lengths and missing fields**.
- **list features**: each chosen score's rank (as a fraction of the list), z-score and gap to
  the best within the query's list, the list length.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import pandas as pd
from cachetools import LRUCache

from esci_reranker.data.text import FIELD_COLUMNS, clean_text
from esci_reranker.model.lexical import PREFIX_CHARS, stopwords, word_tokens

#: Product fields the features read (the ESCI column without its ``product_`` prefix).
PRODUCT_FIELDS: Final[tuple[str, ...]] = ("title", "brand", "color", "bullets", "description")

_WORD: Final = re.compile(r"[a-z0-9]+(?:[.'][a-z0-9]+)*")
_NUMBER: Final = re.compile(r"\d+(?:\.\d+)?")
#: A number followed by a unit, with or without a space ("16 oz", "16oz", "2.5mm", "3-pack").
_UNIT: Final = re.compile(
    r"(\d+(?:\.\d+)?)\s*-?\s*"
    r"(fl\.? ?oz|oz|ounces?|ml|l|liters?|litres?|gal|gallons?|lbs?|pounds?|kg|g|grams?|mg|"
    r"mm|cm|m|in|inch|inches|ft|feet|foot|yds?|yards?|gb|tb|mb|mah|w|watts?|v|volts?|"
    r"pack|pk|packs|count|ct|pcs|pieces?|pairs?|sets?|qt|quarts?|x)\b"
)
_UNIT_ALIASES: Final[Mapping[str, str]] = {
    "ounce": "oz", "ounces": "oz", "fl oz": "floz", "fl.oz": "floz", "fl. oz": "floz", "floz": "floz",
    "liter": "l", "liters": "l", "litre": "l", "litres": "l", "gallon": "gal", "gallons": "gal",
    "lb": "lb", "lbs": "lb", "pound": "lb", "pounds": "lb", "gram": "g", "grams": "g",
    "inch": "in", "inches": "in", "feet": "ft", "foot": "ft", "yd": "yd", "yds": "yd", "yard": "yd",
    "yards": "yd", "watt": "w", "watts": "w", "volt": "v", "volts": "v", "pk": "pack", "packs": "pack",
    "count": "ct", "pcs": "ct", "piece": "ct", "pieces": "ct", "pair": "pair", "pairs": "pair",
    "set": "set", "sets": "set", "quart": "qt", "quarts": "qt",
}  # fmt: skip
#: Tokens with letters and digits ("a2141", "rtx3080", "m1"): model numbers and part codes.
_MODEL: Final = re.compile(r"^(?=.*[a-z])(?=.*\d)[a-z0-9\-]{2,}$")
#: Words that exclude the next (non-stopword) word of a query: "shampoo without sulfate".
NEGATIONS: Final[frozenset[str]] = frozenset({"without", "no", "not", "non", "minus", "excluding"})
#: Colour words: a query naming one the product contradicts is asking for something else.
COLORS: Final[frozenset[str]] = frozenset({
    "black", "white", "red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "grey",
    "gray", "silver", "gold", "beige", "navy", "teal", "turquoise", "maroon", "burgundy", "ivory",
    "cream", "tan", "khaki", "olive", "violet", "lavender", "magenta", "cyan", "charcoal", "bronze",
    "copper", "rose", "coral", "mint", "clear", "transparent", "multicolor",
})  # fmt: skip


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _norm(text: str) -> str:
    """Lowercase words joined by single spaces, for phrase containment (brands, units)."""
    return " ".join(_words(text))


def _contains_phrase(haystack_norm: str, phrase_norm: str) -> bool:
    return bool(phrase_norm) and f" {phrase_norm} " in f" {haystack_norm} "


def units(text: str) -> set[tuple[float, str]]:
    """``(value, unit)`` pairs of sizes and quantities in ``text``: "16oz" -> {(16.0, 'oz')}."""
    found = set()
    for value, unit in _UNIT.findall(text.lower()):
        key = " ".join(unit.split())
        found.add((float(value), _UNIT_ALIASES.get(key, key)))
    return found


def model_numbers(text: str) -> set[str]:
    """Tokens mixing letters and digits (model and part numbers), hyphens removed."""
    return {t.replace("-", "") for t in text.lower().split() if _MODEL.match(t.strip(".,;:()[]\"'"))}


def negated_terms(query: str) -> list[str]:
    """The words a query excludes: "shampoo without sulfate" -> ['sulfate']; "gluten-free" -> ['gluten'].

    The word after a negation (``NEGATIONS``, or "w/o"), stopwords skipped, and the word before
    "free".
    """
    words = _words(query.lower().replace("w/o", "without"))
    stop = stopwords()
    terms = []
    for i, word in enumerate(words):
        if word in NEGATIONS:
            following = next((w for w in words[i + 1 :] if w not in stop and w not in NEGATIONS), None)
            if following is not None:
                terms.append(following)
        elif word == "free" and i > 0 and words[i - 1] not in stop:
            terms.append(words[i - 1])
    return terms


def _share(wanted: set, found: set) -> float:
    return float(len(wanted & found)) / len(wanted) if wanted else np.nan


def _coverage(query_words: set[str], stems: set[str]) -> float:
    """``model.lexical.query_coverage`` from pre-tokenised sides (query words, text word prefixes)."""
    if not query_words:
        return 0.0
    return sum(w[:PREFIX_CHARS] in stems for w in query_words) / len(query_words)


def _stems(words: Iterable[str]) -> frozenset[str]:
    # distinct words first: a description repeats its words, and slicing each copy is the cost
    return frozenset(w[:PREFIX_CHARS] for w in set(words))


@dataclass(frozen=True)
class ProductSide:
    """What the features need of a product, computed once per distinct product (``product_side``)."""

    title: str
    brand: str
    color: str
    long_text: str
    title_tokens: tuple[str, ...]
    brand_color_tokens: tuple[str, ...]
    long_tokens: tuple[str, ...]
    title_stems: frozenset[str]
    brand_color_stems: frozenset[str]
    long_stems: frozenset[str]
    #: every word of every field (stopwords dropped), and their prefixes
    words: frozenset[str]
    stems: frozenset[str]
    brand_norm: str
    #: colour words of the colour field and the title
    colors: frozenset[str]

    @functools.cached_property
    def title_counts(self) -> Counter[str]:
        """Term counts of the title (``list_bm25``), built once per product."""
        return Counter(self.title_tokens)

    @functools.cached_property
    def all_counts(self) -> Counter[str]:
        """Term counts of title + brand + colour."""
        return Counter(self.title_tokens + self.brand_color_tokens)

    @functools.cached_property
    def long_counts(self) -> Counter[str]:
        """Term counts of bullets + description."""
        return Counter(self.long_tokens)


#: Bytes the cache of products' sides may hold (``product_side``): sized by what the entries hold,
#: not by their count, since a product with a long description holds ~100 KiB and a bare title ~10.
PRODUCT_CACHE_BYTES: Final[int] = 64 * 1024 * 1024
#: The estimate of one entry's bytes: a fixed part and a part per character of its fields (fitted
#: to the deep size, objects and all, of 1,000 products of the bundled sample: ~37 KiB on average),
#: plus a byte per character for the key's own copy of the fields.
_SIDE_FIXED_BYTES: Final[int] = 10_000
_SIDE_BYTES_PER_CHAR: Final[int] = 24


def _side_bytes(side: ProductSide) -> int:
    chars = len(side.title) + len(side.brand) + len(side.color) + len(side.long_text)
    return _SIDE_FIXED_BYTES + _SIDE_BYTES_PER_CHAR * chars


_PRODUCT_CACHE: LRUCache[tuple[str, ...], ProductSide] = LRUCache(
    maxsize=PRODUCT_CACHE_BYTES, getsizeof=_side_bytes
)
_PRODUCT_CACHE_LOCK = threading.Lock()


def product_cache_stats() -> dict[str, int]:
    """Entries of the products' sides cache, the bytes they are estimated to hold and the bound."""
    with _PRODUCT_CACHE_LOCK:
        return {
            "entries": len(_PRODUCT_CACHE),
            "bytes": int(_PRODUCT_CACHE.currsize),
            "max_bytes": int(_PRODUCT_CACHE.maxsize),
        }


def product_side(title: str, brand: str, color: str, bullets: str, description: str) -> ProductSide:
    """A product's fields tokenised, cached (least recently used first out, within
    ``PRODUCT_CACHE_BYTES``), since the same products recur across queries."""
    key = (title, brand, color, bullets, description)
    with _PRODUCT_CACHE_LOCK:
        side = _PRODUCT_CACHE.get(key)
    if side is None:
        side = _build_product_side(*key)
        with _PRODUCT_CACHE_LOCK, contextlib.suppress(ValueError):  # one larger than the bound: not kept
            _PRODUCT_CACHE[key] = side
    return side


def _build_product_side(title: str, brand: str, color: str, bullets: str, description: str) -> ProductSide:
    long_text = " ".join(t for t in (bullets, description) if t)
    title_tokens = tuple(word_tokens(title))
    bc_tokens = tuple(word_tokens(f"{brand} {color}"))
    long_tokens = tuple(word_tokens(long_text))
    words = frozenset(title_tokens + bc_tokens + long_tokens)
    title_stems, bc_stems, long_stems = _stems(title_tokens), _stems(bc_tokens), _stems(long_tokens)
    return ProductSide(
        title=title,
        brand=brand,
        color=color,
        long_text=long_text,
        title_tokens=title_tokens,
        brand_color_tokens=bc_tokens,
        long_tokens=long_tokens,
        title_stems=title_stems,
        brand_color_stems=bc_stems,
        long_stems=long_stems,
        words=words,
        stems=title_stems | bc_stems | long_stems,
        brand_norm=_norm(brand),
        colors=frozenset(w for w in (*word_tokens(color), *title_tokens) if w in COLORS),
    )


@dataclass(frozen=True)
class QuerySide:
    """What the features need of a query (``query_side``)."""

    text: str
    norm: str
    tokens: frozenset[str]
    colors: frozenset[str]
    numbers: frozenset[str]
    units: frozenset[tuple[float, str]]
    models: frozenset[str]
    negated: tuple[str, ...]


@functools.lru_cache(maxsize=10_000)
def query_side(query: str) -> QuerySide:
    """Tokenise a query once (cached)."""
    norm = _norm(query)
    return QuerySide(
        text=query,
        norm=norm,
        tokens=frozenset(word_tokens(query)),
        colors=frozenset(w for w in norm.split() if w in COLORS),
        numbers=frozenset(_NUMBER.findall(query.lower())),
        units=frozenset(units(query)),
        models=frozenset(model_numbers(query)),
        negated=tuple(negated_terms(query)),
    )


def _product_side(fields: Mapping[str, str]) -> ProductSide:
    return product_side(*(str(fields.get(k, "") or "") for k in PRODUCT_FIELDS))


#: The columns ``pair_features`` returns, in order.
FEATURE_NAMES: Final[tuple[str, ...]] = (
    "cov_title", "cov_brand_color", "cov_long", "cov_all", "exact_title", "brand_in_query",
    "query_has_color", "color_match", "color_conflict", "number_match", "unit_match", "unit_conflict",
    "model_match", "is_negation", "negated_in_product", "query_words", "title_words", "long_chars",
    "has_brand", "has_color", "has_long",
)  # fmt: skip


def pair_features(query: str, fields: Mapping[str, str]) -> dict[str, float]:
    """Features of one (query, product) pair; ``fields`` maps ``PRODUCT_FIELDS`` names to text ("" = missing).

    Coverages are ``model.lexical.query_coverage`` (0..1); shares are NaN when the query has
    nothing of that kind (no numbers, no sizes, ...), flags NaN when the product lacks the field.
    """
    return _pair_features(query_side(query), _product_side(fields))


def _pair_features(q: QuerySide, p: ProductSide) -> dict[str, float]:
    f: dict[str, float] = {
        "cov_title": _coverage(q.tokens, p.title_stems),
        "cov_brand_color": _coverage(q.tokens, p.brand_color_stems) if (p.brand or p.color) else np.nan,
        "cov_long": _coverage(q.tokens, p.long_stems) if p.long_text else np.nan,
        "cov_all": _coverage(q.tokens, p.stems),
        # exact (not prefix) word matches: "tv" vs "tvs" is a different product more often than not
        "exact_title": _share(q.tokens, set(p.title_tokens)),
        "brand_in_query": float(_contains_phrase(q.norm, p.brand_norm)) if p.brand_norm else np.nan,
        "query_has_color": float(bool(q.colors)),
        "color_match": np.nan,
        "color_conflict": np.nan,
        "number_match": np.nan,
        "unit_match": np.nan,
        "unit_conflict": np.nan,
        "model_match": np.nan,
    }
    if q.colors:
        f["color_match"] = _share(q.colors, p.colors | (p.words & COLORS))
        # the query names a colour and the product names only others
        f["color_conflict"] = float(bool(p.colors) and not q.colors & p.colors)
    # numbers, sizes and model numbers: the product's full text is read only when the query has some
    if q.numbers or q.units or q.models:
        all_text = " ".join(t for t in (p.title, p.brand, p.color, p.long_text) if t)
        if q.numbers:
            f["number_match"] = _share(q.numbers, set(_NUMBER.findall(all_text.lower())))
        if q.units:
            p_units = units(all_text)
            f["unit_match"] = _share(q.units, p_units)
            # the same unit with another value: "64 oz" asked, "16 oz" offered
            same_unit = {u for _, u in q.units} & {u for _, u in p_units}
            f["unit_conflict"] = float(bool(same_unit) and not q.units & p_units)
        if q.models:
            f["model_match"] = _share(q.models, model_numbers(all_text) | p.words)
    f["is_negation"] = float(bool(q.negated))
    f["negated_in_product"] = (
        float(any(t[:PREFIX_CHARS] in p.stems for t in q.negated)) if q.negated else np.nan
    )
    f["query_words"] = float(len(q.norm.split()))
    f["title_words"] = float(len(p.title_tokens))
    f["long_chars"] = float(len(p.long_text))
    f["has_brand"], f["has_color"] = float(bool(p.brand)), float(bool(p.color))
    f["has_long"] = float(bool(p.long_text))
    return f


def list_bm25(
    query_words: Sequence[str], docs: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75
) -> np.ndarray:
    """BM25 (Lucene's idf) of a query against the word lists of one candidate list.

    Term statistics come from the list itself, as in the BM25 baseline
    (``eval.baselines.bm25_scores``, which builds a ``bm25s`` index per list); done here on
    the already tokenised words because an index per list and field costs ~8 ms a query.
    NaN for every document when the list has no words at all.
    """
    return _bm25_counts(query_words, [Counter(d) for d in docs], [len(d) for d in docs], k1, b)


def _bm25_counts(
    query_words: Sequence[str],
    counts: Sequence[Mapping[str, int]],
    lengths: Sequence[int],
    k1: float = 1.5,
    b: float = 0.75,
) -> np.ndarray:
    """``list_bm25`` from each document's term counts and length (counts cached per product)."""
    n = len(counts)
    doc_len = np.array(lengths, dtype=np.float64)
    if n == 0 or doc_len.sum() == 0:
        return np.full(n, np.nan)
    norm = k1 * (1.0 - b + b * doc_len / doc_len.mean())
    scores = np.zeros(n)
    for term in sorted(set(query_words)):  # fixed order: float sums then match run to run
        tf = np.array([c.get(term, 0) for c in counts], dtype=np.float64)
        df = float((tf > 0).sum())
        if df:
            idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5))
            scores += idf * tf * (k1 + 1.0) / (tf + norm)
    return scores


#: Scores that get list features (when the table has them).
LIST_SCORES: Final[tuple[str, ...]] = (
    "ce_score", "ce_gain", "ce_p_E", "ce_p_S", "ce_p_I", "ce_sub", "ce_cosine", "bm25_all", "cov_all",
)  # fmt: skip


def list_features(values: np.ndarray, groups: np.ndarray) -> dict[str, np.ndarray]:
    """Rank fraction, z-score and gap to the best of ``values`` within each group.

    ``rank`` is 0 for the best of a list and 1 for the worst (ties share the better rank; a
    list of one gets 0); ``z`` is (value - list mean) / list std (0 where the std is 0); ``gap``
    is the list's best value minus this one.
    """
    groups = np.asarray(groups)
    return _list_features(values, groups, one_list=bool(len(groups)) and bool((groups == groups[0]).all()))


def _list_features(values: np.ndarray, groups: np.ndarray, one_list: bool) -> dict[str, np.ndarray]:
    """``list_features``, the path given: numpy's for one list, else pandas' grouped one."""
    if one_list:
        return _one_list_features(np.asarray(values, dtype=np.float64))
    frame = pd.DataFrame({"v": values, "g": groups})
    grouped = frame.groupby("g", sort=False)["v"]
    size = grouped.transform("size").to_numpy(dtype=np.float64)
    rank = grouped.rank(method="min", ascending=False).to_numpy(dtype=np.float64) - 1.0
    mean = grouped.transform("mean").to_numpy(dtype=np.float64)
    std = grouped.transform("std", ddof=0).to_numpy(dtype=np.float64)
    z = np.divide(values - mean, std, out=np.zeros_like(mean), where=std > 1e-12)
    best = grouped.transform("max").to_numpy(dtype=np.float64)
    return {
        "rank": np.divide(rank, size - 1, out=np.zeros_like(rank), where=size > 1),
        "z": z,
        "gap": best - values,
    }


def _one_list_features(values: np.ndarray) -> dict[str, np.ndarray]:
    """``list_features`` of a single list in numpy (a ``rerank`` request: no groupby overhead)."""
    n = len(values)
    # rank with ties sharing the better rank: how many values are strictly larger
    rank = (values[None, :] > values[:, None]).sum(axis=1).astype(np.float64)
    std = values.std()
    z = (values - values.mean()) / std if std > 1e-12 else np.zeros(n)
    return {
        "rank": rank / (n - 1) if n > 1 else np.zeros(n),
        "z": z,
        "gap": values.max() - values,
    }


def feature_table(
    queries: Sequence[str],
    fields: Mapping[str, Sequence[str]],
    groups: Sequence[object],
    model_columns: Mapping[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """All stacker features of N pairs, one row per pair in input order (``feature_arrays`` framed)."""
    return pd.DataFrame(feature_arrays(queries, fields, groups, model_columns), index=range(len(queries)))


def feature_arrays(
    queries: Sequence[str],
    fields: Mapping[str, Sequence[str]],
    groups: Sequence[object],
    model_columns: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """All stacker features of N pairs as named (N,) columns, pairs in input order.

    The serving path feeds these straight to ``Stacker.predict``: framing ~60 columns costs
    more than some of the features do for a 40-candidate request.

    Args:
        queries: (N,) query text of each pair.
        fields: ``PRODUCT_FIELDS`` name -> (N,) text ("" when missing); absent names count as missing.
        groups: (N,) the candidate list each pair belongs to (query id or text): BM25 and the
            list features are computed within it.
        model_columns: the cross-encoder's columns (``stack.outputs.cross_encoder_columns``),
            copied in and given list features.
    """
    return list_entry_features(queries, fields, CandidateLists.of(groups), model_columns)


@dataclass(frozen=True)
class CandidateLists:
    """Candidate lists over N pairs, in which a pair may stand in several lists.

    A list's BM25 statistics and list features read every entry of the list, so a pair scored
    beside several sets of other candidates is one entry per list; its own features (coverage,
    matches, lengths) and the model's outputs are the pair's, whatever the list.

    Attributes:
        rows: (M,) the pair (index into the N pairs) of each list entry.
        groups: (M,) the list of each entry (any hashable ids; an entry's list is where its
            list-relative features come from).
        keep: (K,) the entries whose features are wanted, in the order wanted (no repeats).
    """

    rows: np.ndarray
    groups: Sequence[object] | np.ndarray
    keep: np.ndarray

    @classmethod
    def of(cls, groups: Sequence[object] | np.ndarray) -> CandidateLists:
        """Each pair once, in the list ``groups`` names for it; every entry kept, in pair order."""
        index = np.arange(len(groups), dtype=np.int64)
        return cls(rows=index, groups=groups, keep=index)

    @property
    def kept_rows(self) -> np.ndarray:
        """(K,) the pair of each kept entry."""
        return np.asarray(self.rows, dtype=np.int64)[np.asarray(self.keep, dtype=np.int64)]


def list_entry_features(
    queries: Sequence[str],
    fields: Mapping[str, Sequence[str]],
    lists: CandidateLists,
    model_columns: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """All stacker features of the entries ``lists.keep`` of candidate lists over N pairs.

    What belongs to a pair (``queries``, ``fields``, ``model_columns``: each (N,)) is given once
    and read per entry through ``lists.rows``, so a pair standing in several lists costs one
    product side and one set of pair features, not one per list. A list's BM25, "another brand
    named", size and list features are computed from all of its entries; only the kept entries'
    values are returned: (K,) columns in ``lists.keep`` order, the columns ``feature_arrays``
    gives and the same values (``feature_arrays`` is this with every pair once, all kept).

    Raises:
        ValueError: a field or model column is not (N,); ``groups`` is not as long as ``rows``;
            an entry of ``rows`` or ``keep`` is out of range, or ``keep`` repeats one.
    """
    n = len(queries)
    cols = {name: [str(v or "") for v in fields.get(name, [""] * n)] for name in PRODUCT_FIELDS}
    for name, texts in cols.items():
        if len(texts) != n:
            raise ValueError(f"feature_table: field {name!r} has {len(texts)} values for {n} pairs.")
    model = {name: np.asarray(column, dtype=np.float64) for name, column in (model_columns or {}).items()}
    for name, column in model.items():
        if len(column) != n:
            raise ValueError(f"feature_table: model column {name!r} has {len(column)} values for {n} pairs.")
    rows = np.asarray(lists.rows, dtype=np.int64)
    keep = np.asarray(lists.keep, dtype=np.int64)
    m, k = len(rows), len(keep)
    if len(lists.groups) != m:
        raise ValueError(f"CandidateLists: {len(lists.groups)} groups for {m} rows; expected one per row.")
    if m and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"CandidateLists: rows must index the {n} pairs (0..{n - 1}).")
    if k and (keep.min() < 0 or keep.max() >= m):
        raise ValueError(f"CandidateLists: keep must index the {m} rows (0..{m - 1}).")
    position = np.full(m, -1, dtype=np.int64)  # each entry's place in the output, -1 when not kept
    position[keep] = np.arange(k)
    if (position >= 0).sum() != k:
        raise ValueError("CandidateLists: keep names an entry twice; expected each entry at most once.")
    group_codes = _group_codes(lists.groups)
    # list_features takes numpy's single-list path when all entries form one list (a rerank
    # request) and pandas' grouped one otherwise; each chunk below takes the path the whole
    # input would, so a chunk holding one list of many gets the same bits as before chunking
    one_list = bool(m) and not group_codes.any()
    list_scores = [s for s in LIST_SCORES if s in model or s in ("bm25_all", "cov_all")]
    out: dict[str, np.ndarray] = {name: np.zeros(k) for name in FEATURE_NAMES}
    out |= {name: np.zeros(k) for name in ("bm25_title", "bm25_all", "bm25_long")}
    out["other_brand_named"] = np.full(k, np.nan)
    out["list_size"] = np.bincount(group_codes)[group_codes[keep]].astype(np.float64)
    for name, column in model.items():
        out[name] = column[rows[keep]]
    for name in list_scores:
        for kind in ("rank", "z", "gap"):
            out[f"{name}_{kind}"] = np.zeros(k)
    # Lists in chunks of about CHUNK_ROWS entries, so only one chunk's products' sides are held
    # (~37 KiB each: all of them would be ~40 GiB for the full ESCI train+val pairs); every
    # feature reads its own pair or its own list only, so chunking changes no value. A list's
    # entries come from one stable sort, in input order: no pass over every entry per list.
    pair_done = np.zeros(n, dtype=bool)
    pair_values = {name: np.zeros(n) for name in FEATURE_NAMES}
    order = np.argsort(group_codes, kind="stable")
    bounds = np.flatnonzero(np.r_[True, group_codes[order][1:] != group_codes[order][:-1], True])
    first = 0
    while m and first < len(bounds) - 1:
        last = int(np.searchsorted(bounds, bounds[first] + CHUNK_ROWS, side="right")) - 1
        last = max(last, first + 1)  # a list longer than a chunk is a chunk of its own
        chunk = _ListChunk(
            entries=[
                order[a:b] for a, b in zip(bounds[first:last], bounds[first + 1 : last + 1], strict=True)
            ],
            rows=rows,
            group_codes=group_codes,
            position=position,
        )
        _fill_chunk(queries, cols, model, chunk, pair_done, pair_values, list_scores, one_list, out)
        first = last
    return out


#: List entries whose products' sides ``list_entry_features`` holds at once (whole lists; see there).
CHUNK_ROWS: Final[int] = 20_000


@dataclass(frozen=True)
class _ListChunk:
    """Whole candidate lists of ``list_entry_features``: ``entries`` holds each list's entry
    indices in input order; the other arrays are the call's, over all its entries."""

    entries: Sequence[np.ndarray]
    rows: np.ndarray
    group_codes: np.ndarray
    position: np.ndarray


def _fill_chunk(
    queries: Sequence[str],
    cols: Mapping[str, Sequence[str]],
    model: Mapping[str, np.ndarray],
    chunk: _ListChunk,
    pair_done: np.ndarray,
    pair_values: Mapping[str, np.ndarray],
    list_scores: Sequence[str],
    one_list: bool,
    out: Mapping[str, np.ndarray],
) -> None:
    """Fill the kept entries of ``chunk``'s lists into ``out``: the pair features (computed once
    per pair into ``pair_values``), BM25, "another brand named" and the list features."""
    entries = np.concatenate(chunk.entries)  # (E,) this chunk's entries, list after list
    pairs = chunk.rows[entries]  # (E,)
    sides = {int(i): product_side(*(cols[name][i] for name in PRODUCT_FIELDS)) for i in np.unique(pairs)}
    new = [i for i in sides if not pair_done[i]]
    features = [_pair_features(query_side(queries[i]), sides[i]) for i in new]
    for name in FEATURE_NAMES:
        pair_values[name][new] = np.array([r[name] for r in features], dtype=np.float64)
    pair_done[new] = True
    # list-relative values of every entry of the chunk, (E,) in chunk order
    bm25 = {k: np.zeros(len(entries)) for k in ("bm25_title", "bm25_all", "bm25_long")}
    other_brand = np.full(len(entries), np.nan)
    start = 0
    for members in chunk.entries:
        at = slice(start, start + len(members))
        start += len(members)
        member_sides = [sides[int(i)] for i in chunk.rows[members]]
        query = queries[chunk.rows[members[0]]]
        q_words = sorted(query_side(query).tokens)
        bm25["bm25_title"][at] = _bm25_counts(
            q_words, [s.title_counts for s in member_sides], [len(s.title_tokens) for s in member_sides]
        )
        bm25["bm25_all"][at] = _bm25_counts(
            q_words,
            [s.all_counts for s in member_sides],
            [len(s.title_tokens) + len(s.brand_color_tokens) for s in member_sides],
        )
        bm25["bm25_long"][at] = _bm25_counts(
            q_words, [s.long_counts for s in member_sides], [len(s.long_tokens) for s in member_sides]
        )
        # the brands of the other candidates: a query naming one of them asks for that brand
        q_norm = query_side(query).norm
        brands = [s.brand_norm for s in member_sides]
        named = {b for b in brands if b and _contains_phrase(q_norm, b)}
        if named:
            other_brand[at] = [float(bool(b) and b not in named) for b in brands]
    kept = chunk.position[entries] >= 0  # (E,) which of the chunk's entries are wanted
    target = chunk.position[entries[kept]]
    for name in FEATURE_NAMES:
        out[name][target] = pair_values[name][pairs[kept]]
    for name, values in bm25.items():
        out[name][target] = values[kept]
    out["other_brand_named"][target] = other_brand[kept]
    for name in list_scores:
        if name in bm25:
            values = bm25[name]
        elif name in model:
            values = model[name][pairs]
        else:
            values = pair_values[name][pairs]
        for kind, computed in _list_features(values, chunk.group_codes[entries], one_list).items():
            out[f"{name}_{kind}"][target] = computed[kept]


def _group_codes(groups: Sequence[object] | np.ndarray) -> np.ndarray:
    """(N,) integer code of each pair's list, numbered in order of first appearance."""
    values = list(groups)  # positional, whatever sequence (a Series keeps its own index)
    first = values[0] if values else None
    if all(g == first for g in values):  # one list: a rerank request
        return np.zeros(len(values), dtype=np.int64)
    return pd.factorize(pd.Series(values, dtype=object))[0]


def record_fields(product: str | Mapping[str, object]) -> dict[str, str]:
    """``PRODUCT_FIELDS`` texts of a product given as text or as a mapping of its fields.

    Keys may be the short names (``title``, ``brand``, ...) or the ESCI column names
    (``product_title``, ...), cleaned as in data preparation. A plain string, or a mapping with
    only ``text``, counts as the title with every other field missing.
    """
    if isinstance(product, str):
        return {"title": clean_text(product)}
    fields = {
        name: clean_text(product.get(name, product.get(FIELD_COLUMNS[name]))) for name in PRODUCT_FIELDS
    }
    if not any(fields.values()) and "text" in product:
        fields["title"] = clean_text(product["text"])
    return fields


def frame_fields(frame: pd.DataFrame) -> dict[str, list[str]]:
    """``PRODUCT_FIELDS`` texts of every row of a frame with ESCI ``product_*`` columns, cleaned as
    ``record_fields`` cleans a row's mapping ("" where the column is absent or the value missing).

    Column by column: for millions of rows a mapping per row would cost more than the features.
    """
    return {
        name: [clean_text(v) for v in frame[FIELD_COLUMNS[name]]]
        if FIELD_COLUMNS[name] in frame.columns
        else [""] * len(frame)
        for name in PRODUCT_FIELDS
    }


def is_list_relative(name: str) -> bool:
    """Whether feature ``name`` depends on the other candidates of the list, not only on the pair.

    These are the list features (rank, z-score and gap of ``LIST_SCORES``), the list length,
    BM25 within the list (its term statistics come from the list) and "another candidate's brand
    named". A model that reads none of them gives a pair the same output in any list.
    """
    if name in ("list_size", "other_brand_named") or name.startswith("bm25_"):
        return True
    return any(name == f"{score}_{kind}" for score in LIST_SCORES for kind in ("rank", "z", "gap"))
