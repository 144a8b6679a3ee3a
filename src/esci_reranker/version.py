"""The package version, on the ground floor so any layer can record it without importing the
package face (``esci_reranker/__init__.py`` hands on ``Reranker``, which builds on most layers)."""

__version__ = "0.1.0"
