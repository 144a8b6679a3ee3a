"""CLI inference commands (inspect, rerank, score, push, export) through typer's CliRunner."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from esci_reranker.cli.inference import EXPORT_FORMATS
from esci_reranker.data.text import product_texts
from esci_reranker.model import save_checkpoint
from esci_reranker.reranker import SCORE_COLUMNS, Reranker
from tests.cli.helpers import assert_fails, run
from tests.conftest import SAMPLE_PARQUET, build_tiny_model


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    frame = pd.read_parquet(SAMPLE_PARQUET)
    qids = frame["query_id"].drop_duplicates().iloc[:3]
    frame = frame[frame["query_id"].isin(qids)].reset_index(drop=True)
    return frame.assign(product_text=product_texts(frame))


@pytest.fixture(scope="module")
def split_file(sample: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "test.parquet"
    sample.drop(columns=["split", "source"]).to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def reranker(tiny_checkpoint: Path) -> Reranker:
    return Reranker.from_pretrained(tiny_checkpoint, device="cpu")


# --- inspect ------------------------------------------------------------------------------------------


def test_inspect_shows_one_query_ranked(
    tiny_checkpoint: Path, split_file: Path, sample: pd.DataFrame, reranker
):
    qid = sample["query_id"].unique()[1]
    rows = sample[sample["query_id"] == qid]
    result = run(
        "inspect", "--model", tiny_checkpoint, "--data", split_file, "--query-index", 1, "--top-k", 3
    )
    assert result.exit_code == 0, result.output
    assert f"query_id {qid}" in result.stdout
    for header in ("rank", "product_id", "score", "pred", "P(sub)", "label", "title"):
        assert header in result.stdout
    best = rows.iloc[np.argsort(-reranker.predict_frame(rows, progress=False).scores, kind="stable")[:3]]
    for pid in best["product_id"]:
        assert pid in result.stdout
    assert f"{len(rows)} candidates, 3 shown" in result.stdout

    by_id = run("inspect", "--model", tiny_checkpoint, "--data", split_file, "--query-id", qid, "--top-k", 3)
    assert by_id.exit_code == 0
    assert by_id.stdout == result.stdout


def test_inspect_query_override(tiny_checkpoint: Path, split_file: Path, sample: pd.DataFrame):
    result = run("inspect", "--model", tiny_checkpoint, "--data", split_file, "--query", "[brand] new text")
    assert result.exit_code == 0, result.output
    assert "'[brand] new text'" in result.stdout  # brackets are not eaten as rich markup
    assert f"the file's query is {sample['query'].iloc[0]!r}" in result.stdout


def test_inspect_errors(tiny_checkpoint: Path, split_file: Path, tmp_path: Path):
    base = ("inspect", "--model", tiny_checkpoint, "--data", split_file)
    assert_fails(run(*base, "--query-index", 1, "--query-id", 5), "not both")
    assert_fails(run(*base, "--query-index", 3), "--query-index 3", "has 3 queries; expected 0..2")
    assert_fails(run(*base, "--query-id", "nope"), "--query-id nope: not in")
    assert_fails(run(*base, "--top-k", 0), "--top-k 0")
    assert_fails(
        run("inspect", "--model", tiny_checkpoint, "--data", tmp_path / "x.parquet"), "cannot read it"
    )
    no_qid = tmp_path / "no_qid.parquet"
    pd.DataFrame({"query": ["a"], "product_id": ["b"]}).to_parquet(no_qid)
    assert_fails(
        run("inspect", "--model", tiny_checkpoint, "--data", no_qid), "missing column(s) ['query_id']"
    )
    assert_fails(
        run("inspect", "--model", tmp_path / "a" / "b" / "c", "--data", split_file), "--model", "Hub"
    )


# --- rerank -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def candidates(sample: pd.DataFrame) -> pd.DataFrame:
    rows = sample[sample["query_id"] == sample["query_id"].iloc[0]].head(6)
    return rows[["product_id", "product_title", "product_brand", "product_color"]].reset_index(drop=True)


def write_candidates(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict(orient="records")))
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_rerank_file_formats_give_the_api_result(
    suffix: str, tiny_checkpoint: Path, candidates: pd.DataFrame, reranker: Reranker, tmp_path: Path
):
    path = write_candidates(candidates, tmp_path / f"candidates{suffix}")
    result = run(
        "rerank", "--model", tiny_checkpoint, "--query", "silicone", "--candidates", path,
        "--top-k", 4, "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ranked = json.loads(result.stdout)
    expected = reranker.rerank("silicone", candidates.to_dict(orient="records"), top_k=4)
    assert [r["product_id"] for r in ranked] == [c.product_id for c in expected]
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["score"] for r in ranked], [c.score for c in expected], atol=1e-5)
    assert set(ranked[0]) == {
        "product_id",
        "score",
        "esci_class",
        "esci_probs",
        "substitute_prob",
        "rank",
        "truncated",
        "is_substitute",
    }
    # the model's decision rule (0.5 without a stacker) comes with the probability
    assert [r["is_substitute"] for r in ranked] == [r["substitute_prob"] >= 0.5 for r in ranked]


def test_rerank_table_and_text_candidates(tiny_checkpoint: Path, tmp_path: Path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"product_id": "a", "text": "red shoe [size 9]"}\n\n{"product_id": 7, "title": "sock"}\n'
    )
    result = run("rerank", "--model", tiny_checkpoint, "--query", "shoe", "--candidates", path)
    assert result.exit_code == 0, result.output
    assert "2 of 2 candidates" in result.stdout
    assert "red shoe [size 9]" in result.stdout
    assert "sock" in result.stdout


def test_rerank_errors(tiny_checkpoint: Path, tmp_path: Path):
    def rerank(path: Path, *extra: object):
        return run("rerank", "--model", tiny_checkpoint, "--query", "shoe", "--candidates", path, *extra)

    good = tmp_path / "good.jsonl"
    good.write_text('{"product_id": "a", "text": "shoe"}\n')
    assert_fails(rerank(tmp_path / "missing.jsonl"), "missing.jsonl: no such candidates file")
    (tmp_path / "c.txt").write_text("a,b\n")
    assert_fails(rerank(tmp_path / "c.txt"), "unknown extension '.txt'", ".jsonl, .ndjson, .csv, .parquet")
    (tmp_path / "no_id.csv").write_text("id,title\n1,shoe\n")
    assert_fails(rerank(tmp_path / "no_id.csv"), "no 'product_id' column", "['id', 'title']")
    (tmp_path / "bad.jsonl").write_text('{"product_id": "a", "text": "x"}\n{oops\n')
    assert_fails(rerank(tmp_path / "bad.jsonl"), "bad.jsonl, line 2: not valid JSON")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    assert_fails(rerank(tmp_path / "list.jsonl"), "line 1: expected a JSON object, got list")
    (tmp_path / "no_pid.jsonl").write_text('{"text": "x"}\n')
    assert_fails(rerank(tmp_path / "no_pid.jsonl"), "line 1: no 'product_id'")
    (tmp_path / "empty.csv").write_text("product_id,title\na,shoe\nb,\n")
    assert_fails(rerank(tmp_path / "empty.csv"), "candidate 1 (product_id 'b'): empty product text")
    (tmp_path / "dup.csv").write_text("product_id,title\na,shoe\na,boot\n")
    assert_fails(rerank(tmp_path / "dup.csv"), "duplicate product_id 'a'")
    assert_fails(rerank(good, "--format", "xml"), "--format 'xml'")
    assert_fails(rerank(good, "--top-k", 0), "--top-k 0")
    assert_fails(rerank(good, "--precision", "fp16"), "--precision", "precision='fp16'", "'int8'")
    assert_fails(rerank(good, "--device", "tpu"), "--device tpu")


def test_rerank_and_score_in_int8_rank_like_fp32(tiny_prior_checkpoint: Path, tmp_path: Path):
    from esci_reranker.model.cpu import int8_available

    if not int8_available():
        pytest.skip("torch without dynamic int8 linear layers")
    lines = [
        f'{{"product_id": "p{i}", "text": "{t}"}}'
        for i, t in enumerate(["red shoe", "blue sock", "shoe box"])
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    ranked = {}
    for precision in ("fp32", "int8"):
        result = run(
            "rerank", "--model", tiny_prior_checkpoint, "--query", "red shoe", "--candidates",
            tmp_path / "c.jsonl", "--format", "json", "--precision", precision,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        ranked[precision] = json.loads(result.stdout)
    assert [r["product_id"] for r in ranked["int8"]] == [r["product_id"] for r in ranked["fp32"]]
    scores = [(a["score"], b["score"]) for a, b in zip(ranked["fp32"], ranked["int8"], strict=True)]
    assert all(abs(a - b) < 0.05 for a, b in scores)
    pd.DataFrame(
        {"query": ["red shoe"] * 3, "product_text": ["red shoe", "blue sock", "shoe box"]}
    ).to_parquet(tmp_path / "pairs.parquet")
    out = tmp_path / "scored.parquet"
    result = run("score", "--model", tiny_prior_checkpoint, "--input", tmp_path / "pairs.parquet", "--output", out,
                 "--precision", "int8", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(out)["score"]) == 3


# --- score --------------------------------------------------------------------------------------------


def test_score_streams_a_file_and_passes_columns_through(
    tiny_checkpoint: Path, sample: pd.DataFrame, reranker: Reranker, tmp_path: Path
):
    pairs = sample[
        ["query_id", "product_id", "esci_label", "query", "product_title", "product_brand", "product_color"]
    ]
    pairs.to_parquet(tmp_path / "pairs.parquet", index=False)
    out = tmp_path / "out" / "scored.parquet"
    result = run(
        "score", "--model", tiny_checkpoint, "--input", tmp_path / "pairs.parquet", "--output", out,
        "--batch-size", 8, "--chunk-rows", 17, "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"scored {len(pairs):,} rows" in result.stdout
    assert pq.ParquetFile(out).metadata.num_row_groups > 1  # really written in chunks

    scored = pd.read_parquet(out)
    assert list(scored.columns) == [*pairs.columns, *SCORE_COLUMNS]
    pd.testing.assert_frame_equal(scored[pairs.columns], pairs)
    expected = reranker.predict_frame(pairs, progress=False)
    np.testing.assert_allclose(scored["score"], expected.scores, atol=1e-5)
    np.testing.assert_allclose(scored["expected_gain"], expected.expected_gains, atol=1e-5)
    probs = scored[["esci_prob_E", "esci_prob_S", "esci_prob_C", "esci_prob_I"]].to_numpy()
    np.testing.assert_allclose(probs, expected.esci_probs, atol=1e-5)
    assert scored["esci_pred"].tolist() == expected.esci_classes.tolist()
    np.testing.assert_allclose(scored["substitute_prob"], expected.substitute_probs, atol=1e-5)
    assert scored["truncated"].dtype == bool
    assert sorted(p.name for p in out.parent.iterdir()) == ["scored.parquet"]  # no temp file left


def test_score_product_text_input_and_single_task(
    tiny_single_task_checkpoint: Path, sample: pd.DataFrame, tmp_path: Path
):
    pairs = sample[["query", "product_text"]].head(10)
    pairs.to_parquet(tmp_path / "pairs.parquet", index=False)
    out = tmp_path / "scored.parquet"
    result = run(
        "score", "--model", tiny_single_task_checkpoint, "--input", tmp_path / "pairs.parquet",
        "--output", out, "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    scored = pd.read_parquet(out)
    assert (scored["esci_pred"] == "").all()
    assert scored["esci_prob_E"].isna().all()
    assert scored["substitute_prob"].isna().all()
    assert scored["score"].notna().all()


def test_score_empty_input_writes_the_full_schema(tiny_checkpoint: Path, tmp_path: Path):
    pd.DataFrame({"query": pd.Series([], dtype=str), "product_text": pd.Series([], dtype=str)}).to_parquet(
        tmp_path / "empty.parquet", index=False
    )
    out = tmp_path / "scored.parquet"
    result = run("score", "--model", tiny_checkpoint, "--input", tmp_path / "empty.parquet", "--output", out)
    assert result.exit_code == 0, result.output
    assert list(pd.read_parquet(out).columns) == ["query", "product_text", *SCORE_COLUMNS]


def test_score_errors(tiny_checkpoint: Path, tmp_path: Path):
    def score(path: Path, *extra: object):
        return run(
            "score", "--model", tiny_checkpoint, "--input", path, "--output", tmp_path / "o.parquet", *extra
        )

    assert_fails(score(tmp_path / "missing.parquet"), "missing.parquet: no such file")
    pd.DataFrame({"product_text": ["a"]}).to_parquet(tmp_path / "no_query.parquet")
    assert_fails(score(tmp_path / "no_query.parquet"), "no 'query' column")
    pd.DataFrame({"query": ["a"], "product_id": ["b"]}).to_parquet(tmp_path / "no_text.parquet")
    assert_fails(score(tmp_path / "no_text.parquet"), "neither product columns", "product_text")
    pd.DataFrame({"query": ["a"], "product_text": ["b"], "score": [1.0]}).to_parquet(
        tmp_path / "clash.parquet"
    )
    assert_fails(score(tmp_path / "clash.parquet"), "already has column(s) ['score']")
    (tmp_path / "text.parquet").write_text("not parquet")
    assert_fails(score(tmp_path / "text.parquet"), "not a readable parquet file")
    assert_fails(score(tmp_path / "clash.parquet", "--chunk-rows", 0), "--chunk-rows 0")
    assert not (tmp_path / "o.parquet").exists()


# --- push ---------------------------------------------------------------------------------------------


def test_push_command_uploads_with_card(tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}
    monkeypatch.setattr(
        HfApi,
        "create_repo",
        lambda self, repo_id, **kw: calls.update(create=(repo_id, kw)) or f"https://huggingface.co/{repo_id}",
    )
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.update(upload=kw))
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "model")

    result = run("push", "--model", folder, "--repo-id", "alice/tiny", "--private", "--commit-message", "v1")
    assert result.exit_code == 0, result.output
    assert calls["create"][0] == "alice/tiny"
    assert calls["create"][1]["private"] is True
    assert Path(calls["upload"]["folder_path"]) == folder
    assert calls["upload"]["commit_message"] == "v1"
    assert 'Reranker.from_pretrained("alice/tiny")' in (folder / "README.md").read_text()
    assert "https://huggingface.co/alice/tiny" in result.stdout

    assert_fails(
        run("push", "--model", tmp_path / "nope", "--repo-id", "alice/tiny"), "no such checkpoint folder"
    )
    assert_fails(run("push", "--model", folder, "--repo-id", "bad id!"), "repo id 'bad id!' is not valid")


def test_push_command_reports_hub_errors(tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    from huggingface_hub import HfApi

    def refuse(self, repo_id, **kw):
        raise OSError("401 Unauthorized: invalid token")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    assert_fails(
        run("push", "--model", folder, "--repo-id", "alice/tiny"), "upload to alice/tiny failed", "401"
    )


# --- export -------------------------------------------------------------------------------------------


def test_export_command_dispatches_formats(tiny_checkpoint: Path, tmp_path: Path):
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = build_tiny_model(pooling="cls", head_hidden=32)
    source = save_checkpoint(model, tokenizer, tmp_path / "exportable")
    assert set(EXPORT_FORMATS) >= {"hf-classifier", "st-cross-encoder"}

    result = run("export", "--model", source, "--format", "hf-classifier", "--out", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").config.num_labels == 4

    again = run("export", "--model", source, "--format", "hf-classifier", "--out", tmp_path / "hf")
    assert_fails(again, "already exists and is not empty; pass --overwrite")
    overwrite = (
        "export",
        "--model",
        source,
        "--format",
        "st-cross-encoder",
        "--out",
        tmp_path / "hf",
        "--overwrite",
    )
    assert run(*overwrite).exit_code == 0

    assert_fails(
        run("export", "--model", source, "--format", "tflite", "--out", tmp_path / "x"), "--format 'tflite'"
    )
    assert_fails(
        run("export", "--model", tiny_checkpoint, "--format", "hf-classifier", "--out", tmp_path / "x"),
        "model.pooling='mean'",
        "--set model.pooling=cls",
    )
    assert_fails(
        run(
            "export",
            "--model",
            tmp_path / "a" / "b" / "c",
            "--format",
            "hf-classifier",
            "--out",
            tmp_path / "x",
        ),
        "no checkpoint at local path",
    )
