"""The container files, checked without a Docker engine: key Dockerfile instructions, compose, ignore."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    pairs = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        pairs.append((keyword.upper(), args.strip()))
    return pairs


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions(ROOT / "Dockerfile")


def test_base_image_is_a_pinned_slim_python(dockerfile):
    froms = [args for keyword, args in dockerfile if keyword == "FROM"]
    assert froms == ["python:3.11-slim"]
    for keyword, args in dockerfile:
        assert not re.search(r":latest\b", args), f"{keyword} {args}: no 'latest' tags"


def test_torch_is_installed_from_the_cpu_index_before_the_package(dockerfile):
    runs = [args for keyword, args in dockerfile if keyword == "RUN"]
    torch_step = next(i for i, args in enumerate(runs) if "torch==" in args)
    package_step = next(i for i, args in enumerate(runs) if ".[serve" in args)
    assert torch_step < package_step
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_step]
    assert all("--no-cache-dir" in args for args in runs if "pip install" in args)


def test_image_installs_the_retrieval_extra_for_search(dockerfile):
    # POST /search and the page at / open a catalogue index: sentence-transformers and usearch.
    runs = [args for keyword, args in dockerfile if keyword == "RUN"]
    (package,) = [args for args in runs if ".[serve" in args]
    extras = re.search(r"\.\[([^\]]+)\]", package).group(1).split(",")
    assert {"serve", "retrieval"} <= {e.strip() for e in extras}


def test_runs_as_a_non_root_user(dockerfile):
    users = [(i, args) for i, (keyword, args) in enumerate(dockerfile) if keyword == "USER"]
    assert users, "the image must switch to a non-root USER"
    index, user = users[-1]
    assert user not in {"root", "0", "0:0"}
    last_run = max(i for i, (keyword, _) in enumerate(dockerfile) if keyword == "RUN")
    assert index > last_run, "USER must come after the install steps"


def test_healthcheck_expose_and_cmd(dockerfile):
    health = [args for keyword, args in dockerfile if keyword == "HEALTHCHECK"]
    assert len(health) == 1
    assert "python" in health[0]
    assert "/health" in health[0]
    assert "curl" not in health[0]
    assert ("EXPOSE", "8000") in dockerfile
    cmd = [args for keyword, args in dockerfile if keyword == "CMD"]
    assert cmd == ['["esci-reranker", "serve", "--host", "0.0.0.0", "--port", "8000"]']


def test_compose_serves_the_default_model_with_a_healthcheck():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    (service,) = compose["services"].values()
    assert service["build"] == "."
    assert not str(service.get("image", "")).endswith(":latest")
    assert any(p.endswith(":8000") for p in service["ports"])
    assert service["environment"]["MODEL_PATH"] == "/models/model"
    assert "./runs/default/model:/models/model:ro" in service["volumes"]
    assert any("/ready" in part or "/health" in part for part in service["healthcheck"]["test"])


def test_dockerignore_keeps_the_context_small():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
    assert {".venv", "runs", ".git", "tests"} <= ignored
    assert "src" not in ignored
    assert "pyproject.toml" not in ignored


def test_hadolint_when_available():
    hadolint = shutil.which("hadolint") or (
        str(ROOT / ".venv/bin/hadolint") if (ROOT / ".venv/bin/hadolint").exists() else None
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (see docs/serving.md for how to lint the Dockerfile)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
