"""The search flow, evaluated and learnt from: retrieve from a catalogue, rerank, label.

Judged lists (ESCI's own candidate lists) hold almost only products retrieved for their query,
so a model trained and measured on them alone never meets the clearly unrelated products a
catalogue search brings back. This module puts a model in the flow a user sees:

- ``build_catalogue`` indexes the products of labelled rows (in cross-validation: the train+val
  queries' products only, so no test product or label takes part in any choice);
- ``retrieve_lists`` retrieves the top N of that catalogue for each query, as ``/search`` does;
- ``mine_negatives`` picks, for each training query, retrieved products judged only for other
  training queries (by ``eval.flow.is_foreign`` or merely not judged for it) as catalogue
  negatives; ``score_negatives`` gives them the out-of-fold cross-encoder columns of their
  query's fold model, so the trees learn from them as from the judged rows;
- ``CatalogueFlow.encoder_negatives`` gives each cross-encoder of the stacked recipe such
  negatives as extra training rows labelled I, never a held-out query's or its products;
- ``catalogue_lists`` gives each distillation query's retrieved product ids from the same
  train+val catalogue (reused or built, checked to hold no product judged for a test query), for
  ``distill``'s ``data.retrieved_share``, which takes them as plain data;
- ``flow_run`` reranks each query's retrieved list with a ``Reranker`` (its stacker included)
  and marks every result judged / foreign / unjudged; ``eval.flow.flow_metrics`` measures it;
- ``FoldFlow`` does that inside ``cv`` for each fold's held-out queries with the fold's
  cross-encoder and stacker, and adds the title-only figures (candidates with a title only).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd

from esci_reranker.data.text import FIELD_COLUMNS
from esci_reranker.eval.flow import (
    DEFAULT_TOP_K,
    flow_metrics,
    flow_summary,
    ideal_gains,
    is_foreign,
    judged_index,
    product_kinds,
)
from esci_reranker.labels import ESCI_GAINS
from esci_reranker.retrieval.index import CatalogueIndex, Retrieved

if TYPE_CHECKING:
    from esci_reranker.reranker import Reranker
    from esci_reranker.stack.stacker import Stacker

#: Candidates retrieved per query in the flow (what ``/search`` reranks by default).
DEFAULT_RETRIEVE: Final[int] = 100
#: Which retrieved products ``catalogue_lists`` keeps: all, or those foreign to the query.
RETRIEVED_RULES: Final[tuple[str, ...]] = ("top", "foreign")
#: Product fields a catalogue stores for the reranker: every field the stack features read.
CATALOGUE_FIELDS: Final[tuple[str, ...]] = ("title", "brand", "color", "bullets", "description")


def catalogue_products(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct product of a labelled frame: ``product_id`` and its ``product_*`` columns."""
    columns = ["product_id", *[c for c in FIELD_COLUMNS.values() if c in frame.columns]]
    return frame[columns].drop_duplicates("product_id").reset_index(drop=True)


def build_catalogue(
    frame: pd.DataFrame, out_dir: str | Path, retriever: str | Path | None = None, log: Any = None
) -> CatalogueIndex:
    """Index the products of ``frame`` (BM25 + dense) into ``out_dir`` and open it.

    Every field the stacker reads is stored, so a reranked result carries what the model saw
    in training. ``retriever``: a sentence-transformers folder; None = the packaged zero-shot one.
    """
    from esci_reranker.retrieval.encoder import PACKAGED_RETRIEVER

    products = catalogue_products(frame)
    # frames given to the index name their fields by the short names (``title``, ...)
    short = products.rename(columns={column: name for name, column in FIELD_COLUMNS.items()})
    CatalogueIndex.build(
        [short],
        out_dir,
        retriever=str(retriever) if retriever is not None else PACKAGED_RETRIEVER,
        store_fields=CATALOGUE_FIELDS,
        source=f"{len(products)} products of {frame['query_id'].nunique()} labelled queries",
        log=log,
        # one thread: the same graph in every run, so a training query gets the same catalogue
        # negatives each time (the catalogue is small; this costs well under a second)
        threads=1,
    )
    return CatalogueIndex.open(out_dir)


def retrieve_lists(
    index: CatalogueIndex, queries: pd.DataFrame, n: int = DEFAULT_RETRIEVE
) -> dict[object, list[Retrieved]]:
    """query id -> the top ``n`` retrieved products of each distinct query of ``queries``
    (columns ``query_id``, ``query``), hybrid retrieval as ``/search``."""
    distinct = queries.drop_duplicates("query_id")
    return {
        qid: index.retrieve(str(q), n) for qid, q in zip(distinct["query_id"], distinct["query"], strict=True)
    }


