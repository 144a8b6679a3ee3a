"""CLI catalogue-search commands (train-retriever, index, search) through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.cli.helpers import assert_fails, run

pytest.importorskip("usearch", reason="the retrieval extra is not installed")

from tests.retrieval.conftest import build_tiny_retriever, small_catalogue


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_retriever(tmp_path_factory.mktemp("cli-retriever") / "st")


@pytest.fixture
def products(tmp_path: Path) -> Path:
    path = tmp_path / "products.parquet"
    small_catalogue().to_parquet(path, index=False)
    return path


def test_index_build_update_delete_and_search(
    tmp_path: Path, products: Path, retriever: Path, tiny_checkpoint: Path
):
    out = tmp_path / "index"
    built = run(
        "index",
        "--products",
        products,
        "--out",
        out,
        "--retriever",
        retriever,
        "--batch-rows",
        25,
        "--device",
        "cpu",
    )
    assert built.exit_code == 0, built.output
    assert f"built {out}: 82 products" in built.output
    assert json.loads((out / "manifest.json").read_text())["counts"]["products"] == 82

    changes = tmp_path / "changes.parquet"
    pd.DataFrame({"product_id": ["ZZ-1", "NEW-1"], "title": ["Platypod speaker", "Wombat lamp"]}).to_parquet(
        changes
    )
    ids = tmp_path / "ids.txt"
    ids.write_text("ZZ-2\nMISSING\n")
    updated = run("index", "--out", out, "--update", changes, "--delete", ids)
    assert updated.exit_code == 0, updated.output
    assert "1 added, 1 replaced, 1 deleted; not in the index: MISSING" in updated.output

    found = run("search", "--index", out, "--query", "wombat lamp", "--model", tiny_checkpoint, "--json")
    assert found.exit_code == 0, found.output
    hits = [json.loads(line) for line in found.stdout.splitlines()]
    assert len(hits) == 10
    assert all(h["esci_class"] in {"E", "S", "C", "I"} for h in hits)
    # the four class probabilities (E, S, C, I order) the (unstacked) class is the most likely of
    assert all(sum(h["esci_probs"]) == pytest.approx(1.0, abs=1e-4) for h in hits)
    assert all("ESCI"[h["esci_probs"].index(max(h["esci_probs"]))] == h["esci_class"] for h in hits)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert {"ZZ-2"}.isdisjoint(h["product_id"] for h in hits)
    # BM25 alone finds the one product with these words; reranked, it keeps its label.
    only = run(
        "search", "--index", out, "-q", "wombat lamp", "--model", tiny_checkpoint, "--mode", "bm25", "--json"
    )
    assert [json.loads(line)["product_id"] for line in only.stdout.splitlines()] == ["NEW-1"]
    plain = run("search", "--index", out, "-q", "wombat lamp", "--no-rerank", "--mode", "bm25", "--json")
    assert [json.loads(line)["product_id"] for line in plain.stdout.splitlines()] == ["NEW-1"]
    table = run("search", "--index", out, "-q", "platypod", "--model", tiny_checkpoint, "--mode", "bm25")
    assert table.exit_code == 0, table.output
    assert "reranked" in table.output
    assert "ZZ-1" in table.output
    assert "P(E S C I)" in table.output


def test_index_and_search_errors(tmp_path: Path, products: Path, retriever: Path, tiny_checkpoint: Path):
    assert_fails(run("index", "--out", tmp_path / "i"), "exactly one of --products")
    assert_fails(run("index", "--out", tmp_path / "i", "--products", products, "--sample"), "exactly one of")
    assert_fails(
        run("index", "--out", tmp_path / "i", "--products", tmp_path / "nope.parquet"),
        "products file not found",
    )
    assert_fails(run("index", "--out", tmp_path / "i", "--delete", "a"), "no catalogue index here")
    bad_device = ("index", "--out", tmp_path / "i", "--products", products, "--retriever", retriever)
    assert_fails(run(*bad_device, "--device", "gpu0"), "device 'gpu0'")
    assert_fails(run(*bad_device, "--precision", "int8"), "--precision 'int8'", "auto, fp32, bf16")
    if not torch.cuda.is_available():
        assert_fails(run(*bad_device, "--device", "cuda"), "no CUDA GPU")
    assert not (tmp_path / "i").exists()
    out = tmp_path / "index"
    assert run("index", "--products", products, "--out", out, "--retriever", retriever).exit_code == 0
    assert_fails(
        run("index", "--out", out, "--update", products, "--products", products), "Use one or the other"
    )
    other = build_tiny_retriever(tmp_path / "other", seed=3)
    assert_fails(
        run("index", "--out", out, "--delete", "ZZ-1", "--retriever", other), "embeds text differently"
    )
    assert_fails(
        run("search", "--index", out, "-q", "x", "--retriever", other, "--no-rerank"),
        "embeds text differently",
    )
    assert_fails(
        run("search", "--index", out, "-q", "x", "--top-k", 5, "--candidates", 2, "--no-rerank"),
        "candidates=2",
    )
    assert_fails(run("search", "--index", out, "-q", "x", "--model", tmp_path / "no-model"), "--model")


@pytest.mark.slow
def test_train_retriever_saves_a_sentence_transformers_folder(
    tmp_path: Path, small_splits: Path, retriever: Path
):
    from sentence_transformers import SentenceTransformer

    result = run(
        "train-retriever",
        "--config", Path(__file__).resolve().parents[2] / "configs/retriever.yaml",
        "--set", f"data.dir={small_splits}",
        "--set", f"model.base={retriever}",
        "--set", f"output.dir={tmp_path / 'out'}",
        "--set", "optim.max_steps=2",
        "--set", "cv.folds=2",
        "--set", "cv.zscore_weights=[0.5]",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fine-tuned dense (mnrl)" in result.output
    assert "hybrid cosent + bm25, rrf(k=60)" in result.output
    model_dir = tmp_path / "out" / "model"
    meta = json.loads((model_dir / "esci_retrieval.json").read_text())
    assert meta["loss"] in {"mnrl", "cosent"}
    assert meta["fusion"]["method"] in {"rrf", "zscore"}
    assert meta["train_queries"] == 9  # train + val of the small splits; the test split is not read
    cv = json.loads((tmp_path / "out" / "cv.json").read_text())
    assert cv["queries"] == 9
    assert len(cv["per_fold"]) == 2
    embedding = SentenceTransformer(str(model_dir), device="cpu").encode(["wireless earbuds"])
    assert embedding.shape == (1, 32)
    assert_fails(run("train-retriever", "--set", "optim.lr=-1"), "optim.lr")
    assert_fails(run("train-retriever", "--set", "optim.learning_rate=1"), "optim.learning_rate: unknown key")
