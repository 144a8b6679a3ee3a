"""Every command's ``--help`` renders, with the docstrings' wrapped lines joined into paragraphs."""

from __future__ import annotations

import re

import pytest
import typer

from esci_reranker.cli import app

from .helpers import run

COMMANDS = sorted(typer.main.get_group(app).commands)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str):
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    assert f"Usage: esci-reranker {command} [OPTIONS]" in result.output
    assert "Traceback" not in result.output


def test_help_reflows_wrapped_docstring_lines(monkeypatch: pytest.MonkeyPatch):
    # Wide enough that no paragraph wraps: a sentence split over two docstring lines must come out whole.
    monkeypatch.setenv("COLUMNS", "400")
    output = run("cv", "--help").output
    assert re.search(r"which gives every Task 1/2/3 metric per ESCI query type", output)
    export = run("export", "--help").output
    # The formats are a list: each starts its own line.
    for fmt in ("hf-classifier:", "st-cross-encoder:", "tei:", "onnx:", "merged:"):
        assert re.search(rf"^\s*\W?\s*{re.escape(fmt)}", export, flags=re.MULTILINE), fmt
