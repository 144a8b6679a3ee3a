"""The catalogue index: products, their BM25 index and their dense vectors (usearch HNSW) on disk.

Layout of an index folder (every file in a portable format: Arrow IPC, numpy, JSON, usearch's
own file; nothing is pickled)::

    manifest.json              what built it: retriever (name, dim, probe embeddings), fields,
                               counts, segments, ANN and BM25 settings, format version
    products/seg-NNNNN.arrow   the products' stored fields (Arrow IPC, memory-mapped at search)
    tokens/seg-NNNNN.ids.npy   BM25 token ids of each product (flat) and their offsets
    tokens/seg-NNNNN.offsets.npy
    vocab.json                 BM25 token id -> word
    deleted.npy                keys of deleted or replaced products
    bm25/                      the bm25s index over the live products (+ keys.npy)
    dense.usearch              the HNSW graph of the live products' vectors, keyed like the rows

Every product gets an integer *key* (its row number over all segments, never reused). Building
reads the products file in Arrow record batches, so memory grows with the token ids and the
vectors, not with the product text. ``update`` adds a segment for new or changed products,
marks replaced and deleted keys as deleted, removes them from the HNSW graph and adds the new
vectors (only changed products are embedded), then rebuilds the BM25 matrix from the stored
token ids (no product is read or tokenised again). Each build or update is written to a
temporary folder (unchanged segment files are hard-linked, not copied) that replaces the index
folder in one rename, so a reader never sees a half-written index.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from esci_reranker import __version__
from esci_reranker.data.text import (
    DEFAULT_LONG_FIELD_CHARS,
    DEFAULT_TEXT_FIELDS,
    FIELD_COLUMNS,
    clean_column,
    join_cleaned_fields,
    parse_text_fields,
)
from esci_reranker.fsutil import staged_dir, write_json
from esci_reranker.retrieval.bm25 import DEFAULT_B, DEFAULT_K1, Bm25, Vocabulary
from esci_reranker.retrieval.encoder import PACKAGED_RETRIEVER, DenseEncoder, IndexMismatchError
from esci_reranker.retrieval.fusion import DEFAULT_RRF_K, FUSION_METHODS, Ranking, fuse

FORMAT: Final[str] = "esci-reranker catalogue index"
FORMAT_VERSION: Final[int] = 1
MANIFEST: Final[str] = "manifest.json"
#: Fields always stored for display (the page and /search show title, brand and colour).
DISPLAY_FIELDS: Final[tuple[str, ...]] = ("title", "brand", "color")
#: Rows per Arrow record batch read from the products file (and per embedding call).
DEFAULT_BATCH_ROWS: Final[int] = 4096
#: HNSW settings (usearch): graph degree, candidate-list sizes when adding and when searching.
HNSW_CONNECTIVITY: Final[int] = 16
HNSW_EXPANSION_ADD: Final[int] = 128
HNSW_EXPANSION_SEARCH: Final[int] = 128
#: Vector storage: half precision halves the memory of 1.2M x 384 vectors (1.8 -> 0.9 GB).
VECTOR_DTYPE: Final[str] = "f16"
#: The fusion used when the retriever folder does not name one (what CV chose; docs/search.md).
DEFAULT_FUSION: Final[dict[str, Any]] = {"method": "rrf", "rrf_k": DEFAULT_RRF_K, "dense_weight": 0.5}
RETRIEVAL_MODES: Final[tuple[str, ...]] = ("hybrid", "bm25", "dense")


class CatalogueIndexError(ValueError):
    """An index folder is missing, of another format version, or asked for something it lacks."""


@dataclass(frozen=True)
class Retrieved:
    """One retrieved product: its key and id, stored fields, fused score and per-source ranks.

    ``bm25_rank`` / ``dense_rank`` are 1-based ranks in each source's list (None: not in it);
    ``sources`` names the sources that found it, in the order bm25, dense.
    """

    key: int
    product_id: str
    fields: dict[str, str]
    score: float
    bm25_rank: int | None
    dense_rank: int | None

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(
            name for name, rank in (("bm25", self.bm25_rank), ("dense", self.dense_rank)) if rank is not None
        )


@dataclass
class BuildStats:
    """Counts and timings of a build or an update."""

    added: int = 0
    replaced: int = 0
    deleted: int = 0
    not_found: list[str] = field(default_factory=list)
    duplicates_skipped: int = 0
    empty_skipped: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# reading products in batches
# ---------------------------------------------------------------------------------------------


def _source_columns(schema_names: Sequence[str], fields: Sequence[str]) -> dict[str, str]:
    """Short field name -> the column that holds it (``title`` or ``product_title``)."""
    out = {}
    for name in fields:
        for column in (name, FIELD_COLUMNS[name]):
            if column in schema_names:
                out[name] = column
                break
    return out


def open_products(path: str | Path, fields: Sequence[str]) -> tuple[pq.ParquetFile, dict[str, str]]:
    """Open a products parquet and find its field columns (see ``iter_product_batches``).

    Raises:
        CatalogueIndexError: the file is missing, unreadable, or has no ``product_id`` / no field column.
    """
    path = Path(path)
    if not path.is_file():
        raise CatalogueIndexError(
            f"{path}: products file not found; expected a parquet file with product_id and product fields."
        )
    try:
        handle = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise CatalogueIndexError(f"{path}: not a readable parquet file ({err}).") from None
    names = handle.schema_arrow.names
    if "product_id" not in names:
        raise CatalogueIndexError(f"{path}: no 'product_id' column (columns: {names}).")
    columns = _source_columns(names, fields)
    if not columns:
        raise CatalogueIndexError(
            f"{path}: none of the product fields {list(fields)} is a column (as short names or "
            f"{[FIELD_COLUMNS[f] for f in fields]}); columns: {names}."
        )
    return handle, columns


def iter_product_batches(
    path: str | Path, fields: Sequence[str], batch_rows: int = DEFAULT_BATCH_ROWS
) -> Iterator[pd.DataFrame]:
    """Read ``product_id`` and the given fields from a parquet file, ``batch_rows`` rows at a time.

    Columns may use the short names (``title``) or the ESCI names (``product_title``). Each frame
    has ``product_id`` and one column per short field name present in the file. The file is
    checked (``open_products``) when this is called, not at the first batch.
    """
    handle, columns = open_products(path, fields)

    def batches() -> Iterator[pd.DataFrame]:
        for batch in handle.iter_batches(batch_size=batch_rows, columns=["product_id", *columns.values()]):
            yield batch.to_pandas().rename(columns={v: k for k, v in columns.items()})

    return batches()


# ---------------------------------------------------------------------------------------------
# the index
# ---------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _new_ann(dim: int) -> Any:
    from usearch.index import Index

    return Index(
        ndim=dim,
        metric="ip",  # vectors are unit length: inner product = cosine; distance = 1 - cosine
        dtype=VECTOR_DTYPE,
        connectivity=HNSW_CONNECTIVITY,
        expansion_add=HNSW_EXPANSION_ADD,
        expansion_search=HNSW_EXPANSION_SEARCH,
    )


def embedding_device(device: str | None) -> str:
    """The torch device name to embed products on: ``device``, or (None / ``auto``) a GPU when present.

    Raises:
        ValueError: ``device`` is not a torch device name, or names a GPU this machine lacks
            (``reranker.select_device``'s checks).
    """
    from esci_reranker.reranker import select_device  # torch: imported when an index embeds

    return str(select_device(device))


def _require_usearch() -> None:
    try:
        import usearch  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "the catalogue index needs usearch: pip install 'esci-reranker[retrieval]'"
        ) from err


class _SegmentWriter:
    """Writes one products segment (Arrow IPC) and its token ids while batches arrive."""

    def __init__(self, folder: Path, name: str, stored: Sequence[str]) -> None:
        self.folder = folder
        self.name = name
        self.schema = pa.schema(
            [("key", pa.int64()), ("product_id", pa.string())] + [(f, pa.string()) for f in stored]
        )
        (folder / "products").mkdir(parents=True, exist_ok=True)
        (folder / "tokens").mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(folder / "products" / f"{name}.arrow"), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._ids: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self.rows = 0

    def write(
        self,
        keys: np.ndarray,
        ids: Sequence[str],
        stored: dict[str, np.ndarray],
        tokens: tuple[np.ndarray, np.ndarray],
    ) -> None:
        arrays = [pa.array(keys, pa.int64()), pa.array(list(ids), pa.string())]
        arrays += [pa.array(list(stored[name]), pa.string()) for name in self.schema.names[2:]]
        self._writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        flat, offsets = tokens
        self._ids.append(flat)
        self._lengths.append(np.diff(offsets))
        self.rows += len(keys)

    def close(self) -> None:
        self._writer.close()
        self._sink.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int32)
        np.save(self.folder / "tokens" / f"{self.name}.ids.npy", flat.astype(np.int32))
        np.save(self.folder / "tokens" / f"{self.name}.offsets.npy", offsets)


class CatalogueIndex:
    """An opened index folder: retrieve with ``retrieve``; build with ``build``; change with ``update``.

    Open with ``CatalogueIndex.open(folder, retriever=None)``: the retriever is the one named in
    the manifest unless another is given, and it must embed the probe texts as the index's
    builder did (else ``IndexMismatchError``).
    """

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        encoder: DenseEncoder,
        bm25: Bm25,
        ann: Any,
        deleted: np.ndarray,
        writable: bool = False,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.encoder = encoder
        self.bm25 = bm25
        self.ann = ann
        self.deleted = deleted  # sorted int64 keys
        self.writable = writable
        self._tables: list[pa.Table] | None = None
        self._first_keys = np.asarray([s["first_key"] for s in manifest["segments"]], dtype=np.int64)

    # -- facts ----------------------------------------------------------------------------------
    @property
    def fields(self) -> tuple[str, ...]:
        """The product fields BM25 and the retriever read (joined with ' | ')."""
        return tuple(self.manifest["fields"])

    @property
    def stored_fields(self) -> tuple[str, ...]:
        """The product fields kept for display and reranking."""
        return tuple(self.manifest["stored_fields"])

    @property
    def fusion(self) -> dict[str, Any]:
        return dict(self.manifest["fusion"])

    def __len__(self) -> int:
        """Live (not deleted) products."""
        return int(self.manifest["counts"]["products"])

    def info(self) -> dict[str, Any]:
        """Path, counts, retriever, fields, fusion and libraries: what /info reports."""
        m = self.manifest
        return {
            "path": str(self.folder),
            "products": m["counts"]["products"],
            "deleted": m["counts"]["deleted"],
            "segments": len(m["segments"]),
            "retriever": m["retriever"]["name"],
            "dim": m["retriever"]["dim"],
            "fields": m["fields"],
            "stored_fields": m["stored_fields"],
            "fusion": m["fusion"],
            "ann": m["ann"]["library"],
            "bm25": m["bm25"]["library"],
            "version": m["version"],
            "updated": m.get("updated"),
        }

    # -- opening --------------------------------------------------------------------------------
    @staticmethod
    def read_manifest(folder: str | Path) -> dict[str, Any]:
        """The manifest of an index folder.

        Raises:
            CatalogueIndexError: no index there, or one of another format version.
        """
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise CatalogueIndexError(
                f"{Path(folder)}: no catalogue index here (no {MANIFEST}); build one with "
                "`esci-reranker index --sample --out DIR` or `--products F.parquet`."
            )
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise CatalogueIndexError(
                f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
                f"esci-reranker reads {FORMAT!r} version {FORMAT_VERSION}. Rebuild the index."
            )
        return manifest

    @classmethod
    def open(
        cls,
        folder: str | Path,
        retriever: str | Path | DenseEncoder | None = None,
        writable: bool = False,
        device: str | None = "cpu",
        precision: str = "fp32",
    ) -> CatalogueIndex:
        """Open an index for retrieval (``writable=False``: files memory-mapped) or for ``update``.

        Args:
            retriever: a spec (folder / ``packaged:...``) or a loaded ``DenseEncoder``; None = the
                one the manifest names.
            precision: what a loaded retriever embeds in (fp32, bf16 or auto; see ``DenseEncoder``).

        Raises:
            CatalogueIndexError: no index in ``folder``, or another format version.
            IndexMismatchError: ``retriever`` does not embed text as the index's retriever did.
        """
        _require_usearch()
        from usearch.index import Index

        folder = Path(folder)
        manifest = cls.read_manifest(folder)
        built = manifest["retriever"]
        if isinstance(retriever, DenseEncoder):
            encoder = retriever
        else:
            spec = retriever if retriever is not None else built["name"]
            try:
                encoder = DenseEncoder.load(
                    spec, device=device, max_seq_length=built["max_seq_length"], precision=precision
                )
            except FileNotFoundError as err:
                raise IndexMismatchError(
                    f"{folder}: cannot load the retriever {str(spec)!r} "
                    f"{'the index was built with' if retriever is None else 'given'}: {err} Pass the "
                    "folder it now lives in with --retriever (RETRIEVER_PATH for the service)."
                ) from None
        encoder.check_probe(built["probe"], built["name"], str(folder))
        bm25 = Bm25.load(folder / "bm25", mmap=not writable)
        ann = Index.restore(str(folder / "dense.usearch"), view=not writable)
        if ann is None:
            raise CatalogueIndexError(f"{folder / 'dense.usearch'}: not a usearch index file.")
        ann.expansion_search = HNSW_EXPANSION_SEARCH
        deleted = np.load(folder / "deleted.npy")
        return cls(folder, manifest, encoder, bm25, ann, deleted, writable)

    # -- products -------------------------------------------------------------------------------
    def _segment_tables(self) -> list[pa.Table]:
        if self._tables is None:
            tables = []
            for seg in self.manifest["segments"]:
                source = pa.memory_map(str(self.folder / "products" / f"{seg['name']}.arrow"), "r")
                tables.append(pa.ipc.open_file(source).read_all())
            self._tables = tables
        return self._tables

    def products(self, keys: Sequence[int] | np.ndarray) -> list[dict[str, str]]:
        """``product_id`` and the stored fields of each key, in the order given."""
        out: list[dict[str, str] | None] = [None] * len(keys)
        for where, rows in self._segment_rows(keys):
            for i, record in zip(where, rows.to_pylist(), strict=True):
                record.pop("key")
                out[i] = record
        return out  # type: ignore[return-value]

    def product_ids(self, keys: Sequence[int] | np.ndarray) -> list[str]:
        """The ``product_id`` of each key, in the order given (only that column is read)."""
        out: list[str] = [""] * len(keys)
        for where, rows in self._segment_rows(keys, ["product_id"]):
            for i, pid in zip(where, rows.column("product_id").to_pylist(), strict=True):
                out[i] = pid
        return out

    def _segment_rows(
        self, keys: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None
    ) -> Iterator[tuple[np.ndarray, pa.Table]]:
        """For each segment holding some of ``keys``: their positions in ``keys`` and their rows
        (every stored column, or ``columns``)."""
        keys = np.asarray(keys, dtype=np.int64)
        if len(keys) == 0:
            return
        tables = self._segment_tables()
        seg = np.searchsorted(self._first_keys, keys, side="right") - 1
        for s in np.unique(seg):
            where = np.flatnonzero(seg == s)
            table = tables[s] if columns is None else tables[s].select(list(columns))
            yield where, table.take(pa.array(keys[where] - self._first_keys[s]))

    def live_ids(self) -> dict[str, int]:
        """``product_id -> key`` of every live product (read from the segments; for updates)."""
        deleted = set(self.deleted.tolist())
        out: dict[str, int] = {}
        for table in self._segment_tables():
            for key, pid in zip(
                table.column("key").to_numpy(), table.column("product_id").to_pylist(), strict=True
            ):
                if int(key) not in deleted:
                    out[pid] = int(key)
        return out

    # -- retrieval ------------------------------------------------------------------------------
    def bm25_search(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """BM25's best ``k`` keys (positive scores only) and their scores."""
        return self.bm25.search(query, k)

    def dense_search(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The HNSW graph's best ``k`` keys for the query's embedding and their cosines."""
        return self._dense_batch([query], k)[0]

    def retrieve(
        self,
        query: str,
        n: int = 100,
        mode: str = "hybrid",
        fusion: dict[str, Any] | None = None,
    ) -> list[Retrieved]:
        """The top ``n`` products for ``query``: BM25, dense, or both fused (the index's fusion).

        Each source contributes its own top ``n``; the fused list is cut to ``n``.

        Raises:
            ValueError: empty query, ``n < 1`` or an unknown mode.
        """
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query must be a non-empty string.")
        _check_request(n, mode)
        b_keys, b_scores = (
            self.bm25_search(query, n) if mode != "dense" else (np.zeros(0, np.int64), np.zeros(0))
        )
        d_keys, d_scores = (
            self.dense_search(query, n) if mode != "bm25" else (np.zeros(0, np.int64), np.zeros(0))
        )
        keys, scores, ranks = self._fused(b_keys, b_scores, d_keys, d_scores, n, mode, fusion)
        records = self.products(keys)
        out = []
        for i, record in enumerate(records):
            pid = record.pop("product_id")
            b_rank, d_rank = (int(r) for r in ranks[i])
            out.append(
                Retrieved(
                    key=int(keys[i]),
                    product_id=pid,
                    fields={k: v for k, v in record.items() if v},
                    score=float(scores[i]),
                    bm25_rank=b_rank or None,
                    dense_rank=d_rank or None,
                )
            )
        return out

    def retrieve_keys(
        self,
        queries: Sequence[str],
        n: int = 100,
        mode: str = "hybrid",
        fusion: dict[str, Any] | None = None,
        batch_size: int = 256,
    ) -> list[np.ndarray]:
        """The keys ``retrieve`` ranks for each of many ``queries`` (best first), without their fields.

        For mining lists at scale: the queries are embedded ``batch_size`` at a time and the graph
        searched once per batch, and no product is read, so a list costs its keys alone (a
        ``Retrieved`` with its fields is ~1 KB: 100 for each of ~110k queries would not fit).
        ``product_ids`` names the keys.

        Raises:
            ValueError: an empty query, ``n < 1`` or an unknown mode.
        """
        _check_request(n, mode)
        for i, query in enumerate(queries):
            if not isinstance(query, str) or not query.strip():
                raise ValueError(f"queries[{i}]: {query!r}; expected a non-empty string.")
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32))
        out: list[np.ndarray] = []
        for start in range(0, len(queries), batch_size):
            chunk = list(queries[start : start + batch_size])
            dense = self._dense_batch(chunk, n) if mode != "bm25" else [empty] * len(chunk)
            for query, (d_keys, d_scores) in zip(chunk, dense, strict=True):
                b_keys, b_scores = self.bm25_search(query, n) if mode != "dense" else empty
                out.append(self._fused(b_keys, b_scores, d_keys, d_scores, n, mode, fusion)[0])
        return out

    def _dense_batch(self, queries: list[str], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The dense keys and cosines of each query, embedded together and searched in one call."""
        if len(self.ann) == 0 or k < 1:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32))] * len(queries)
        vectors = self.encoder.encode(queries)
        # The candidate list must be at least k long for the search to return k good neighbours.
        self.ann.expansion_search = max(HNSW_EXPANSION_SEARCH, k)
        # Asked for every live product: scan them all. After deletions an HNSW graph can leave a
        # node unreachable, and a caller asking for all must get all.
        matches = self.ann.search(vectors, k, exact=k >= len(self.ann))
        # usearch answers one vector with its matches, several with a batch of them
        rows = [matches] if len(queries) == 1 else [matches[i] for i in range(len(queries))]
        return [(np.asarray(m.keys, np.int64), 1.0 - np.asarray(m.distances, np.float32)) for m in rows]

    def _fused(
        self,
        b_keys: np.ndarray,
        b_scores: np.ndarray,
        d_keys: np.ndarray,
        d_scores: np.ndarray,
        n: int,
        mode: str,
        fusion: dict[str, Any] | None,
    ) -> tuple[np.ndarray, Any, np.ndarray]:
        """Keys, scores and per-source ranks (n, 2) of the top ``n`` of one query's source lists."""
        if mode == "hybrid":
            setting = fusion or self.fusion
            method = setting.get("method", "rrf")
            if method not in FUSION_METHODS:
                raise ValueError(
                    f"{self.folder}: fusion method {method!r}; expected one of {list(FUSION_METHODS)}."
                )
            w = float(setting.get("dense_weight", 0.5))
            fused = fuse(
                [Ranking(b_keys.tolist(), b_scores.tolist()), Ranking(d_keys.tolist(), d_scores.tolist())],
                method=method,
                weights=(1.0 - w, w) if method == "zscore" else None,
                rrf_k=float(setting.get("rrf_k", DEFAULT_RRF_K)),
            )
            return np.asarray(fused.keys[:n], dtype=np.int64), fused.scores[:n], np.asarray(fused.ranks[:n])
        # one source: its own scores and ranks
        keys, scores = (b_keys, b_scores) if mode == "bm25" else (d_keys, d_scores)
        ranks = np.zeros((len(keys), 2), dtype=np.int64)
        ranks[:, 0 if mode == "bm25" else 1] = np.arange(1, len(keys) + 1)
        return keys, scores, ranks

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        products: str | Path | Iterable[pd.DataFrame],
        out_dir: str | Path,
        retriever: str | Path | DenseEncoder = PACKAGED_RETRIEVER,
        fields: Sequence[str] = DEFAULT_TEXT_FIELDS,
        store_fields: Sequence[str] = (),
        long_field_chars: int = DEFAULT_LONG_FIELD_CHARS,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        fusion: dict[str, Any] | None = None,
        source: str | None = None,
        log: Any = None,
        device: str | None = None,
        precision: str = "fp32",
        threads: int = 0,
    ) -> BuildStats:
        """Build an index of ``products`` (a parquet path, or frames with ``product_id`` and fields).

        The first occurrence of a product id wins; later ones and products with no text are
        skipped (counted in the result). The fusion is ``fusion``, else the one the retriever
        folder's ``esci_retrieval.json`` names, else ``DEFAULT_FUSION``. ``device`` embeds the
        products (None or ``auto``: a GPU when there is one; embedding is ~90 % of a build), in
        ``precision`` (fp32, bf16, or auto: bf16 where the device computes it natively; ignored when
        ``retriever`` is a loaded ``DenseEncoder``, which has its own). ``threads`` add vectors to
        the HNSW graph (0: every core); with several the graph, and so what a query retrieves,
        can differ from one build of the same products to the next; 1 builds it the same each time.
        """
        _require_usearch()
        fields = parse_text_fields(fields)
        stored = tuple(dict.fromkeys([*DISPLAY_FIELDS, *fields, *parse_text_fields(store_fields or fields)]))
        # The products file is checked before the (slower) retriever is loaded.
        batches = (
            iter_product_batches(products, stored, batch_rows)
            if isinstance(products, str | Path)
            else products
        )
        encoder = (
            retriever
            if isinstance(retriever, DenseEncoder)
            else DenseEncoder.load(retriever, device=embedding_device(device), precision=precision)
        )
        spec = str(retriever.name if isinstance(retriever, DenseEncoder) else retriever)
        stats = BuildStats()
        out = Path(out_dir)
        start = time.perf_counter()
        with staged_dir(out) as tmp:
            vocab = Vocabulary()
            ann = _new_ann(encoder.dim)
            writer = _SegmentWriter(tmp, "seg-00000", stored)
            seen: set[str] = set()
            seconds = {"read_clean": 0.0, "embed": 0.0, "ann_add": 0.0}
            next_key = 0
            for frame in batches:
                t = time.perf_counter()
                ids, cleaned, texts = _prepare_batch(frame, stored, fields, long_field_chars, seen, stats)
                seconds["read_clean"] += time.perf_counter() - t
                if not ids:
                    continue
                keys = np.arange(next_key, next_key + len(ids), dtype=np.int64)
                next_key += len(ids)
                writer.write(keys, ids, cleaned, vocab.encode_many(texts))
                t = time.perf_counter()
                vectors = encoder.encode(texts)
                seconds["embed"] += time.perf_counter() - t
                t = time.perf_counter()
                ann.add(keys, vectors, threads=threads)
                seconds["ann_add"] += time.perf_counter() - t
                stats.added += len(ids)
                if log is not None:
                    log(f"  {stats.added:,} products indexed")
            writer.close()
            segments = [{"name": "seg-00000", "first_key": 0, "rows": writer.rows}]
            deleted = np.zeros(0, dtype=np.int64)
            t = time.perf_counter()
            bm25 = _build_bm25(tmp, segments, deleted, vocab)
            seconds["bm25"] = time.perf_counter() - t
            _save_state(tmp, ann, bm25, vocab, deleted)
            manifest = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "esci_reranker_version": __version__,
                "created": _now(),
                "updated": _now(),
                "source": source or (str(products) if isinstance(products, str | Path) else "frames"),
                "retriever": _retriever_entry(encoder, spec),
                "fields": list(fields),
                "stored_fields": list(stored),
                "long_field_chars": long_field_chars,
                "fusion": fusion or _retriever_fusion(spec) or dict(DEFAULT_FUSION),
                "segments": segments,
                "counts": _counts(next_key, deleted, segments, vocab),
                "ann": _ann_entry(),
                "bm25": _bm25_entry(),
            }
            write_json(tmp / MANIFEST, manifest)
        seconds["total"] = time.perf_counter() - start
        stats.seconds = seconds
        return stats

    # -- updating -------------------------------------------------------------------------------
    @classmethod
    def update(
        cls,
        folder: str | Path,
        products: str | Path | Iterable[pd.DataFrame] | None = None,
        delete: Sequence[str] = (),
        retriever: str | Path | DenseEncoder | None = None,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        log: Any = None,
        device: str | None = None,
        precision: str = "fp32",
    ) -> BuildStats:
        """Add or replace ``products`` (same columns as for ``build``) and delete ``delete`` ids.

        ``device`` embeds the new products (None or ``auto``: a GPU when there is one) in
        ``precision`` (as for ``build``).

        A product whose id is already indexed is replaced (its old row is marked deleted and its
        new text embedded); ``delete`` ids that are not indexed are listed in ``not_found``.
        Deletes apply before the new products, so an id in both ends up with the new version.

        Raises:
            IndexMismatchError: ``retriever`` (default: the manifest's) embeds differently from
                the one that built the index.
        """
        folder = Path(folder)
        if isinstance(products, str | Path):  # check the file before the (slower) retriever loads
            open_products(products, cls.read_manifest(folder)["stored_fields"])
        index = cls.open(
            folder, retriever=retriever, writable=True, device=embedding_device(device), precision=precision
        )
        manifest = index.manifest
        fields = tuple(manifest["fields"])
        stored = tuple(manifest["stored_fields"])
        vocab = Vocabulary.load(folder / "vocab.json")
        stats = BuildStats()
        start = time.perf_counter()
        seconds = {"read_clean": 0.0, "embed": 0.0, "ann": 0.0}
        live = index.live_ids()
        deleted = set(index.deleted.tolist())
        ann = index.ann

        def drop(key: int) -> None:
            deleted.add(key)
            ann.remove(key)

        for pid in dict.fromkeys(str(p) for p in delete):
            key = live.pop(pid, None)
            if key is None:
                stats.not_found.append(pid)
                continue
            drop(key)
            stats.deleted += 1
        segments = list(manifest["segments"])
        next_key = int(manifest["counts"]["keys"])
        with staged_dir(folder) as tmp:
            # Segments never change once written: link them into the new folder instead of copying.
            for sub in ("products", "tokens"):
                (tmp / sub).mkdir()
                for file in (folder / sub).iterdir():
                    os.link(file, tmp / sub / file.name)
            if products is not None:
                name = f"seg-{len(segments):05d}"
                writer = _SegmentWriter(tmp, name, stored)
                first_key = next_key
                batches = (
                    iter_product_batches(products, stored, batch_rows)
                    if isinstance(products, str | Path)
                    else products
                )
                seen: set[str] = set()
                for frame in batches:
                    t = time.perf_counter()
                    ids, cleaned, texts = _prepare_batch(
                        frame, stored, fields, int(manifest["long_field_chars"]), seen, stats
                    )
                    seconds["read_clean"] += time.perf_counter() - t
                    if not ids:
                        continue
                    t = time.perf_counter()
                    for pid in ids:
                        old = live.pop(pid, None)
                        if old is not None:
                            drop(old)
                            stats.replaced += 1
                    seconds["ann"] += time.perf_counter() - t
                    keys = np.arange(next_key, next_key + len(ids), dtype=np.int64)
                    next_key += len(ids)
                    writer.write(keys, ids, cleaned, vocab.encode_many(texts))
                    t = time.perf_counter()
                    vectors = index.encoder.encode(texts)
                    seconds["embed"] += time.perf_counter() - t
                    t = time.perf_counter()
                    ann.add(keys, vectors)
                    seconds["ann"] += time.perf_counter() - t
                    live.update(zip(ids, keys.tolist(), strict=True))
                    stats.added += len(ids)
                writer.close()
                if writer.rows:
                    segments.append({"name": name, "first_key": first_key, "rows": writer.rows})
                else:  # nothing new: drop the empty segment's files
                    (tmp / "products" / f"{name}.arrow").unlink()
                    for suffix in (".ids.npy", ".offsets.npy"):
                        (tmp / "tokens" / f"{name}{suffix}").unlink()
            stats.added -= stats.replaced  # "added" counts new ids only
            deleted_keys = np.asarray(sorted(deleted), dtype=np.int64)
            t = time.perf_counter()
            bm25 = _build_bm25(tmp, segments, deleted_keys, vocab)
            seconds["bm25"] = time.perf_counter() - t
            _save_state(tmp, ann, bm25, vocab, deleted_keys)
            manifest = dict(manifest)
            if products is not None:
                manifest["retriever"] = _with_precision(manifest["retriever"], index.encoder.precision)
            manifest.update(
                updated=_now(),
                esci_reranker_version=__version__,
                segments=segments,
                counts=_counts(next_key, deleted_keys, segments, vocab),
                ann=_ann_entry(),
                bm25=_bm25_entry(),
            )
            write_json(tmp / MANIFEST, manifest)
        seconds["total"] = time.perf_counter() - start
        stats.seconds = seconds
        return stats


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _check_request(n: object, mode: str) -> None:
    """``retrieve``'s and ``retrieve_keys``' list length and mode, or a ValueError naming them."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}; expected a positive integer.")
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f"mode={mode!r}; expected one of {list(RETRIEVAL_MODES)}.")


def _prepare_batch(
    frame: pd.DataFrame,
    stored: Sequence[str],
    fields: Sequence[str],
    long_field_chars: int,
    seen: set[str],
    stats: BuildStats,
) -> tuple[list[str], dict[str, np.ndarray], list[str]]:
    """Cleaned stored fields, ids and retriever texts of one batch, minus repeats and empty texts."""
    if "product_id" not in frame.columns:
        raise CatalogueIndexError(f"products: no 'product_id' column (columns: {list(frame.columns)}).")
    raw_ids = clean_column(frame["product_id"])
    cleaned = {
        name: clean_column(frame[name]) if name in frame.columns else np.full(len(frame), "", dtype=object)
        for name in stored
    }
    texts = join_cleaned_fields({f: cleaned[f] for f in fields}, fields, long_field_chars, length=len(frame))
    keep = np.zeros(len(frame), dtype=bool)
    for i, pid in enumerate(raw_ids):
        if not pid:
            stats.empty_skipped += 1
        elif pid in seen:
            stats.duplicates_skipped += 1
        elif not texts[i]:
            stats.empty_skipped += 1
        else:
            seen.add(pid)
            keep[i] = True
    return (
        [str(x) for x in raw_ids[keep]],
        {name: values[keep] for name, values in cleaned.items()},
        [str(x) for x in texts[keep]],
    )


def _build_bm25(
    folder: Path, segments: Sequence[dict[str, Any]], deleted: np.ndarray, vocab: Vocabulary
) -> Bm25:
    """The BM25 index over every live product, from the segments' stored token ids."""
    docs: list[list[int]] = []
    keys: list[np.ndarray] = []
    for seg in segments:
        flat = np.load(folder / "tokens" / f"{seg['name']}.ids.npy", mmap_mode="r")
        offsets = np.load(folder / "tokens" / f"{seg['name']}.offsets.npy")
        seg_keys = seg["first_key"] + np.arange(seg["rows"], dtype=np.int64)
        live = ~np.isin(seg_keys, deleted)
        ids = np.asarray(flat).tolist()
        docs.extend(ids[offsets[i] : offsets[i + 1]] for i in np.flatnonzero(live))
        keys.append(seg_keys[live])
    all_keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    return Bm25.build(docs, all_keys, vocab)


