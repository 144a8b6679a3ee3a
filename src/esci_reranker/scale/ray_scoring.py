"""Batch scoring on Ray Data: parquet in, one ``Reranker`` per actor, parquet out, nothing lost.

``score_with_ray(model, input, out_dir)`` runs two streaming Ray Data jobs over the input
(a parquet file, a folder of them, a glob, or a URI Ray's filesystems read):

1. ``read_parquet -> map_batches(rejected_rows) -> write_parquet(out_dir/rejects)``: rows with
   no query or no product text, every input column kept plus ``reject_reason``;
2. ``read_parquet -> map_batches(BatchScorer, concurrency=num_actors) -> write_parquet(out_dir/scores)``:
   the other rows with the single-process ``score`` columns appended.

Both jobs apply the same ``reject_reasons``, so each input row lands in exactly one of the two.
A model that reads whole candidate lists (the stacked default's list features, the list-level
families) gets whole lists: its rows are grouped into blocks by a hash of ``query_id`` (else of
``query``), about ``rows_per_batch`` rows each and never a query cut in two, so every pair is
scored beside the same candidates as in one process.
Afterwards the row counts are checked (scored + rejected = input) and, when the input has an
``example_id`` or ``(query_id, product_id)`` key and the paths are local, that every input key is
found exactly once in the output; ``out_dir/summary.json`` records the counts and timings.

Ray is an optional extra (``pip install 'esci-reranker[ray]'``), imported only here. With no
``address`` (and no ``$RAY_ADDRESS``) a local Ray is started and shut down at the end; with one,
the job joins that cluster, and the model, the input and ``out_dir`` must be reachable from every node (a shared
filesystem, object storage, or a Hub repo id for the model).
"""

from __future__ import annotations

import glob
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import pyarrow as pa

from esci_reranker.fsutil import write_json
from esci_reranker.scale.batch import BatchScorer, rejected_rows

#: Install hint of the optional extra, used in every "Ray is missing" error.
RAY_EXTRA: Final[str] = "pip install 'esci-reranker[ray]'"
#: Input columns that identify a row, tried in this order for the no-loss check.
KEY_CANDIDATES: Final[tuple[tuple[str, ...], ...]] = (("example_id",), ("query_id", "product_id"))
SCORES_DIR: Final[str] = "scores"
REJECTS_DIR: Final[str] = "rejects"
SUMMARY_NAME: Final[str] = "summary.json"
#: Column added while the rows of a list-reading model are grouped into whole-query blocks.
BLOCK_COLUMN: Final[str] = "__esci_block"


class ScaleError(ValueError):
    """Distributed scoring cannot start or its output does not account for every input row."""


@dataclass(frozen=True)
class RayScoreResult:
    """What ``score_with_ray`` did; also written to ``out_dir/summary.json``."""

    input_rows: int
    scored_rows: int
    rejected_rows: int
    scores_dir: str
    rejects_dir: str
    num_actors: int
    key_columns: tuple[str, ...]
    keys_checked: bool
    ray_start_seconds: float
    seconds: float


def with_block_column(batch: pa.Table, key: str, blocks: int) -> pa.Table:
    """``batch`` plus ``BLOCK_COLUMN``: the block (0..blocks-1) of each row's ``key`` value.

    The hash is pandas' fixed one of the value's text, so every worker puts a query in the same
    block (Python's own ``hash`` of a string changes between processes).
    """
    values = np.asarray(batch.column(key).cast(pa.string()).to_pylist(), dtype=object)
    block = pd.util.hash_array(values, categorize=True) % np.uint64(blocks)
    return batch.append_column(BLOCK_COLUMN, pa.array(block.astype(np.int64)))


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or an ImportError that names the extra to install."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise ImportError(
            f"--engine ray needs the 'ray' extra ({error}); install it with: {RAY_EXTRA}"
        ) from None
    return ray


def resolve_inputs(spec: str | Path) -> list[str]:
    """The parquet files of ``spec``: a file, a folder (its ``*.parquet``, recursively) or a glob.

    A URI (``s3://...``, ``gs://...``) is passed through for Ray's filesystems to list.

    Raises:
        FileNotFoundError: nothing matches, or a folder holds no parquet file.
    """
    text = str(spec)
    if "://" in text:
        return [text]
    path = Path(text).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet") if p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: folder holds no .parquet file.")
        return files
    files = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(f"{text}: no such file or folder, and no file matches it as a glob.")
    return files


def _input_schema(paths: Sequence[str]) -> list[str]:
    import pyarrow.parquet as pq

    if "://" in paths[0]:
        return []  # remote: Ray reads the schema later; the column check happens on the workers
    try:
        return list(pq.ParquetFile(paths[0]).schema_arrow.names)
    except Exception as error:  # pyarrow raises several types for a non-parquet file
        raise ScaleError(f"{paths[0]}: not a readable parquet file ({error}).") from None