def retrieve_ids(
    index: CatalogueIndex, queries: pd.DataFrame, n: int = DEFAULT_RETRIEVE, keep: int | None = None
) -> Mapping[object, Sequence[str]]:
    """query id -> the product ids of its top ``n``, as ``retrieve_lists`` ranks them (the first
    ``keep`` of them when given), for each distinct query of ``queries`` (``query_id``, ``query``).

    Built for many queries (every training query of the full data): the lists are retrieved in
    batches as keys alone (``CatalogueIndex.retrieve_keys``) and a list's ids are read when it is
    looked up, so the result holds ~1 KB a query where ``retrieve_lists`` holds ~1 KB a product.
    """
    distinct = queries.drop_duplicates("query_id")
    keys = index.retrieve_keys(distinct["query"].astype(str).tolist(), n)
    return _IdLists(index, {q: k[:keep] for q, k in zip(distinct["query_id"].tolist(), keys, strict=True)})


class _IdLists(Mapping[object, Sequence[str]]):
    """query id -> product ids, read from the index's keys when a list is looked up."""

    def __init__(self, index: CatalogueIndex, keys: dict[object, np.ndarray]) -> None:
        self._index = index
        self._keys = keys

    def __getitem__(self, query_id: object) -> list[str]:
        return self._index.product_ids(self._keys[query_id])

    def __iter__(self) -> Any:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def open_or_build_catalogue(
    frame: pd.DataFrame,
    folder: str | Path,
    exclude_products: frozenset[str] = frozenset(),
    retriever: str | Path | None = None,
    log: Any = print,
) -> CatalogueIndex:
    """The train+val catalogue at ``folder``: opened when it is there, else built there from the
    products of ``frame`` (train+val rows) minus ``exclude_products`` (those judged for a test query).

    An opened catalogue is checked, not trusted: it must hold none of ``exclude_products``.

    Raises:
        ValueError: the catalogue at ``folder`` holds an excluded product (built from other rows).
    """
    folder = Path(folder)
    if (folder / "manifest.json").is_file():
        index = CatalogueIndex.open(folder)
        if exclude_products:
            held = sorted(set(index.live_ids()) & exclude_products)
            if held:
                raise ValueError(
                    f"catalogue {folder}: holds {len(held)} product(s) judged for a test query (e.g. "
                    f"{held[:3]}); it must index the train+val products without them: delete the folder "
                    "and run again to rebuild it."
                )
        return index
    products = frame[~frame["product_id"].astype(str).isin(exclude_products)]
    log(f"      catalogue: index the {products['product_id'].nunique()} train+val products -> {folder}")
    return build_catalogue(products, folder, retriever=retriever)


def _fields_frame(items: Sequence[Retrieved]) -> pd.DataFrame:
    """``product_id`` and ``product_*`` columns of retrieved products ("" where not stored)."""
    return pd.DataFrame(
        {"product_id": [r.product_id for r in items]}
        | {column: [r.fields.get(name, "") for r in items] for name, column in FIELD_COLUMNS.items()}
    )


def mine_negatives(
    frame: pd.DataFrame,
    lists: Mapping[object, Sequence[str]],
    per_query: int,
    rule: str = "foreign",
    weight: float = 0.3,
    with_text: bool = True,
) -> pd.DataFrame:
    """Catalogue negatives of the labelled queries of ``frame`` (train+val, with a ``fold`` column).

    For each query: its retrieved products (``lists``: product ids in retrieval order, e.g. from
    ``retrieve_ids``) that are not judged for it and, with ``rule="foreign"``, are foreign to it
    (``eval.flow.is_foreign``); the first ``per_query`` of them, labelled I with ``weight``. Product text comes from ``frame`` (the
    judged rows of the other queries), never from outside it.

    Returns:
        Columns ``fold, query_id, query, product_id, weight``, the ``product_*`` columns (unless
        ``with_text`` is False) and ``esci_query_source`` when ``frame`` has it.
    """
    if rule not in ("foreign", "unjudged"):
        raise ValueError(f"negative_rule={rule!r}; expected 'foreign' or 'unjudged'.")
    if "fold" not in frame.columns:
        raise ValueError("mine_negatives: the frame needs a 'fold' column (each query's outer fold).")
    judged = judged_index(frame)
    queries = frame.drop_duplicates("query_id").set_index("query_id")
    rows = []
    for qid, ids in lists.items():
        query = str(queries.at[qid, "query"])
        taken = 0
        for pid in ids:
            if taken >= per_query:
                break
            # a product of no row of frame has no text here, and no judgement to go by
            seen_for = judged.get(pid)
            if not seen_for or qid in seen_for:
                continue
            if rule == "foreign" and not is_foreign(query, seen_for.values()):
                continue
            rows.append((int(queries.at[qid, "fold"]), qid, query, pid))
            taken += 1
    out = pd.DataFrame(rows, columns=["fold", "query_id", "query", "product_id"])
    out["weight"] = float(weight)
    if with_text:
        out = out.join(catalogue_products(frame).set_index("product_id"), on="product_id")
    if "esci_query_source" in queries.columns:
        out["esci_query_source"] = queries.loc[out["query_id"], "esci_query_source"].to_numpy()
    return out


