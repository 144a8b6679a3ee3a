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


# ---------------------------------------------------------------------------------------------
# train / pipeline
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# evaluation: evaluate, baseline
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# inference: inspect, rerank, score, push, export
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# serving: serve
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# speed: bench
# ---------------------------------------------------------------------------------------------


_ = (Path, Annotated)  # used by the command sections below

if __name__ == "__main__":
    app()
