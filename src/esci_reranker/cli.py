"""The ``esci-reranker`` command line (typer).

Each command is a thin shell: it parses options, calls the package's Python API and prints.
Heavy imports (torch, transformers, fastapi) happen inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="esci-reranker",
    help="Multi-task ESCI reranker: prepare data, train, evaluate, rerank, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(message: str) -> None:
    """Print ``message`` as an error and exit with status 2 (bad input), without a traceback."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


# ---------------------------------------------------------------------------------------------
# data: prepare
# ---------------------------------------------------------------------------------------------


@app.command("prepare")
def prepare_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for train/val/test.parquet and stats.json.")],
    examples: Annotated[
        Path | None,
        typer.Option(help="Amazon's shopping_queries_dataset_examples.parquet (with --products)."),
    ] = None,
    products: Annotated[
        Path | None,
        typer.Option(help="Amazon's shopping_queries_dataset_products.parquet (with --examples)."),
    ] = None,
    joined: Annotated[
        Path | None,
        typer.Option(help="One file with example and product_* columns (the sample's shape)."),
    ] = None,
    sample: Annotated[
        bool,
        typer.Option("--sample", help="Use the bundled real sample (the default with no input)."),
    ] = False,
    locale: Annotated[str, typer.Option(help="us, es, jp, or all.")] = "us",
    small_version: Annotated[
        bool, typer.Option("--small-version", help="Keep only rows with small_version == 1.")
    ] = False,
    text_fields: Annotated[
        str,
        typer.Option(help="Fields of product_text, in order: title,brand,color,description,bullets."),
    ] = "title,brand,color",
    long_field_chars: Annotated[
        int, typer.Option(help="Character cap of description and bullets in product_text.")
    ] = 500,
    val_frac: Annotated[
        float, typer.Option(help="Share of ESCI train queries moved to val (train/test input).")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the val query draw.")] = 0,
) -> None:
    """Join, clean and split ESCI data by query into train/val/test parquet files plus stats.json."""
    from esci_reranker.data import DataError, PrepareOptions, prepare, sample_path, write_splits

    if sample and (joined or examples or products):
        fail("--sample cannot be combined with --joined, --examples or --products.")
    if not (joined or examples or products):
        joined = sample_path()
    try:
        options = PrepareOptions(
            locale=locale,
            small_version=small_version,
            text_fields=tuple(text_fields.split(",")),
            long_field_chars=long_field_chars,
            val_frac=val_frac,
            seed=seed,
        )
        result = prepare(examples, products, joined=joined, options=options, progress=None)
        paths = write_splits(result, out, progress=None)
    except DataError as error:
        fail(str(error))
        return
    for name, split in result.stats["splits"].items():
        labels = " ".join(f"{label}={n}" for label, n in split["labels"].items())
        typer.echo(f"{name:5s} {split['queries']:>7,} queries {split['rows']:>10,} rows  {labels}")
    dropped = ", ".join(f"{reason}={n:,}" for reason, n in result.stats["dropped"].items())
    typer.echo(f"dropped: {dropped}")
    typer.echo(f"wrote {', '.join(p.name for p in paths.values())} to {out}")


# ---------------------------------------------------------------------------------------------
# train / pipeline
# ---------------------------------------------------------------------------------------------


