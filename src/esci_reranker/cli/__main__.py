"""``python -m esci_reranker.cli`` (also ``accelerate launch -m esci_reranker.cli train ...``)."""

from esci_reranker.cli import app

app(prog_name="esci-reranker")
