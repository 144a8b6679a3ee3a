"""Evaluation commands: ``evaluate``, ``baseline`` and ``inspect``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from esci_reranker.cli.app import app
from esci_reranker.cli.common import (
    DEVICE_HELP,
    MODEL_HELP,
    PRECISION_HELP,
    fail,
    fmt_prob,
    load_reranker,
    print_table,
    require_positive,
)

if TYPE_CHECKING:
    import pandas as pd

    from esci_reranker.eval.runner import EvaluationOptions

_GAINS_HELP = "nDCG gains: esci (E=1,S=.1,C=.01,I=0) or official-script (S and C swapped)."
_RELEVANT_HELP = "Labels relevant for MRR, MAP, Recall@10, P@10: E or E,S."


def _eval_options(
    gains: str,
    relevant: str,
    batch_size: int,
    seeds: int,
    device: str,
    progress: bool,
    baselines: str = "none",
) -> EvaluationOptions:
    """The options shared by `evaluate` and `baseline`, validated before any slow work."""
    from esci_reranker.eval.runner import EvaluationOptions
    from esci_reranker.labels import gain_table

    require_positive(batch_size=batch_size, seeds=seeds)
    options = EvaluationOptions(
        baselines=baselines,
        gains=gains,
        relevant=relevant,
        seeds=seeds,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    try:
        gain_table(gains)
        options.check()
    except ValueError as error:
        fail(str(error))
    return options


@app.command("evaluate")
def evaluate_command(
    model: Annotated[Path, typer.Option("--model", help="Trained checkpoint folder.")],
    data: Annotated[Path, typer.Option("--data", help="Prepared split to score (test.parquet).")],
    out: Annotated[
        Path,
        typer.Option("--out", help="Folder for predictions.parquet, metrics.json, report.md and plots/."),
    ],
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass.")] = 64,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    gains: Annotated[str, typer.Option(help=_GAINS_HELP)] = "esci",
    relevant: Annotated[str, typer.Option(help=_RELEVANT_HELP)] = "E",
    baselines: Annotated[
        str, typer.Option(help="Baselines to compare with: random,bm25,bi-encoder or none.")
    ] = "random,bm25,bi-encoder",
    seeds: Annotated[int, typer.Option(help="Seeds averaged by the random baseline.")] = 10,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    index: Annotated[
        Path | None,
        typer.Option(
            "--index",
            help="A catalogue index (esci-reranker index): also run the split's queries through the "
            "search flow (retrieve --retrieve, rerank, label) and add it to report.md.",
        ),
    ] = None,
    judged: Annotated[
        list[Path] | None,
        typer.Option(
            "--judged",
            help="With --index: every labelled split that says which products are judged for which "
            "queries (the foreign rule's input; repeatable). Default: the train, val and test "
            "parquets beside --data.",
        ),
    ] = None,
    retrieve: Annotated[int, typer.Option(help="With --index: candidates retrieved per query.")] = 100,
    precision: Annotated[
        str, typer.Option(help=PRECISION_HELP + " auto is what serve and pipeline use.")
    ] = "auto",
) -> None:
    """Score a split with a model and the baselines; write predictions, metrics, report and plots.

    With ``--index`` the split's queries also go through the search flow: each retrieves the top
    ``--retrieve`` products of the catalogue, which the model reranks and labels; report.md gets
    the labels of judged, foreign and unjudged results, the end-to-end nDCG@10 and calibration.
    """
    from esci_reranker.eval.runner import read_split, run_evaluation
    from esci_reranker.reranker import reuse_pair_outputs

    options = _eval_options(gains, relevant, batch_size, seeds, device, progress, baselines)
    require_positive(retrieve=retrieve)
    try:
        frame = read_split(data)
        labelled = _judged_splits(data, judged) if index is not None else None
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
        return
    reranker = load_reranker(model, device, batch_size, precision)
    # the search flow finds the judged pairs the evaluation scored
    with reuse_pair_outputs():
        result = run_evaluation(reranker, frame, out, options)
        typer.echo(result.table)
        if index is not None and labelled is not None:
            _evaluate_flow(reranker, index, frame, labelled, out, retrieve)
    typer.echo(f"wrote predictions.parquet, metrics.json, report.md and plots/ to {out}")


def _judged_splits(data: Path, judged: list[Path] | None) -> pd.DataFrame:
    """Every labelled row of ``--judged`` (default: the prepared splits beside ``--data``)."""
    import pandas as pd

    from esci_reranker.eval.runner import read_split

    paths = judged or [
        p for p in (data.parent / f"{n}.parquet" for n in ("train", "val", "test")) if p.is_file()
    ]
    if data not in paths and data.resolve() not in [p.resolve() for p in paths]:
        paths = [*paths, data]
    return pd.concat([read_split(p) for p in paths], ignore_index=True)


def _evaluate_flow(reranker: Any, index: Path, frame: Any, labelled: Any, out: Path, retrieve: int) -> None:
    """``evaluate --index``: the search flow's metrics and report section."""
    try:
        from esci_reranker.retrieval.flow import evaluate_flow
        from esci_reranker.retrieval.index import CatalogueIndex

        opened = CatalogueIndex.open(index)
    except (ImportError, OSError, ValueError) as error:
        fail(f"--index {index}: {error}")
        return
    metrics = evaluate_flow(reranker, opened, frame, labelled, out, retrieve=retrieve)
    m = metrics["overall"]
    typer.echo(
        f"search flow: E share {fmt_prob(m['share_E_all'])} of all results, {fmt_prob(m['share_E_top20'])} of "
        f"the top 20; judged-I recall {fmt_prob(m['judged_I_recall'])}, E precision {fmt_prob(m['E_precision'])}; "
        f"foreign results labelled E {fmt_prob(m['foreign']['share_E'])}, I {fmt_prob(m['foreign']['share_I'])}; "
        f"end-to-end nDCG@10 {m['ndcg@10_e2e']:.4f}"
    )


