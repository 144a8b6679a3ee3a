"""Catalogue search commands: ``train-retriever``, ``index`` and ``search``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from esci_reranker.cli.app import app
from esci_reranker.cli.common import (
    DEVICE_HELP,
    PRECISION_HELP,
    SetOption,
    fail,
    fmt_prob,
    print_table,
    require_positive,
)

RETRIEVER_HELP = (
    "The dense retriever: a sentence-transformers folder (train-retriever's OUT/model) or "
    "packaged:all-MiniLM-L6-v2 (zero-shot)."
)


@app.command("train-retriever")
def train_retriever_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML retriever config.")] = Path(
        "configs/retriever.yaml"
    ),
    overrides: SetOption = None,
) -> None:
    """Fine-tune the dense retriever (a sentence-transformers bi-encoder) on train+val queries.

    Cross-validation over the train+val queries compares the losses (MultipleNegativesRankingLoss
    with hard negatives vs CoSENT) and the fusions with BM25 by Recall@N against the train+val
    catalogue; the final model is trained with the best loss and saved to output.dir/model in
    sentence-transformers' format. The test split is never read.
    """
    from esci_reranker.retrieval.config import load_retriever_config
    from esci_reranker.retrieval.train import train_retriever
    from esci_reranker.train import ConfigError

    _quiet_loading()
    try:
        cfg = load_retriever_config(config, tuple(overrides or ()))
        result = train_retriever(cfg, log_fn=typer.echo)
    except (ConfigError, FileNotFoundError, ValueError, ImportError) as err:
        fail(str(err))
        return
    if result.cv is not None:
        ks = sorted(set(cfg.cv.recall_at) | {cfg.cv.candidates})
        rows = [
            [name, *(f"{values[f'recall@{k}']:.4f}" for k in ks)]
            for name, values in result.cv["mean"].items()
        ]
        typer.echo(f"\nmean over {cfg.cv.folds} folds of the held-out queries' Recall@k of E products:")
        width = max(len(r[0]) for r in rows)
        typer.echo(f"{'':{width}}  " + "  ".join(f"R@{k:<5}" for k in ks))
        for row in rows:
            typer.echo(f"{row[0]:{width}}  " + "  ".join(f"{v:7}" for v in row[1:]))
    typer.echo(
        f"\nretriever ({result.loss}, fusion {result.fusion['method']}): {result.model_path}; "
        f"{result.seconds:.0f} s"
    )


def _quiet_loading() -> None:
    """No per-model "Loading weights" progress bars on stderr (errors stay the only stderr line)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _delete_ids(spec: str | None) -> list[str]:
    """``--delete``: comma-separated ids, or a text file with one id per line."""
    if not spec:
        return []
    path = Path(spec)
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [part.strip() for part in spec.split(",") if part.strip()]


@app.command("index")
def index_command(
    out: Annotated[Path, typer.Option("--out", help="The index folder (built, or updated in place).")],
    products: Annotated[
        Path | None,
        typer.Option("--products", help="Parquet of products: product_id and title/brand/color/... columns."),
    ] = None,
    sample: Annotated[
        bool, typer.Option("--sample", help="Index the bundled sample's 6,613 products.")
    ] = False,
    retriever: Annotated[str | None, typer.Option("--retriever", help=RETRIEVER_HELP)] = None,
    update: Annotated[
        Path | None,
        typer.Option("--update", help="Add or replace these products in the index at --out (parquet)."),
    ] = None,
    delete: Annotated[
        str | None,
        typer.Option(
            "--delete", help="Delete these product ids: comma-separated, or a file of one id per line."
        ),
    ] = None,
    fields: Annotated[
        str, typer.Option(help="Product fields BM25 and the retriever read (comma-separated).")
    ] = "title,brand,color",
    store_fields: Annotated[
        str | None,
        typer.Option(
            help="Fields kept for display and reranking (default: the read fields + title,brand,color)."
        ),
    ] = None,
    batch_rows: Annotated[int, typer.Option(help="Products read and embedded per batch.")] = 4096,
    device: Annotated[
        str,
        typer.Option(
            help="Device that embeds the products: auto (a GPU when there is one), cpu, cuda, cuda:N."
        ),
    ] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            help="Precision that embeds the products: auto (bf16 where the device has native bf16, "
            "else fp32), fp32 or bf16. Queries are embedded in fp32 either way."
        ),
    ] = "auto",
) -> None:
    """Build a catalogue index (BM25 + HNSW dense vectors), or update one with --update / --delete.

    Products are read in batches, so the catalogue never sits in memory whole. An update embeds
    only the new or changed products and must use the retriever the index was built with.
    """
    from esci_reranker.retrieval.encoder import EMBEDDING_PRECISIONS, PACKAGED_RETRIEVER, IndexMismatchError
    from esci_reranker.retrieval.index import CatalogueIndex, CatalogueIndexError

    _quiet_loading()
    updating = update is not None or bool(delete)
    require_positive(batch_rows=batch_rows)
    if precision not in EMBEDDING_PRECISIONS:
        fail(f"--precision {precision!r}: expected one of {', '.join(EMBEDDING_PRECISIONS)}.")
    try:
        if updating:
            if products is not None or sample:
                fail(
                    "--products/--sample build a new index; --update/--delete change the one at --out. Use one or the other."
                )
            stats = CatalogueIndex.update(
                out,
                update,
                delete=_delete_ids(delete),
                retriever=retriever,
                batch_rows=batch_rows,
                device=device,
                precision=precision,
            )
            what = (
                f"updated {out}: {stats.added:,} added, {stats.replaced:,} replaced, {stats.deleted:,} deleted"
                + (f"; not in the index: {', '.join(stats.not_found[:10])}" if stats.not_found else "")
            )
        else:
            if (products is None) == (not sample):
                fail(
                    "give exactly one of --products F.parquet or --sample (or --update/--delete to change an index)."
                )
            from esci_reranker.data.sample import sample_path
            from esci_reranker.retrieval.flow import CATALOGUE_FIELDS

            source = products if products is not None else sample_path()
            stats = CatalogueIndex.build(
                source,
                out,
                retriever=retriever or PACKAGED_RETRIEVER,
                fields=fields,
                # the sample is indexed as `make run` indexes it: with every field the stacker reads
                store_fields=store_fields or (CATALOGUE_FIELDS if sample else ()),
                batch_rows=batch_rows,
                source="bundled ESCI sample" if sample else str(products),
                log=None,
                device=device,
                precision=precision,
            )
            what = f"built {out}: {stats.added:,} products"
    except (CatalogueIndexError, IndexMismatchError, FileNotFoundError, ValueError, ImportError) as err:
        fail(str(err))
        return
    skipped = stats.duplicates_skipped + stats.empty_skipped
    if skipped:
        what += f" ({stats.duplicates_skipped:,} repeated ids and {stats.empty_skipped:,} without id or text skipped)"
    times = ", ".join(f"{k} {v:.1f} s" for k, v in stats.seconds.items())
    typer.echo(f"{what}\ntime: {times}")