def labelled_negatives(frame: pd.DataFrame, negatives: pd.DataFrame) -> pd.DataFrame:
    """``negatives`` (``query_id``, ``product_id``) as training rows shaped like ``frame``'s:
    labelled I with gain 0, their query's columns and their product's columns from ``frame``."""
    products = frame.drop_duplicates("product_id").set_index("product_id")
    queries = frame.drop_duplicates("query_id").set_index("query_id")
    product_columns = [c for c in frame.columns if c.startswith("product_") and c != "product_id"]
    query_columns = [c for c in ("query", "esci_query_source") if c in frame.columns]
    rows = negatives[["query_id", "product_id"]].reset_index(drop=True)
    rows = rows.join(queries[query_columns], on="query_id").join(products[product_columns], on="product_id")
    rows["esci_label"] = "I"
    if "gain" in frame.columns:
        rows["gain"] = ESCI_GAINS["I"]
    return rows[[c for c in frame.columns if c in rows.columns]]


def score_negatives(
    negatives: pd.DataFrame, fold_dir: Path, seeds: Iterable[int], precision: str = "fp32"
) -> pd.DataFrame:
    """The negatives with the cross-encoder columns of their query's fold model, one block per seed,
    scored in ``precision`` (as the judged rows' out-of-fold outputs are: ``eval.precision``).

    Each query's negatives are scored by the model of its fold (``train.cv.fold_model_dir``),
    which never trained on that query, as its judged rows were (``oof.parquet``).
    """
    from esci_reranker.reranker import Reranker
    from esci_reranker.stack.outputs import CE_COLUMNS, frame_outputs
    from esci_reranker.train.cv import fold_model_dir

    blocks = []
    for seed in seeds:
        for fold, rows in negatives.groupby("fold", sort=True):
            model = Reranker.from_pretrained(fold_model_dir(fold_dir, int(fold), seed), precision=precision)
            rows = rows.reset_index(drop=True)
            outputs = frame_outputs(model, rows)
            block = rows.copy()
            for column in CE_COLUMNS:
                if column in outputs.columns:
                    block[column] = outputs[column].to_numpy()
            block.insert(0, "seed", seed)
            blocks.append(block)
    return pd.concat(blocks, ignore_index=True)


def flow_run(
    reranker: Reranker,
    queries: pd.DataFrame,
    lists: Mapping[object, Sequence[Retrieved]],
    judged: Mapping[str, Mapping[object, str]],
    labels: pd.DataFrame,
) -> pd.DataFrame:
    """Rerank each query's retrieved list and mark every result (``eval.flow.FLOW_COLUMNS``).

    Args:
        reranker: the model as a user runs it (its stacker and decision rules included).
        queries: ``query_id``, ``query`` (and ``esci_query_source``) of the queries to run.
        lists: query id -> its retrieved products.
        judged: ``eval.flow.judged_index`` of every labelled row (the foreign rule's input).
        labels: labelled rows (``query_id``, ``product_id``, ``esci_label``) of ``queries``.
    """
    distinct = queries.drop_duplicates("query_id")
    parts = []
    for row in distinct.itertuples(index=False):
        items = lists.get(row.query_id, [])
        if not items:
            continue
        part = _fields_frame(items)
        part.insert(0, "query", str(row.query))
        part.insert(0, "query_id", row.query_id)
        part["kind"] = product_kinds(row.query_id, str(row.query), part["product_id"].tolist(), judged)
        part["retrieval_rank"] = np.arange(1, len(part) + 1)
        if "esci_query_source" in distinct.columns:
            part["esci_query_source"] = row.esci_query_source
        parts.append(part)
    if not parts:
        raise ValueError(
            f"search flow: none of the {len(distinct)} queries retrieved a product; is the index empty "
            "or built from another catalogue?"
        )
    frame = pd.concat(parts, ignore_index=True)
    preds = reranker.predict_frame(frame, progress=False)
    label_of = labels.set_index(["query_id", "product_id"])["esci_label"]
    keys = list(zip(frame["query_id"], frame["product_id"], strict=True))
    frame["esci_label"] = [
        label_of.get(k) if kind == "judged" else None for k, kind in zip(keys, frame["kind"], strict=True)
    ]
    frame["score"] = np.asarray(preds.scores, dtype=np.float64)
    frame["esci_pred"] = np.asarray(preds.esci_classes).astype(str)
    frame["esci_probs"] = list(np.asarray(preds.esci_probs, dtype=np.float64))
    frame["substitute_prob"] = np.asarray(preds.substitute_probs, dtype=np.float64)
    frame["title"] = frame["product_title"]
    return frame.drop(columns=[c for c in FIELD_COLUMNS.values() if c in frame.columns])