@app.command("baseline")
def baseline_command(
    name: Annotated[str, typer.Argument(help="random, bm25 or bi-encoder.")],
    data: Annotated[Path, typer.Option("--data", help="Prepared split to score (test.parquet).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for predictions.parquet and metrics.json.")],
    seeds: Annotated[int, typer.Option(help="Seeds averaged by the random baseline.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Texts per batch (bi-encoder).")] = 64,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    gains: Annotated[str, typer.Option(help=_GAINS_HELP)] = "esci",
    relevant: Annotated[str, typer.Option(help=_RELEVANT_HELP)] = "E",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Rank a split with a training-free baseline and write predictions.parquet + metrics.json."""
    from esci_reranker.eval.baselines import BASELINES
    from esci_reranker.eval.report import comparison_table
    from esci_reranker.eval.runner import read_split, save_run

    if name not in BASELINES:
        fail(f"baseline {name!r}: unknown; expected one of {', '.join(BASELINES)}.")
    options = _eval_options(gains, relevant, batch_size, seeds, device, progress)
    try:
        frame = read_split(data)
        result = options.run_baseline(name, frame)
    except (FileNotFoundError, ValueError) as error:
        fail(f"--data {data}: {error}")
        return
    save_run(out, result.run, result.metrics)
    typer.echo(comparison_table(None, {name: result.metrics}))
    typer.echo(f"wrote predictions.parquet and metrics.json to {out}")


@app.command("inspect")
def inspect_command(
    model: Annotated[str, typer.Option("--model", help=MODEL_HELP)],
    data: Annotated[Path, typer.Option("--data", help="Prepared split (test.parquet) with query_id.")],
    query_index: Annotated[
        int | None, typer.Option(help="Which query of the file, by position (0 = first; default).")
    ] = None,
    query_id: Annotated[str | None, typer.Option(help="Which query of the file, by query_id.")] = None,
    query: Annotated[
        str | None, typer.Option(help="Score the candidates against this text instead of the query.")
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="Show only the best K.")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """Show how the model ranks the candidates of one query of a prepared split."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if query_index is not None and query_id is not None:
        fail("give --query-index or --query-id, not both.")
    require_positive(top_k=top_k)
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

    reranker = load_reranker(model, device)
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
            fmt_prob(float(preds.substitute_probs[i])) if multi else "-",
            str(rows["esci_label"].iloc[i]) if "esci_label" in rows.columns else "-",
            str(rows[title_column].iloc[i]) if title_column in rows.columns else "",
        ]
        for rank, i in enumerate(order, start=1)
    ]
    if query is not None:
        typer.echo(f"(query text overridden; the file's query is {file_query!r})")
    print_table(
        f"query_id {qid}: {text!r}",
        ["rank", "product_id", "score", "pred", "P(sub)", "label", "title"],
        rows_out,
    )
    truncated = int(preds.truncated.sum())
    typer.echo(
        f"{len(rows)} candidates, {len(order)} shown"
        + (f"; {truncated} cut to {reranker.config.max_length} tokens" if truncated else "")
    )