def _save_state(folder: Path, ann: Any, bm25: Bm25, vocab: Vocabulary, deleted: np.ndarray) -> None:
    ann.save(str(folder / "dense.usearch"))
    bm25_dir = folder / "bm25"
    if bm25_dir.exists():
        shutil.rmtree(bm25_dir)
    bm25.save(bm25_dir)
    vocab.save(folder / "vocab.json")
    np.save(folder / "deleted.npy", deleted)


def _counts(
    next_key: int, deleted: np.ndarray, segments: Sequence[dict[str, Any]], vocab: Vocabulary
) -> dict[str, int]:
    return {
        "products": int(next_key - len(deleted)),
        "deleted": len(deleted),
        "keys": int(next_key),
        "segments": len(segments),
        "vocabulary": len(vocab),
    }


def _retriever_entry(encoder: DenseEncoder, spec: str) -> dict[str, Any]:
    return {
        "name": spec,
        "dim": encoder.dim,
        "max_seq_length": encoder.model.max_seq_length,
        "weights_sha256_16": encoder.weights_digest(),  # None: an in-memory encoder without a folder
        "probe": encoder.probe(),
        "precisions": [encoder.precision],
    }


def _with_precision(entry: dict[str, Any], precision: str) -> dict[str, Any]:
    """The manifest's retriever entry with ``precision`` among the precisions that embedded products
    (an index from before this field says nothing: fp32 was the only precision then)."""
    known = list(entry.get("precisions", ["fp32"]))
    return {**entry, "precisions": known if precision in known else [*known, precision]}


def _retriever_fusion(spec: str) -> dict[str, Any] | None:
    from esci_reranker.retrieval.train import RETRIEVAL_META

    path = Path(spec) / RETRIEVAL_META
    if path.is_file():
        return dict(json.loads(path.read_text()).get("fusion") or {}) or None
    return None


def _ann_entry() -> dict[str, Any]:
    import usearch

    return {
        "library": "usearch",
        "version": usearch.__version__,
        "kind": "HNSW",
        "metric": "ip (unit vectors: cosine)",
        "dtype": VECTOR_DTYPE,
        "connectivity": HNSW_CONNECTIVITY,
        "expansion_add": HNSW_EXPANSION_ADD,
        "expansion_search": HNSW_EXPANSION_SEARCH,
    }


def _bm25_entry() -> dict[str, Any]:
    import bm25s

    return {
        "library": "bm25s",
        "version": bm25s.__version__,
        "k1": DEFAULT_K1,
        "b": DEFAULT_B,
        "tokens": "lowercase \\w+ words, English stopwords removed (model.lexical.word_tokens)",
    }


__all__ = [
    "CatalogueIndex",
    "CatalogueIndexError",
    "IndexMismatchError",
    "Retrieved",
    "iter_product_batches",
]