def title_only(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every product field but the title emptied (a catalogue without them)."""
    out = frame.copy()
    for name, column in FIELD_COLUMNS.items():
        if name != "title" and column in out.columns:
            out[column] = ""
    return out


def foreign_audit(
    run: pd.DataFrame, judged: Mapping[str, Mapping[object, str]], n: int = 50, seed: int = 0
) -> pd.DataFrame:
    """``n`` random foreign results of a flow run with the query, the product's judged queries and
    the label given: for a person to check the foreign rule (``report.md`` prints it)."""
    foreign = run[run["kind"] == "foreign"]
    sample = foreign.sample(min(n, len(foreign)), random_state=seed) if len(foreign) else foreign
    return pd.DataFrame(
        {
            "query": sample["query"].to_numpy(),
            "product": sample["title"].to_numpy()
            if "title" in sample.columns
            else sample["product_id"].to_numpy(),
            "judged for": [" | ".join(judged.get(p, {}).values()) for p in sample["product_id"]],
            "label": sample["esci_pred"].to_numpy(),
        }
    )


def _precision_suffix(precision: str) -> str:
    """How a cache of fold-model outputs names the arithmetic they were scored in: "" for fp32
    (the caches written before the choice existed), "_bf16" for bf16 (``auto`` resolved here)."""
    from esci_reranker.hardware import resolve_precision
    from esci_reranker.reranker import select_device
    from esci_reranker.train.distributed import model_device

    resolved = resolve_precision(precision, select_device(model_device()))
    return "" if resolved == "fp32" else f"_{resolved}"


@dataclass
class FoldFlow:
    """The search flow of each CV fold's held-out queries (``stack.train.OnFoldFn``).

    Built once per CV over a catalogue of the train+val products; for (seed, fold) it loads the
    fold's cross-encoder (``train.cv.fold_model_dir``), puts the fold's stacker on it and runs
    ``flow_run`` on the fold's queries, then the same model on the fold's judged lists with a
    title only. Adds ``flow`` / ``flow_by_type`` and ``title_only`` / ``title_only_by_type``.
    """

    frame: pd.DataFrame
    fold_dir: Path
    lists: Mapping[object, Sequence[Retrieved]]
    top_k: int = DEFAULT_TOP_K
    #: arithmetic of the fold models (``eval.precision``: the one their out-of-fold outputs had)
    precision: str = "fp32"
    judged: dict[str, dict[object, str]] = field(init=False)

    def __post_init__(self) -> None:
        self.judged = judged_index(self.frame)

    def __call__(self, seed: int, fold: int, stacker: Stacker, rows: pd.DataFrame) -> dict[str, Any]:
        from esci_reranker.eval.runner import predictions_frame
        from esci_reranker.reranker import Reranker
        from esci_reranker.stack.cv import run_summary
        from esci_reranker.train.cv import fold_model_dir

        reranker = Reranker.from_pretrained(
            fold_model_dir(self.fold_dir, fold, seed), precision=self.precision
        )
        reranker.stacker = stacker
        fold_rows = self.frame[self.frame["query_id"].isin(set(rows["query_id"]))].reset_index(drop=True)
        run = flow_run(reranker, fold_rows, self.lists, self.judged, fold_rows)
        threshold = stacker.rules.substitute_threshold
        metrics = flow_metrics(run, ideal_gains(fold_rows), self.top_k, threshold)
        title = run_summary(predictions_frame(reranker, title_only(fold_rows), progress=False), threshold)
        return {
            "flow": _flat(metrics["overall"]),
            "flow_by_type": {t: _flat(m) for t, m in metrics["by_type"].items()},
            "title_only": title["overall"],
            "title_only_by_type": title["by_type"],
        }


def _flat(summary: Mapping[str, Any]) -> dict[str, float]:
    """A ``flow_summary`` as one level of numbers (what ``stack.cv.cv_summary`` averages)."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        if isinstance(value, Mapping):
            for inner, v in value.items():
                if isinstance(v, int | float):
                    out[f"{key}_{inner}"] = float(v)
        elif isinstance(value, int | float):
            out[key] = float(value)
    return out


@dataclass
class CatalogueFlow:
    """The search flow inside a stacked config's cross-validation and training.

    ``negatives`` (a ``stack.train.NegativesFn``) indexes the train+val products once
    (``FOLD_DIR/catalogue``), retrieves every train+val query's list, and, when the config asks
    for them (``stack.negatives_per_query``), mines the catalogue negatives and scores them with
    the fold models (cached in ``FOLD_DIR/negatives_*.parquet``). ``on_fold`` (a
    ``stack.train.OnFoldFn``) then measures each fold's held-out queries in the flow
    (``FoldFlow``). ``encoder_negatives`` (a ``stack.train.TrainRowsFn``) gives each
    cross-encoder of the recipe its catalogue negatives (``stack.encoder_negatives``) from the
    same retrieved lists. No test product is in the catalogue: ``frame`` is train+val.
    """

    cfg: Any
    frame: pd.DataFrame
    log: Any = print
    flow: bool = True
    #: the catalogue's dense retriever (None: the packaged zero-shot one, as ``make run``'s index)
    retriever: str | Path | None = None
    #: products left out of the catalogue: those judged for a test query (a product can be judged
    #: for a train query and a test query), so no test product is ever a negative or a result
    exclude_products: frozenset[str] = frozenset()
    fold_flow: FoldFlow | None = field(default=None, init=False)
    _indexes: dict[Path, CatalogueIndex] = field(default_factory=dict, init=False, repr=False)
    _lists: dict[Path, dict[object, list[Retrieved]]] = field(default_factory=dict, init=False, repr=False)
    _ids: dict[Path, Mapping[object, Sequence[str]]] = field(default_factory=dict, init=False, repr=False)
    _eligible: pd.DataFrame | None = field(default=None, init=False, repr=False)

    def index(self, fold_dir: Path) -> CatalogueIndex:
        """The train+val catalogue (``FOLD_DIR/catalogue``), opened, or built from ``frame`` once.

        It stores every product field the stacker reads, so it is built while ``frame`` holds
        them; afterwards ``frame`` may keep fewer columns (the training ones): mining reads the
        queries, labels and product ids, and a negative's text for a cross-encoder."""
        folder = Path(fold_dir) / "catalogue"
        if folder not in self._indexes:
            self._indexes[folder] = open_or_build_catalogue(
                self.frame, folder, self.exclude_products, retriever=self.retriever, log=self.log
            )
        return self._indexes[folder]

    def _retrieve(self) -> int:
        # one list length for the flow and the mining: a fused top k depends on how deep each
        # source was read, so every caller cuts the same lists
        return max(self.cfg.stack.negatives_retrieve, DEFAULT_RETRIEVE)

    def lists(self, fold_dir: Path) -> dict[object, list[Retrieved]]:
        """Every train+val query's retrieved list, with the products' fields (for the flow)."""
        folder = Path(fold_dir) / "catalogue"
        if folder not in self._lists:
            self._lists[folder] = retrieve_lists(self.index(fold_dir), self.frame, self._retrieve())
        return self._lists[folder]

    def ranked_ids(self, fold_dir: Path) -> Mapping[object, Sequence[str]]:
        """Every train+val query's retrieved product ids, the top ``stack.negatives_retrieve``
        of the lists ``lists`` gives (from them when they are there, else ``retrieve_ids``)."""
        folder = Path(fold_dir) / "catalogue"
        top = self.cfg.stack.negatives_retrieve
        if folder in self._lists:
            return {q: [r.product_id for r in v[:top]] for q, v in self._lists[folder].items()}
        if folder not in self._ids:
            self._ids[folder] = retrieve_ids(self.index(fold_dir), self.frame, self._retrieve(), keep=top)
        return self._ids[folder]

    def encoder_negatives(self, fold_dir: Path, held_out: frozenset[int]) -> pd.DataFrame | None:
        """``stack.train.TrainRowsFn``: catalogue negatives for a cross-encoder that holds out the
        queries ``held_out`` (none: the final model), ``stack.encoder_negatives`` a training query.

        Each is a row labelled I (gain 0) of a query outside ``held_out``, in its retrieval order,
        by ``stack.negative_rule``; a product judged for a held-out query never is one. None when
        the config asks for none.
        """
        stack = self.cfg.stack
        if not stack.encoder_negatives:
            return None
        if self._eligible is None:
            # every eligible product in retrieval order; each fold then takes its first ones
            self._eligible = mine_negatives(
                self.frame.assign(fold=-1),
                self.ranked_ids(fold_dir),
                stack.negatives_retrieve,
                stack.negative_rule,
                # the chosen ones get their text from frame (labelled_negatives); every eligible
                # product of every query with its text would be GBs on the full data
                with_text=False,
            )[["query_id", "product_id"]]
        eligible = self._eligible
        held_products = set(self.frame.loc[self.frame["query_id"].isin(held_out), "product_id"])
        keep = ~eligible["query_id"].isin(held_out) & ~eligible["product_id"].isin(held_products)
        chosen = eligible[keep].groupby("query_id", sort=False).head(stack.encoder_negatives)
        return labelled_negatives(self.frame, chosen)

    def negatives(
        self, fold_dir: Path, seeds: tuple[int, ...], oof: pd.DataFrame | None = None
    ) -> pd.DataFrame | None:
        """``stack.train.NegativesFn``: see the class docstring. ``oof`` is the out-of-fold table
        that says each query's fold (default: ``fold_dir/oof.parquet``)."""
        from esci_reranker.train.cv import fold_model_dir

        stack = self.cfg.stack
        if not self.flow and not stack.negatives_per_query:
            return None
        fold_dir = Path(fold_dir)
        table = (
            oof
            if oof is not None
            else pd.read_parquet(fold_dir / "oof.parquet", columns=["query_id", "fold"])
        )
        absent = [c for c in ("query_id", "fold") if c not in table.columns]
        if absent:
            raise ValueError(
                f"oof table: no column(s) {absent}; expected an oof.parquet written by cv or pipeline."
            )
        folds = table[["query_id", "fold"]].drop_duplicates("query_id")
        # every (fold, seed) model must be there: they score the flow and the negatives
        missing = [
            fold_model_dir(fold_dir, int(f), s)
            for f in sorted(folds["fold"].unique())
            for s in seeds
            if not (fold_model_dir(fold_dir, int(f), s) / "config.json").is_file()
        ]
        if missing:
            if stack.negatives_per_query:
                raise ValueError(
                    f"stack.negatives_per_query={stack.negatives_per_query}: the catalogue negatives are scored "
                    f"by the fold models, and {missing[0]} is missing (cv writes them beside oof.parquet)."
                )
            self.log(f"      search flow not measured: no fold model at {missing[0]}")
            return None
        frame = self.frame.merge(folds, on="query_id", how="left", validate="many_to_one")
        if self.flow:
            lists = self.lists(fold_dir)
            self.fold_flow = FoldFlow(
                frame,
                fold_dir,
                {q: v[:DEFAULT_RETRIEVE] for q, v in lists.items()},
                precision=self.cfg.eval.precision,
            )
        if not stack.negatives_per_query:
            return None
        cache = (
            fold_dir
            / f"negatives_{stack.negative_rule}_{stack.negatives_per_query}_{stack.negatives_retrieve}"
            f"{_precision_suffix(self.cfg.eval.precision)}.parquet"
        )
        if cache.is_file():
            cached = pd.read_parquet(cache)
            if set(seeds) <= set(cached["seed"].unique()):
                self.log(f"      catalogue negatives: {cache} (cached)")
                return cached.assign(weight=stack.negative_weight)
        mined = mine_negatives(
            frame,
            self.ranked_ids(fold_dir),
            stack.negatives_per_query,
            stack.negative_rule,
            stack.negative_weight,
        )
        self.log(
            f"      catalogue negatives: {len(mined)} ({stack.negative_rule}, up to {stack.negatives_per_query} "
            f"a query), scored by each query's fold model -> {cache}"
        )
        scored = score_negatives(mined, fold_dir, seeds, self.cfg.eval.precision)
        scored.to_parquet(cache, index=False)
        return scored

    def on_fold(self, seed: int, fold: int, stacker: Stacker, rows: pd.DataFrame) -> Mapping[str, Any]:
        """``stack.train.OnFoldFn``: the fold's search flow and title-only figures."""
        if self.fold_flow is None:
            return {}
        return self.fold_flow(seed, fold, stacker, rows)


def catalogue_flow(
    cfg: Any,
    frame: pd.DataFrame,
    flow: bool = True,
    log: Any = print,
    retriever: str | Path | None = None,
    test_split: str | Path | None = None,
) -> CatalogueFlow | None:
    """The search flow of a stacked config's CV (``CatalogueFlow``), or None when it
    is turned off, or cannot run without the retrieval extra and the config needs no negatives.
    ``test_split``: the test split's parquet; when it exists, its products are kept out of the
    catalogue (a product can be judged for a train query and a test query).

    Raises:
        ValueError: the config asks for catalogue negatives and the retrieval extra is missing.
    """
    asked = {
        name: value
        for name in ("negatives_per_query", "encoder_negatives")
        if (value := getattr(cfg.stack, name))
    }
    if not flow and not asked:
        return None
    try:
        import usearch  # noqa: F401  (the catalogue index)
    except ImportError as err:
        if asked:
            name, value = next(iter(asked.items()))
            raise ValueError(
                f"stack.{name}={value} retrieves from a catalogue: "
                f"install the retrieval extra (pip install 'esci-reranker[retrieval]'): {err}"
            ) from None
        log(f"      search flow not measured: the retrieval extra is missing ({err})")
        return None
    return CatalogueFlow(
        cfg,
        frame,
        log=log,
        flow=flow,
        retriever=retriever,
        exclude_products=_split_products(test_split),
    )


def stacked_inputs(
    cfg: Any, flow: bool, log: Any = print, retriever: str | Path | None = None
) -> tuple[pd.DataFrame, CatalogueFlow | None]:
    """The train+val table and the ``catalogue_flow`` a stacked training (``train``, ``pipeline``)
    runs with on this process.

    The main process reads the whole table and builds the catalogue from it (the catalogue stores
    every product field the trees read). The table is then cut to the training columns
    (``train.loop.training_frame``) for the cross-encoders: on the full data the rest is ~3 GiB
    a process, and the trees read the whole table again when they need it
    (``stack.train.stack_frame``). The flow keeps the whole table when it measures the folds'
    search flow (``flow``) or mines the trees' own negatives (``stack.negatives_per_query``):
    both read product text from it. The other processes read the training columns alone.
    """
    from esci_reranker.hardware import malloc_trim
    from esci_reranker.train.distributed import is_main_process
    from esci_reranker.train.loop import read_train_val, training_columns, training_frame

    fields = cfg.model.text_fields
    main = is_main_process()
    frame = read_train_val(cfg.data, None if main else training_columns(fields))
    catalogue = catalogue_flow(
        cfg, frame, flow, log, retriever=retriever, test_split=cfg.data.resolve("test")
    )
    if catalogue is not None and main:
        catalogue.index(cfg.output.resolved_run_dir() / "folds")
    frame = training_frame(frame, fields)
    if catalogue is not None and not (flow or cfg.stack.negatives_per_query):
        catalogue.frame = frame
    malloc_trim()
    return frame, catalogue


def evaluate_flow(
    reranker: Reranker,
    index: CatalogueIndex,
    frame: pd.DataFrame,
    labelled: pd.DataFrame,
    out_dir: str | Path,
    retrieve: int = DEFAULT_RETRIEVE,
    top_k: int = DEFAULT_TOP_K,
) -> dict[str, Any]:
    """Run ``frame``'s queries (a labelled split) through the search flow on ``index`` and write it.

    Writes into ``out_dir``: ``flow/predictions.parquet`` (every returned product with its kind),
    ``flow/metrics.json`` (``eval.flow.flow_metrics``), ``plots/calibration.png`` and a "Search
    flow" section appended to ``report.md`` (with 50 random foreign results to check the rule).

    Args:
        labelled: every labelled row known (all splits): which products are judged for which
            queries, the foreign rule's input. It is only read to mark results, never to choose.
    """
    from esci_reranker.eval.plots import plot_reliability
    from esci_reranker.eval.report import render_flow_section
    from esci_reranker.fsutil import write_json

    out = Path(out_dir)
    lists = retrieve_lists(index, frame, retrieve)
    judged = judged_index(labelled)
    run = flow_run(reranker, frame, lists, judged, frame)
    metrics = flow_metrics(run, ideal_gains(frame), top_k, reranker.substitute_threshold)
    (out / "flow").mkdir(parents=True, exist_ok=True)
    run.to_parquet(out / "flow" / "predictions.parquet", index=False)
    write_json(out / "flow" / "metrics.json", metrics, nan_as_null=True)
    plot = None
    if "reliability" in metrics:
        plot = (
            plot_reliability(metrics["reliability"], out / "plots" / "calibration.png")
            .relative_to(out)
            .as_posix()
        )
    audit = foreign_audit(run, judged).to_dict("records")
    report = out / "report.md"
    section = render_flow_section(metrics, audit, top_k, retrieve, plot)
    previous = report.read_text(encoding="utf-8") if report.is_file() else ""
    marker = "## Search flow: retrieve, rerank, label"
    if marker in previous:  # evaluated again: replace the old section
        previous = previous[: previous.index(marker)].rstrip() + "\n"
    report.write_text((previous + "\n" + section).lstrip() + "\n", encoding="utf-8")
    return metrics


def catalogue_lists(
    data_dir: str | Path,
    queries: pd.DataFrame,
    n: int,
    folder: str | Path,
    retriever: str | Path | None = None,
    log: Any = print,
    rule: str = "top",
) -> dict[object, list[str]]:
    """query id -> the product ids retrieved for each of ``queries`` (``query_id``, ``query``), in
    retrieval order, from the catalogue of a prepared folder's train+val products.

    The catalogue is the one at ``folder`` when there is one (``make run`` leaves it at
    ``runs/default/train/folds/catalogue``), else it is built there as ``CatalogueFlow`` builds it:
    the train and val products less every product judged for a test query (``data_dir``'s
    test split). Either way it is checked to hold none of them (``open_or_build_catalogue``).

    ``rule``: ``top`` keeps every retrieved product; ``foreign`` only those foreign to the query
    (``eval.flow.is_foreign`` over the train+val queries they are judged for), as the
    cross-encoders' catalogue negatives are chosen, so the list holds what a search brings back
    that is about something else.

    Raises:
        ValueError: an unknown ``rule``.
    """
    if rule not in RETRIEVED_RULES:
        raise ValueError(f"retrieved rule {rule!r}; expected one of {list(RETRIEVED_RULES)}.")
    frame, index = train_val_catalogue(data_dir, folder, retriever=retriever, log=log)
    lists = dict(retrieve_ids(index, queries, n).items())
    if rule == "top":
        return lists
    judged = judged_index(frame)
    text_of = dict(zip(queries["query_id"], queries["query"].astype(str), strict=False))
    foreign = {}
    for qid, ids in lists.items():
        # the flow's own marking: a product judged for the query is never foreign to it
        kinds = product_kinds(qid, text_of[qid], [str(pid) for pid in ids], judged)
        foreign[qid] = [pid for pid, kind in zip(ids, kinds, strict=True) if kind == "foreign"]
    return foreign


def train_val_catalogue(
    data_dir: str | Path, folder: str | Path, retriever: str | Path | None = None, log: Any = print
) -> tuple[pd.DataFrame, CatalogueIndex]:
    """A prepared folder's train+val rows and their catalogue at ``folder``: opened when it is
    there, else built there without any product judged for a test query; checked either way
    (``open_or_build_catalogue``)."""
    from esci_reranker.train.loop import read_train_val, required_test_split

    test_path = required_test_split(data_dir, "its products out of the catalogue")
    frame = read_train_val(data_dir)
    index = open_or_build_catalogue(frame, folder, _split_products(test_path), retriever=retriever, log=log)
    return frame, index


def compare_in_flow(
    models: Mapping[str, Reranker],
    index: CatalogueIndex,
    frame: pd.DataFrame,
    labelled: pd.DataFrame,
    retrieve: int = DEFAULT_RETRIEVE,
    top_k: int = DEFAULT_TOP_K,
) -> dict[str, Any]:
    """Several models through the same search flow: the same retrieved lists, reranked and
    labelled by each, and how often each labels a result as the first model does.

    Built to hold a distilled student against its teacher where a user sees their labels: a
    student that agrees with its teacher on judged lists can still label the unrelated products a
    catalogue search brings back otherwise.

    Args:
        models: name -> reranker; the first is the reference the others are compared with.
        frame: the labelled rows of the queries to run (``query_id``, ``query``, ``product_id``,
            ``esci_label``).
        labelled: every labelled row known (the foreign rule's input; only read to mark results).

    Returns:
        ``models``: name -> ``eval.flow.flow_summary`` of its run; ``agreement``: name (each model
        after the first) -> kind (``judged``, ``foreign``, ``unjudged``, ``all``) -> the share of
        those results it gives the reference's class; ``reference``: the first name.

    Raises:
        ValueError: no model.
    """
    if not models:
        raise ValueError("compare_in_flow: no model to run.")
    lists = retrieve_lists(index, frame, retrieve)
    judged = judged_index(labelled)
    ideal = ideal_gains(frame)
    runs = {name: flow_run(model, frame, lists, judged, frame) for name, model in models.items()}
    reference = next(iter(runs))
    base = runs[reference]
    out: dict[str, Any] = {"reference": reference, "models": {}, "agreement": {}}
    for name, run in runs.items():
        out["models"][name] = flow_summary(run, ideal, top_k, models[name].substitute_threshold)
        if name == reference:
            continue
        same = run["esci_pred"].to_numpy() == base["esci_pred"].to_numpy()
        kinds = run["kind"].to_numpy()
        out["agreement"][name] = {
            kind: float(same[kinds == kind].mean()) if (kinds == kind).any() else float("nan")
            for kind in ("judged", "foreign", "unjudged")
        } | {"all": float(same.mean())}
    return out


def _split_products(path: str | Path | None) -> frozenset[str]:
    """The product ids of a prepared split (none when there is no such file)."""
    if path is None or not Path(path).is_file():
        return frozenset()
    return frozenset(pd.read_parquet(path, columns=["product_id"])["product_id"].astype(str))