@app.command("train")
def train_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config.")] = Path(
        "configs/multi_task.yaml"
    ),
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value, e.g. --set optim.lr=5e-5 (repeatable)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last periodic checkpoint.")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Train a reranker from a YAML config (multi-task by default); keeps the best model on val nDCG.

    Runs on CPU, one GPU, or many with `accelerate launch -m esci_reranker.cli train ...`.
    """
    from esci_reranker.train import ConfigError, load_config, train

    try:
        cfg = load_config(config, tuple(overrides or ()))
        result = train(cfg, resume=resume, progress=progress)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        fail(str(err))
        return
    typer.echo(
        f"best val {result.metric_name} {result.best_metric:.4f} at step {result.best_step}/{result.steps}"
        f"{' (early stop)' if result.stopped_early else ''}; model: {result.save_path}; "
        f"{result.seconds:.0f} s"
    )
    if result.test_metrics:
        t1 = result.test_metrics["task1"]
        typer.echo(f"test: nDCG {t1['ndcg']:.4f}  nDCG@10 {t1['ndcg@10']:.4f}  MRR {t1['mrr']:.4f}")


@app.command("cv")
def cv_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config.")] = Path(
        "configs/multi_task.yaml"
    ),
    data: Annotated[
        Path, typer.Option("--data", help="Prepared folder; its train+val queries are folded.")
    ] = Path("runs/default/data"),
    out: Annotated[Path, typer.Option("--out", help="Output folder (cv.json and fold models).")] = Path(
        "runs/cv"
    ),
    folds: Annotated[int, typer.Option(help="Number of query folds.")] = 4,
    seeds: Annotated[str, typer.Option(help="Comma-separated training seeds.")] = "0",
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Config override (repeatable).")
    ] = None,
    baselines: Annotated[
        str,
        typer.Option(help="Baselines ranked on every fold: comma-separated random,bm25,bi-encoder or none."),
    ] = "bm25,bi-encoder",
) -> None:
    """Cross-validate a config over the train+val queries (the test split is never read)."""
    from esci_reranker.eval.baselines import parse_baselines
    from esci_reranker.train import ConfigError, load_config
    from esci_reranker.train.cv import cross_validate

    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
        chosen = parse_baselines(baselines)
        cfg = load_config(config, tuple(overrides or ()))
        result = cross_validate(cfg, data, out, folds=folds, seeds=seed_list, baselines=chosen)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        fail(str(err))
        return
    s = result.summary()
    curve = ", ".join(f"{step}: {value:.4f}" for step, value in s["mean_curve"].items())
    lines = [
        f"{s['runs']} runs: best val {result.metric} {s['mean']:.4f} ± {s['std']:.4f} "
        f"(untrained {s['start_mean']:.4f}; last eval {s['end_mean']:.4f}; "
        f"gain {s['gain_mean']:+.4f} ± {s['gain_std']:.4f})",
        f"mean over runs by step: {curve}",
        *(f"baseline {name}: {value:.4f}" for name, value in s["baselines"].items()),
        f"details: {out / 'cv.json'}",
    ]
    typer.echo("\n".join(lines))


@app.command("pipeline")
def pipeline_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config.")] = Path(
        "configs/multi_task.yaml"
    ),
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/default"),
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Config override (repeatable).")
    ] = None,
    baselines: Annotated[str, typer.Option(help="Comma-separated: random,bm25,bi-encoder or none.")] = (
        "random,bm25,bi-encoder"
    ),
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """The main job: prepare the bundled sample, train, evaluate against baselines, print the table."""
    from esci_reranker.data import DataError
    from esci_reranker.pipeline import run_pipeline
    from esci_reranker.train import ConfigError

    names = tuple(b.strip() for b in baselines.split(",") if b.strip() and b.strip() != "none")
    try:
        result = run_pipeline(config, out, tuple(overrides or ()), names, progress=progress, log=typer.echo)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        fail(str(err))
        return
    typer.echo("\nValidation split (model selection; baselines for reference):\n")
    typer.echo(result.val_table)
    typer.echo("\nTest split (the sample's held-out queries; never used for training or selection):\n")
    typer.echo(result.test_table)
    t = result.seconds
    typer.echo(
        f"\ntime: prepare {t['prepare']:.0f} s, train {t['train']:.0f} s, "
        f"evaluate {t['evaluate_val'] + t['evaluate_test']:.0f} s, total {t['total']:.0f} s"
    )
    typer.echo(f"model: {out / 'model'}   report: {out / 'eval' / 'report.md'}")


# ---------------------------------------------------------------------------------------------
# evaluation: evaluate, baseline
# ---------------------------------------------------------------------------------------------

_GAINS_HELP = "nDCG gains: esci (E=1,S=.1,C=.01,I=0) or official-script (S and C swapped)."
_RELEVANT_HELP = "Labels relevant for MRR, MAP, Recall@10, P@10: E or E,S."
_DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (cuda > mps > cpu)."


def _check_eval_options(gains: str, relevant: str, batch_size: int, seeds: int) -> None:
    """Validate the options shared by `evaluate` and `baseline` before any slow work."""
    from esci_reranker.eval.ranking import parse_relevant
    from esci_reranker.labels import gain_table

    if batch_size < 1:
        fail(f"--batch-size {batch_size}: expected a positive integer.")
    if seeds < 1:
        fail(f"--seeds {seeds}: expected a positive integer.")
    try:
        gain_table(gains)
        parse_relevant(relevant)
    except ValueError as error:
        fail(str(error))


@app.command("evaluate")
def evaluate_command(
    model: Annotated[Path, typer.Option("--model", help="Trained checkpoint folder.")],
    data: Annotated[Path, typer.Option("--data", help="Prepared split to score (test.parquet).")],
    out: Annotated[
        Path,
        typer.Option("--out", help="Folder for predictions.parquet, metrics.json, report.md and plots/."),
    ],
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "auto",
    gains: Annotated[str, typer.Option(help=_GAINS_HELP)] = "esci",
    relevant: Annotated[str, typer.Option(help=_RELEVANT_HELP)] = "E",
    baselines: Annotated[
        str, typer.Option(help="Baselines to compare with: random,bm25,bi-encoder or none.")
    ] = "random,bm25,bi-encoder",
    seeds: Annotated[int, typer.Option(help="Seeds averaged by the random baseline.")] = 10,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Score a split with a model and the baselines; write predictions, metrics, report and plots."""
    from esci_reranker.eval.baselines import parse_baselines
    from esci_reranker.eval.runner import read_split, run_evaluation
    from esci_reranker.reranker import Reranker

    _check_eval_options(gains, relevant, batch_size, seeds)
    try:
        parse_baselines(baselines)
        frame = read_split(data)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
        return
    try:
        reranker = Reranker.from_pretrained(model, device=device, batch_size=batch_size)
    except (OSError, ValueError) as error:  # CheckpointError is a ValueError
        fail(f"--model {model}: {error}")
        return
    result = run_evaluation(
        reranker,
        frame,
        out,
        baselines=baselines,
        gains=gains,
        relevant=relevant,
        seeds=seeds,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    typer.echo(result.table)
    typer.echo(f"wrote predictions.parquet, metrics.json, report.md and plots/ to {out}")


@app.command("baseline")
def baseline_command(
    name: Annotated[str, typer.Argument(help="random, bm25 or bi-encoder.")],
    data: Annotated[Path, typer.Option("--data", help="Prepared split to score (test.parquet).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for predictions.parquet and metrics.json.")],
    seeds: Annotated[int, typer.Option(help="Seeds averaged by the random baseline.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Texts per batch (bi-encoder).")] = 64,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "auto",
    gains: Annotated[str, typer.Option(help=_GAINS_HELP)] = "esci",
    relevant: Annotated[str, typer.Option(help=_RELEVANT_HELP)] = "E",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Rank a split with a training-free baseline and write predictions.parquet + metrics.json."""
    from esci_reranker.eval.baselines import BASELINES, run_baseline
    from esci_reranker.eval.report import comparison_table
    from esci_reranker.eval.runner import read_split, save_run

    if name not in BASELINES:
        fail(f"baseline {name!r}: unknown; expected one of {', '.join(BASELINES)}.")
    _check_eval_options(gains, relevant, batch_size, seeds)
    try:
        frame = read_split(data)
        result = run_baseline(
            name,
            frame,
            gains=gains,
            relevant=relevant,
            seeds=seeds,
            batch_size=batch_size,
            device=device,
            progress=progress,
        )
    except (FileNotFoundError, ValueError) as error:
        fail(f"--data {data}: {error}")
        return
    save_run(out, result.run, result.metrics)
    typer.echo(comparison_table(None, {name: result.metrics}))
    typer.echo(f"wrote predictions.parquet and metrics.json to {out}")


# ---------------------------------------------------------------------------------------------
# inference: inspect, rerank, score, push, export
# ---------------------------------------------------------------------------------------------

_MODEL_HELP = "Checkpoint folder, or a Hugging Face Hub repo id (user/name) to download."
#: `export --format` name -> "module:function" with the signature (model_dir, out_dir, overwrite) -> Path.
#: Imported only when used, so `--help` stays fast and optional extras stay optional.
EXPORT_FORMATS: dict[str, str] = {
    "hf-classifier": "esci_reranker.model.export:export_hf_classifier",
    "st-cross-encoder": "esci_reranker.model.export:export_st_cross_encoder",
    "onnx": "esci_reranker.model.onnx:export_onnx",  # also takes quantize= (--quantize int8)
}
#: Formats whose exporter takes ``quantize=``, and the values `--quantize` accepts for them.
QUANTIZE_FORMATS: dict[str, tuple[str, ...]] = {"onnx": ("int8",)}


_PRECISION_HELP = (
    "Torch arithmetic: fp32; bf16 (autocast); int8 (dynamic int8 linear layers, CPU only, the "
    "fastest on CPUs with AVX-512 VNNI; scores shift slightly); auto = bf16 where native, else fp32."
)


def _load_reranker(
    model: str, device: str, batch_size: int = 64, precision: str = "fp32"
):  # -> Reranker (imported lazily)
    """`Reranker.from_pretrained`, turning a bad folder / repo id / device / precision into a clean error."""
    from esci_reranker.hardware import resolve_precision
    from esci_reranker.reranker import Reranker, select_device

    if batch_size < 1:
        fail(f"--batch-size {batch_size}: expected a positive integer.")
    try:
        target = select_device(device)
    except (RuntimeError, ValueError) as error:
        fail(f"--device {device}: {error}")
    try:
        resolved = resolve_precision(precision, target)
    except ValueError as error:
        fail(f"--precision: {error}")
    try:
        return Reranker.from_pretrained(model, device=device, batch_size=batch_size, precision=resolved)
    except (OSError, ValueError) as error:  # CheckpointError is a ValueError
        fail(f"--model {model}: {error}")
        raise  # unreachable: fail() exits


def _shorten(text: object, width: int = 60) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """Print a rich table on one line per row; the last column (a text) is cut to the width left."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns[:-1])]
    room = min(70, max(12, console.width - sum(widths) - 3 * len(columns) - 1))
    table = Table(title=escape(title), title_justify="left")
    for name in columns[:-1]:
        table.add_column(
            name, justify="right" if name in ("rank", "score", "P(sub)") else "left", no_wrap=True
        )
    table.add_column(columns[-1], no_wrap=True)
    for row in rows:
        # Product titles contain brackets ("[Pack of 2]") that rich would take for markup.
        table.add_row(*(escape(cell) for cell in row[:-1]), escape(_shorten(row[-1], room)))
    console.print(table)


def _fmt_prob(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"


@app.command("inspect")
def inspect_command(
    model: Annotated[str, typer.Option("--model", help=_MODEL_HELP)],
    data: Annotated[Path, typer.Option("--data", help="Prepared split (test.parquet) with query_id.")],
    query_index: Annotated[
        int | None, typer.Option(help="Which query of the file, by position (0 = first; default).")
    ] = None,
    query_id: Annotated[str | None, typer.Option(help="Which query of the file, by query_id.")] = None,
    query: Annotated[
        str | None, typer.Option(help="Score the candidates against this text instead of the query.")
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="Show only the best K.")] = None,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "auto",
) -> None:
    """Show how the model ranks the candidates of one query of a prepared split."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if query_index is not None and query_id is not None:
        fail("give --query-index or --query-id, not both.")
    if top_k is not None and top_k < 1:
        fail(f"--top-k {top_k}: expected a positive integer.")
    if query is not None and not query.strip():
        fail("--query: expected a non-empty text.")
    try:
        names = pq.ParquetFile(data).schema_arrow.names
    except (OSError, pa.ArrowException) as error:
        fail(f"--data {data}: cannot read it as parquet ({error}).")
    missing = [c for c in ("query_id", "query", "product_id") if c not in names]
    if missing:
        fail(f"--data {data}: missing column(s) {missing} (columns: {names}).")
    ids = pc.unique(pq.read_table(data, columns=["query_id"]).column("query_id")).to_pylist()
    if query_id is None:
        index = query_index or 0
        if not 0 <= index < len(ids):
            fail(f"--query-index {index}: {data} has {len(ids)} queries; expected 0..{len(ids) - 1}.")
        qid = ids[index]
    else:
        qid = next((i for i in ids if str(i) == query_id), None)
        if qid is None:
            fail(f"--query-id {query_id}: not in {data} ({len(ids)} queries).")
    rows = pq.read_table(data, filters=[("query_id", "==", qid)]).to_pandas()
    file_query = str(rows["query"].iloc[0])
    text = query if query is not None else file_query
    rows["query"] = text

    reranker = _load_reranker(model, device)
    try:
        preds = reranker.predict_frame(rows, progress=False)
    except ValueError as error:
        fail(f"--data {data}: {error}")
    order = np.argsort(-preds.scores, kind="stable")[: top_k or len(rows)]
    multi = reranker.config.multi_task
    title_column = "product_title" if "product_title" in rows.columns else "product_text"

    rows_out = [
        [
            str(rank),
            str(rows["product_id"].iloc[i]),
            f"{preds.scores[i]:.4f}",
            str(preds.esci_classes[i]) if multi else "-",
            _fmt_prob(float(preds.substitute_probs[i])) if multi else "-",
            str(rows["esci_label"].iloc[i]) if "esci_label" in rows.columns else "-",
            str(rows[title_column].iloc[i]) if title_column in rows.columns else "",
        ]
        for rank, i in enumerate(order, start=1)
    ]
    if query is not None:
        typer.echo(f"(query text overridden; the file's query is {file_query!r})")
    _print_table(
        f"query_id {qid}: {text!r}",
        ["rank", "product_id", "score", "pred", "P(sub)", "label", "title"],
        rows_out,
    )
    truncated = int(preds.truncated.sum())
    typer.echo(
        f"{len(rows)} candidates, {len(order)} shown"
        + (f"; {truncated} cut to {reranker.config.max_length} tokens" if truncated else "")
    )


@app.command("rerank")
def rerank_command(
    model: Annotated[str, typer.Option("--model", help=_MODEL_HELP)],
    query: Annotated[str, typer.Option("--query", help="The search query.")],
    candidates: Annotated[
        Path,
        typer.Option(
            "--candidates",
            help="A .jsonl, .csv or .parquet file: product_id plus text, or product fields "
            "(title, brand, color, description, bullets or the product_* column names).",
        ),
    ],
    top_k: Annotated[int | None, typer.Option(help="Keep only the best K.")] = None,
    output_format: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "auto",
    precision: Annotated[str, typer.Option(help=_PRECISION_HELP)] = "fp32",
) -> None:
    """Rerank the candidates in a file for one query and print them best first."""
    import dataclasses
    import json

    if output_format not in ("table", "json"):
        fail(f"--format {output_format!r}: expected table or json.")
    if top_k is not None and top_k < 1:
        fail(f"--top-k {top_k}: expected a positive integer.")
    if not query.strip():
        fail("--query: expected a non-empty text.")
    from esci_reranker.reranker import read_candidates

    try:
        records = read_candidates(candidates)
    except (OSError, ValueError) as error:
        fail(f"--candidates {error}")
    reranker = _load_reranker(model, device, precision=precision)
    try:
        ranked = reranker.rerank(query, records, top_k=top_k)
    except ValueError as error:
        fail(f"--candidates {candidates}: {error}")
    if output_format == "json":
        typer.echo(json.dumps([dataclasses.asdict(c) for c in ranked], indent=2))
        return
    texts = {str(r["product_id"]): reranker.text_of(r) for r in records}
    rows = [
        [
            str(c.rank),
            c.product_id,
            f"{c.score:.4f}",
            c.esci_class or "-",
            _fmt_prob(c.substitute_prob),
            ("[truncated] " if c.truncated else "") + texts[c.product_id],
        ]
        for c in ranked
    ]
    _print_table(
        f"{query!r}: {len(ranked)} of {len(records)} candidates",
        ["rank", "product_id", "score", "pred", "P(sub)", "text"],
        rows,
    )


@app.command("score")
def score_command(
    model: Annotated[str, typer.Option("--model", help=_MODEL_HELP)],
    input_path: Annotated[
        Path,
        typer.Option(
            "--input",
            help="Parquet with query and product_* columns or product_text; other columns pass through.",
        ),
    ],
    output: Annotated[Path, typer.Option("--output", help="Parquet to write (input + predictions).")],
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass.")] = 64,
    chunk_rows: Annotated[int, typer.Option(help="Rows read, scored and written at a time.")] = 50_000,
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "auto",
    precision: Annotated[str, typer.Option(help=_PRECISION_HELP)] = "fp32",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Score every pair of a parquet file and write it with the model's predictions added.

    Adds score, expected_gain, esci_pred, esci_prob_E/S/C/I, substitute_prob and truncated.
    Streams in chunks, so files of millions of rows fit in memory.
    """
    from esci_reranker.reranker import score_parquet

    if chunk_rows < 1:
        fail(f"--chunk-rows {chunk_rows}: expected a positive integer.")
    if not input_path.is_file():
        fail(f"--input {input_path}: no such file.")
    reranker = _load_reranker(model, device, batch_size, precision)
    try:
        rows = score_parquet(reranker, input_path, output, chunk_rows=chunk_rows, progress=progress)
    except (OSError, ValueError) as error:
        fail(f"--input {input_path}: {error}")
    typer.echo(f"scored {rows:,} rows -> {output}")


@app.command("push")
def push_command(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint folder to upload.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub repo, user/name or org/name.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    commit_message: Annotated[str | None, typer.Option(help="Commit message on the Hub.")] = None,
    token: Annotated[
        str | None, typer.Option(help="Hub token (default: HF_TOKEN or the saved login).")
    ] = None,
) -> None:
    """Upload a checkpoint to the Hugging Face Hub with a generated model card (README.md)."""
    from huggingface_hub.errors import HfHubHTTPError

    from esci_reranker.hub import CARD_NAME, push_to_hub

    try:
        result = push_to_hub(model, repo_id, private=private, commit_message=commit_message, token=token)
    except ValueError as error:  # CheckpointError, bad repo id
        fail(str(error))
    except (HfHubHTTPError, OSError) as error:
        fail(f"upload to {repo_id} failed: {error}")
    card = "generated" if result.card_written else "kept (hand-written)"
    typer.echo(f"{CARD_NAME} {card}; pushed {model} to {result.url}")
    typer.echo(f'load it with: Reranker.from_pretrained("{repo_id}")')


@app.command("export")
def export_command(
    model: Annotated[str, typer.Option("--model", help=_MODEL_HELP)],
    output_format: Annotated[str, typer.Option("--format", help=f"One of: {', '.join(EXPORT_FORMATS)}.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the exported model to.")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it exists and is not empty.")
    ] = False,
    quantize: Annotated[
        str | None,
        typer.Option("--quantize", help="onnx only: int8 (dynamic quantisation, smaller and faster on CPU)."),
    ] = None,
) -> None:
    """Export a checkpoint as a standard model (see docs/inference.md for what each format keeps).

    hf-classifier: transformers AutoModelForSequenceClassification with labels E, S, C, I.
    st-cross-encoder: a sentence-transformers CrossEncoder giving the Task 1 score.
    onnx: the whole model as one ONNX graph for ONNX Runtime (fp32, or int8 with --quantize int8);
    Reranker.from_pretrained loads the folder (see docs/speed.md).
    """
    import importlib

    from esci_reranker.reranker import resolve_checkpoint

    target = EXPORT_FORMATS.get(output_format)
    if target is None:
        fail(f"--format {output_format!r}: expected one of {', '.join(EXPORT_FORMATS)}.")
        return
    options: dict[str, object] = {}
    if quantize is not None:
        allowed = QUANTIZE_FORMATS.get(output_format)
        if allowed is None:
            fail(
                f"--quantize {quantize}: only --format {' or '.join(QUANTIZE_FORMATS)} can be quantized, "
                f"not {output_format}; drop --quantize or use --format onnx."
            )
            return
        if quantize not in allowed:
            fail(f"--quantize {quantize!r}: expected one of {', '.join(allowed)}.")
            return
        options["quantize"] = quantize
    try:
        folder = resolve_checkpoint(model)
        module_name, function_name = target.split(":")
        exporter = getattr(importlib.import_module(module_name), function_name)
        written = exporter(folder, out, overwrite=overwrite, **options)
    except ImportError as error:
        fail(f"--format {output_format}: a dependency is missing ({error}).")
    except (OSError, ValueError) as error:  # CheckpointError and ExportError are ValueErrors
        fail(str(error))
    typer.echo(f"exported {model} as {output_format}{f' ({quantize})' if quantize else ''} to {written}")


# ---------------------------------------------------------------------------------------------
# serving: serve
# ---------------------------------------------------------------------------------------------


@app.command("serve")
def serve_command(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Checkpoint folder or Hugging Face Hub repo id. Default: $MODEL_PATH, then "
            "$HF_MODEL_REPO_ID, then runs/default/model (what `make run` trains).",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 in a container).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Worker processes; each loads its own copy of the model.")
    ] = 1,
) -> None:
    """Serve the reranker over HTTP (FastAPI + uvicorn): /rerank, /classify, /substitute, /predict, /v1/rerank, /health, /ready, /metrics, /info; docs at /docs.

    Other settings come from environment variables (API_KEY, RATE_LIMIT, CACHE_SIZE, MAX_CANDIDATES, LOG_FORMAT, ...): see docs/serving.md.
    """
    import logging
    import os

    try:
        import uvicorn

        from esci_reranker.serve.logs import configure_logging, logging_config
        from esci_reranker.serve.settings import SettingsError, load_settings, looks_like_hub_repo_id
    except ImportError as error:
        fail(f"serve needs the 'serve' extra ({error}); install it with: pip install 'esci-reranker[serve]'")
        return
    try:
        settings = load_settings(**({"model_path": model} if model else {}))
    except SettingsError as error:
        fail(str(error))
        return
    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("esci_reranker.serve")
    source, origin = settings.model_source()
    if origin == "default":
        log.info(
            "no --model, MODEL_PATH or HF_MODEL_REPO_ID given: serving %s, the checkpoint `make run` trains",
            source,
        )
        if not Path(source).is_dir():
            fail(f"no model at {source}: run `make run` first or pass --model DIR (or set MODEL_PATH).")
    elif not Path(source).expanduser().exists() and not looks_like_hub_repo_id(source):
        fail(
            f"--model/{origin} {source!r}: no such folder, and not a Hugging Face Hub repo id ('user/name'). "
            "Pass a checkpoint folder (e.g. runs/default/model) or a Hub repo id."
        )
    log.info("serving %s on http://%s:%d with %d worker(s); docs at /docs", source, host, port, workers)
    uvicorn_options = {
        "host": host,
        "port": port,
        "log_config": logging_config(settings.log_level, settings.log_format),
        "access_log": False,  # the service writes its own access line (with request id)
    }
    if workers == 1:
        from esci_reranker.serve.app import create_app

        uvicorn.run(create_app(settings), **uvicorn_options)  # type: ignore[arg-type]
    else:
        # Workers are separate processes: each builds its app from the environment.
        os.environ["MODEL_PATH"] = source
        uvicorn.run(
            "esci_reranker.serve.app:create_app_from_env",
            factory=True,
            workers=workers,
            **uvicorn_options,  # type: ignore[arg-type]
        )