@app.command("search")
def search_command(
    index: Annotated[Path, typer.Option("--index", help="A catalogue index folder (esci-reranker index).")],
    query: Annotated[str, typer.Option("--query", "-q", help="The search query.")],
    top_k: Annotated[int, typer.Option("--top-k", help="Results to show.")] = 10,
    candidates: Annotated[int, typer.Option(help="Products to retrieve and rerank.")] = 100,
    model: Annotated[
        str, typer.Option("--model", help="The reranker (checkpoint folder or Hub repo id).")
    ] = "runs/default/model",
    rerank: Annotated[
        bool, typer.Option("--rerank/--no-rerank", help="Rerank with --model (off: retrieval order).")
    ] = True,
    mode: Annotated[str, typer.Option(help="Retrievers: hybrid, bm25 or dense.")] = "hybrid",
    retriever: Annotated[
        str | None, typer.Option("--retriever", help="Override the retriever the index names.")
    ] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per result.")] = False,
) -> None:
    """Search a catalogue index: retrieve, rerank, show the top k.

    Retrieves --candidates products (BM25 + dense, fused), reranks them with --model and shows the
    best --top-k with score, E/S/C/I class and its four probabilities, substitute flag and the
    retrievers that found each.
    """
    from dataclasses import asdict

    from esci_reranker.cli.common import load_reranker
    from esci_reranker.retrieval.encoder import IndexMismatchError
    from esci_reranker.retrieval.index import CatalogueIndex, CatalogueIndexError
    from esci_reranker.retrieval.search import Searcher

    _quiet_loading()
    try:
        opened = CatalogueIndex.open(index, retriever=retriever)
    except (CatalogueIndexError, IndexMismatchError, ImportError) as err:
        fail(str(err))
        return
    reranker = load_reranker(model, device, precision=precision) if rerank else None
    try:
        results = Searcher(opened, reranker).search(query, top_k=top_k, candidates=candidates, mode=mode)
    except ValueError as err:
        fail(str(err))
        return
    if as_json:
        for hit in results.hits:
            typer.echo(json.dumps(asdict(hit)))
        return
    rows = [
        [
            str(h.rank),
            h.esci_class or "-",
            " ".join(f"{p:.2f}" for p in h.esci_probs) if h.esci_probs is not None else "-",
            "yes" if h.is_substitute else ("no" if h.is_substitute is not None else "-"),
            fmt_prob(h.score),
            "+".join(h.sources),
            h.product_id,
            " | ".join(x for x in (h.title, h.brand, h.color) if x),
        ]
        for h in results.hits
    ]
    order = "reranked" if results.reranked else "retrieval order"
    t = results.timings_ms
    print_table(
        f"{query!r}: {len(results.hits)} of {results.num_candidates} candidates, {order} "
        f"({t['total']:.0f} ms: retrieval {t['retrieve']:.0f} ms"
        + (f", rerank {t['rerank']:.0f} ms)" if "rerank" in t else ")"),
        ["rank", "class", "P(E S C I)", "subst.", "score", "found by", "product", "title | brand | colour"],
        rows,
    )
