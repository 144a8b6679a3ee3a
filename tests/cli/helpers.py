"""Helpers for tests that drive the `esci-reranker` CLI through typer's CliRunner."""

from __future__ import annotations

from typer.testing import CliRunner, Result

from esci_reranker.cli import app

runner = CliRunner()


def run(*args: object) -> Result:
    """Invoke the CLI with ``args`` (converted to strings)."""
    return runner.invoke(app, [str(a) for a in args])


def assert_fails(result: Result, *fragments: str) -> None:
    """Exit 2 with an ``error:`` line naming each fragment, and no traceback."""
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in result.stderr
    assert "Traceback" not in result.output
