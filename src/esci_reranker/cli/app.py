"""The ``esci-reranker`` typer application; the area modules register their commands on it."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="esci-reranker",
    help="Multi-task ESCI reranker: prepare data, train, evaluate, rerank, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Markdown reflows the docstrings' wrapped lines into paragraphs (rich mode keeps every line break).
    rich_markup_mode="markdown",
)