def _check_columns(reranker: Any, source: str, names: Sequence[str]) -> list[str]:
    """The columns the model reads from an input with ``names``; errors name the file."""
    from esci_reranker.reranker import SCORE_COLUMNS

    clash = [c for c in SCORE_COLUMNS if c in names]
    if clash:
        raise ScaleError(f"{source}: already has column(s) {clash} that scoring writes; drop or rename them.")
    try:
        return list(reranker.input_columns(names))
    except ValueError as error:
        raise ScaleError(f"{source}: {error}") from None


def _local(path: str | Path) -> bool:
    return "://" not in str(path)


def _prepare_output(out_dir: str | Path) -> None:
    if not _local(out_dir):
        return
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # Ray appends to a folder: leftovers of an earlier run would be counted twice.
        raise ScaleError(f"--output {out}: exists and is not an empty folder; choose a new folder.")
    out.mkdir(parents=True, exist_ok=True)


def _check_keys(inputs: Sequence[str], out_dir: Path, keys: Sequence[str]) -> None:
    """Every input key found exactly once in ``scores/`` + ``rejects/`` (local paths only).

    Raises:
        ScaleError: a key is missing from the output or written more than once.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    columns = list(keys)
    given = ds.dataset(list(inputs), format="parquet").to_table(columns=columns)
    written = [
        ds.dataset(str(out_dir / name), format="parquet").to_table(columns=columns)
        for name in (SCORES_DIR, REJECTS_DIR)
        if any((out_dir / name).rglob("*.parquet"))
    ]
    out = pa.concat_tables(written) if written else given.schema.empty_table()
    # Acero on one thread: in a process where Ray has run, its threaded plans can fail with
    # "thread index N is out of range [0, N)" (seen in CI); keys only, so one thread is quick
    given_counts = given.group_by(columns, use_threads=False).aggregate([([], "count_all")])
    if given_counts.num_rows != given.num_rows:
        return  # the input repeats keys itself: the row count check is all that can be said
    out_counts = out.group_by(columns, use_threads=False).aggregate([([], "count_all")])
    repeated = out_counts.filter(pc.greater(out_counts["count_all"], 1)).num_rows
    missing = given_counts.join(out_counts, columns, join_type="left anti", use_threads=False).num_rows
    if repeated or missing:
        raise ScaleError(
            f"output does not match the input keys {columns}: {missing} input key(s) missing, "
            f"{repeated} key(s) written more than once ({out.num_rows:,} rows written for {given.num_rows:,})."
        )


def _count(ray: Any, path: str) -> int:
    if _local(path) and not any(Path(path).rglob("*.parquet")):
        return 0  # Ray writes no file for an empty dataset
    return int(ray.data.read_parquet(path).count())


def score_with_ray(
    model: str,
    input_spec: str | Path,
    out_dir: str | Path,
    *,
    address: str | None = None,
    num_actors: int = 1,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: float = 1.0,
    device: str = "auto",
    batch_size: int = 64,
    precision: str = "fp32",
    backend: str = "torch",
    rows_per_batch: int = 4096,
    progress: bool = True,
) -> RayScoreResult:
    """Score every pair of ``input_spec`` on Ray Data; see the module docstring for the layout.

    Args:
        model: checkpoint folder or Hub repo id, readable by every Ray node.
        input_spec: parquet file, folder, glob or URI with ``query`` and product columns.
        out_dir: a new (or empty) folder, or a URI; gets ``scores/``, ``rejects/``, ``summary.json``.
        address: a running Ray cluster (``ray://host:10001``, ``auto``); None joins
            ``$RAY_ADDRESS`` when it is set, else starts a local Ray.
        num_actors: scoring actors, each holding one ``Reranker``.
        num_gpus_per_actor: GPUs reserved per actor (fractions share a GPU); 0 on CPU.
        num_cpus_per_actor: CPUs reserved per actor; also its torch thread count.
        device, batch_size, precision, backend: per actor, as ``Reranker.from_pretrained``.
        rows_per_batch: rows handed to an actor per call (for a model that reads whole lists, the
            mean of its whole-query blocks).

    Raises:
        ImportError: Ray is not installed (the message names the extra).
        FileNotFoundError: no input.
        ScaleError: a bad option, an unreadable input, a non-empty ``out_dir``, or an output
            that does not account for every input row.
        CheckpointError / ValueError: the model cannot be loaded, or the input lacks columns.
    """
    for name, value in (
        ("num_actors", num_actors),
        ("rows_per_batch", rows_per_batch),
        ("batch_size", batch_size),
    ):
        if value < 1:
            raise ScaleError(f"{name}={value}; expected a positive integer.")
    if num_gpus_per_actor < 0 or num_cpus_per_actor <= 0:
        raise ScaleError(
            f"num_gpus_per_actor={num_gpus_per_actor}, num_cpus_per_actor={num_cpus_per_actor}; "
            "expected GPUs >= 0 and CPUs > 0."
        )
    from esci_reranker.hardware import PRECISIONS

    if precision != "auto" and precision not in PRECISIONS:
        raise ScaleError(f"precision={precision!r}; expected 'auto' or one of {list(PRECISIONS)}.")
    ray = import_ray()
    from esci_reranker.reranker import Reranker, list_column

    started = time.perf_counter()
    inputs = resolve_inputs(input_spec)
    names = _input_schema(inputs)
    # Loaded once here (on the CPU) to fail early on a bad checkpoint and to learn the columns
    # the model reads; the actors load their own copies on their devices.
    probe = Reranker.from_pretrained(model, device="cpu", backend=backend)
    config = probe.config
    if names:  # local input: check its columns before any cluster starts
        _check_columns(probe, inputs[0], names)
    _prepare_output(out_dir)

    own_cluster = not ray.is_initialized()
    ray_started = time.perf_counter()
    if own_cluster:  # else: a cluster the caller started (tests share one per session)
        init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address is None and not os.environ.get("RAY_ADDRESS"):  # ray.init joins $RAY_ADDRESS
            # The actors reserve their CPUs for the whole job; reading and writing are tasks that
            # need a CPU slot too, or the job waits forever. One logical CPU more than the
            # actors take (the I/O tasks are light and share the cores).
            init["num_cpus"] = max(os.cpu_count() or 1, math.ceil(num_actors * num_cpus_per_actor) + 1)
        ray.init(address=address, **init)
    ray_start_seconds = time.perf_counter() - ray_started
    keys: tuple[str, ...] = ()
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        scores_dir = str(Path(out_dir) / SCORES_DIR) if _local(out_dir) else f"{out_dir}/{SCORES_DIR}"
        rejects_dir = str(Path(out_dir) / REJECTS_DIR) if _local(out_dir) else f"{out_dir}/{REJECTS_DIR}"
        dataset = ray.data.read_parquet(inputs)
        names = names or list(dataset.schema().names)
        read_columns = _check_columns(probe, inputs[0], names)
        keys = next((k for k in KEY_CANDIDATES if all(c in names for c in k)), ())
        list_key = list_column(names) if probe.reads_lists else None
        del probe
        input_rows = int(dataset.count())  # from the parquet footers, no data read
        text_args = {
            "read_columns": read_columns,
            "text_fields": config.text_fields,
            "long_field_chars": config.long_field_chars,
        }
        dataset.map_batches(
            rejected_rows, fn_kwargs=text_args, batch_format="pyarrow", batch_size=rows_per_batch
        ).write_parquet(rejects_dir)
        scorer: dict[str, Any] = {
            "fn_constructor_kwargs": {
                "model": model,
                "read_columns": read_columns,
                "device": device,
                "batch_size": batch_size,
                "precision": precision,
                "backend": backend,
                "threads": max(1, int(num_cpus_per_actor)),
            },
            "batch_format": "pyarrow",
            "compute": ray.data.ActorPoolStrategy(size=num_actors),
            "num_cpus": num_cpus_per_actor,
            "num_gpus": num_gpus_per_actor,
        }
        if list_key is None:
            # Blocks of at most rows_per_batch rows, so a single big file still feeds every actor.
            scored_rows = dataset.repartition(target_num_rows_per_block=rows_per_batch).map_batches(
                BatchScorer, batch_size=rows_per_batch, **scorer
            )
        else:
            blocks = max(1, math.ceil(input_rows / rows_per_batch))
            scored_rows = (
                dataset.map_batches(
                    with_block_column, fn_kwargs={"key": list_key, "blocks": blocks}, batch_format="pyarrow"
                )
                .groupby(BLOCK_COLUMN)
                .map_groups(BatchScorer, **scorer)
                .drop_columns([BLOCK_COLUMN])
            )
        scored_rows.write_parquet(scores_dir)
        scored = _count(ray, scores_dir)
        rejected = _count(ray, rejects_dir)
    finally:
        if own_cluster:
            ray.shutdown()
    if scored + rejected != input_rows:
        raise ScaleError(
            f"{scored:,} rows scored + {rejected:,} rejected != {input_rows:,} input rows; "
            f"the output in {out_dir} is incomplete."
        )
    local = _local(out_dir) and all(_local(p) for p in inputs)
    if keys and local:
        _check_keys(inputs, Path(out_dir), keys)
    result = RayScoreResult(
        input_rows=input_rows,
        scored_rows=scored,
        rejected_rows=rejected,
        scores_dir=scores_dir,
        rejects_dir=rejects_dir,
        num_actors=num_actors,
        key_columns=tuple(keys),
        keys_checked=bool(keys) and local,
        ray_start_seconds=ray_start_seconds,
        seconds=time.perf_counter() - started,
    )
    if _local(out_dir):
        write_json(Path(out_dir) / SUMMARY_NAME, asdict(result))
    return result
