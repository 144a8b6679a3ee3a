"""The ``esci-reranker`` command line (typer), one module per area.

Each command is a thin shell: it parses options, calls the package's Python API and prints.
Heavy imports (torch, transformers, fastapi) happen inside the commands so ``--help`` is instant.
Importing an area module registers its commands on ``app``; ``--help`` lists them in that order.
"""

from esci_reranker.cli.app import app

# The import order is the order of the commands in --help.
# isort: off
from esci_reranker.cli import data, train, distill, eval, inference, serve, bench, retrieval  # noqa: F401
# isort: on

__all__ = ["app"]