# ---------------------------------------------------------------------------------------------
# speed: bench
# ---------------------------------------------------------------------------------------------


@app.command("bench")
def bench_command(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint folder (PyTorch weights).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the JSON result.")] = Path("bench.json"),
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass of every backend.")] = 32,
    pairs: Annotated[int, typer.Option(help="Pairs scored per timed round (bundled sample).")] = 512,
    repeats: Annotated[int, typer.Option(help="Timed rounds per backend, interleaved.")] = 3,
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads of every backend and of the server (default: torch's count)."),
    ] = None,
    server: Annotated[
        bool,
        typer.Option(
            "--server/--no-server",
            help="Also measure /rerank p50/p99 through the real server (40 candidates, concurrency "
            "1 and 8, dynamic batching off and on, cache off).",
        ),
    ] = True,
    backends: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated subset of torch_fp32, torch_bf16, torch_int8, onnx_fp32, onnx_int8, "
            "st_cross_encoder (default: all)."
        ),
    ] = None,
    test_queries: Annotated[
        int | None, typer.Option(help="Score only the first N holdout queries for nDCG (default: all).")
    ] = None,
    roofline_size: Annotated[
        int, typer.Option(help="Side of the fp32 matmul that measures the roofline.")
    ] = 2048,
    server_requests: Annotated[int, typer.Option(help="Timed /rerank requests per server setting.")] = 60,
    server_concurrency: Annotated[
        str, typer.Option(help="Comma-separated client concurrency levels.")
    ] = "1,8",
    server_seconds: Annotated[float, typer.Option(help="Time limit per server setting, in seconds.")] = 120.0,
    server_precision: Annotated[
        str,
        typer.Option(help="PRECISION of the server: auto, fp32, bf16 or int8 (int8: lowest CPU latency)."),
    ] = "auto",
) -> None:
    """Benchmark inference speed: pairs/s of each backend vs sentence-transformers, share of the fp32
    roofline, nDCG, and (--server) /rerank latency through the HTTP service. Prints a table, writes JSON.

    Run it on an otherwise idle machine; see docs/speed.md for what each number means.
    """
    for name, value in (("--batch-size", batch_size), ("--pairs", pairs), ("--repeats", repeats)):
        if value < 1:
            fail(f"{name} {value}: expected a positive integer.")
    if threads is not None and threads < 1:
        fail(f"--threads {threads}: expected a positive integer.")
    if not model.is_dir():
        fail(f"--model {model}: no such checkpoint folder.")
    from esci_reranker.bench import BACKENDS, run_backend_bench

    chosen = [b.strip() for b in backends.split(",") if b.strip()] if backends is not None else list(BACKENDS)
    unknown = [b for b in chosen if b not in BACKENDS]
    if unknown or not chosen:
        fail(f"--backends {backends!r}: unknown {unknown}; expected names from {', '.join(BACKENDS)}.")
    hook = None
    if server:
        from esci_reranker.bench_server import ServerLatency

        try:
            levels = tuple(int(c) for c in server_concurrency.split(",") if c.strip())
        except ValueError:
            levels = ()
        if not levels or min(levels) < 1:
            fail(f"--server-concurrency {server_concurrency!r}: expected positive integers such as 1,8.")
        if server_requests < 1:
            fail(f"--server-requests {server_requests}: expected a positive integer.")
        if not server_seconds > 0:
            fail(f"--server-seconds {server_seconds}: expected a positive number of seconds.")
        try:
            hook = ServerLatency(
                concurrency=levels,
                requests=server_requests,
                max_seconds=server_seconds,
                threads=threads,
                precision=server_precision,
                echo=typer.echo,
            )
        except ValueError as err:
            fail(f"--server-precision: {err}")
    try:
        run_backend_bench(
            model,
            out,
            batch_size=batch_size,
            n_pairs=pairs,
            repeats=repeats,
            threads=threads,
            backends=chosen,
            test_queries=test_queries,
            roofline_size=roofline_size,
            server_latency=hook,
            echo=typer.echo,
        )
    except (OSError, ValueError) as error:  # CheckpointError is a ValueError
        fail(f"--model {model}: {error}")
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()
