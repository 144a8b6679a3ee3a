"""``python -m esci_reranker.bench CHECKPOINT --out bench.json``: the backend benchmark alone."""

from esci_reranker.bench.backends import main

main()
