"""`score --engine ray` on one shared local Ray: same scores as one process, rejects kept, no row lost."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from esci_reranker.reranker import SCORE_COLUMNS
from esci_reranker.scale.batch import REJECT_COLUMN
from esci_reranker.scale.ray_scoring import (
    RAY_EXTRA,
    REJECTS_DIR,
    SCORES_DIR,
    SUMMARY_NAME,
    ScaleError,
    _check_keys,
    resolve_inputs,
    score_with_ray,
)
from tests.cli.helpers import assert_fails, run
from tests.conftest import SAMPLE_PARQUET

KEY = ["query_id", "product_id"]


def score_ray(model: Path, pairs: Path, out: Path, *options: str):
    """``esci-reranker score --engine ray`` of ``pairs`` into ``out``, with ``options`` after."""
    return run("score", "--engine", "ray", "--model", model, "--input", pairs, "--output", out, *options)


def assert_same_scores(scores: pd.DataFrame, single: pd.DataFrame) -> None:
    """Ray's output has the single-process ``score`` output's columns, types and rows (by key),
    with the same scores within 1e-5 and the same classes."""
    assert list(scores.columns) == list(single.columns)
    assert scores.dtypes.equals(single.dtypes)
    both = single.merge(scores, on=KEY, suffixes=("_one", "_ray"), validate="one_to_one")
    assert len(both) == len(single) == len(scores)  # keyed by ids: nothing lost or duplicated
    for column in ("score", "expected_gain", "substitute_prob"):
        np.testing.assert_allclose(both[f"{column}_ray"], both[f"{column}_one"], atol=1e-5, rtol=0)
    assert (both["esci_pred_ray"] == both["esci_pred_one"]).all()


def test_resolve_inputs_file_folder_glob(tmp_path: Path):
    for name in ("a.parquet", "sub/b.parquet", "sub/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert resolve_inputs(tmp_path / "a.parquet") == [str(tmp_path / "a.parquet")]
    assert resolve_inputs(tmp_path) == [str(tmp_path / "a.parquet"), str(tmp_path / "sub/b.parquet")]
    assert resolve_inputs(f"{tmp_path}/**/*.parquet") == [
        str(tmp_path / "a.parquet"),
        str(tmp_path / "sub/b.parquet"),
    ]
    assert resolve_inputs("s3://bucket/pairs/") == ["s3://bucket/pairs/"]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        resolve_inputs(tmp_path / "missing*.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no \.parquet"):
        resolve_inputs(tmp_path / "empty")


def test_key_check_catches_lost_and_repeated_rows(tmp_path: Path):
    given = pd.DataFrame({"query_id": [1, 1, 2], "product_id": ["a", "b", "a"]})
    given.to_parquet(tmp_path / "in.parquet")
    out = tmp_path / "out"
    (out / SCORES_DIR).mkdir(parents=True)
    given.iloc[[0, 1]].to_parquet(out / SCORES_DIR / "0.parquet")
    given.iloc[[1]].to_parquet(out / SCORES_DIR / "1.parquet")  # b twice, (2, a) missing
    with pytest.raises(ScaleError, match="1 input key\\(s\\) missing, 1 key\\(s\\) written more than once"):
        _check_keys([str(tmp_path / "in.parquet")], out, KEY)
    (out / SCORES_DIR / "1.parquet").unlink()
    (out / REJECTS_DIR).mkdir()
    given.iloc[[2]].to_parquet(out / REJECTS_DIR / "0.parquet")
    _check_keys([str(tmp_path / "in.parquet")], out, KEY)  # every key once: no error


@pytest.fixture(scope="module")
def sample_with_rejects(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole bundled sample as two files, three rows with no query or no product text."""
    frame = pd.read_parquet(SAMPLE_PARQUET)
    frame.loc[10, "query"] = None
    frame.loc[20, ["product_title", "product_brand", "product_color"]] = None
    frame.loc[30, "query"] = " "
    folder = tmp_path_factory.mktemp("pairs")
    half = len(frame) // 2
    frame.iloc[:half].to_parquet(folder / "part-0.parquet", index=False)
    frame.iloc[half:].to_parquet(folder / "part-1.parquet", index=False)
    return folder


@pytest.mark.slow
def test_ray_scores_equal_single_process_and_rejects_are_kept(
    ray_cluster, sample_with_rejects: Path, tiny_checkpoint: Path, tmp_path: Path, score_in_one_process
):
    out = tmp_path / "out"
    result = score_with_ray(
        str(tiny_checkpoint), sample_with_rejects, out, num_actors=2, rows_per_batch=1000, progress=False
    )
    frame = pd.read_parquet(sample_with_rejects)
    assert (result.input_rows, result.scored_rows, result.rejected_rows) == (len(frame), len(frame) - 3, 3)
    assert result.keys_checked
    assert list(result.key_columns) == KEY
    assert json.loads((out / SUMMARY_NAME).read_text())["scored_rows"] == len(frame) - 3

    rejects = pd.read_parquet(out / REJECTS_DIR)
    assert sorted(rejects["product_id"]) == sorted(frame.loc[[10, 20, 30], "product_id"])
    assert rejects[REJECT_COLUMN].str.startswith("missing").all()

    good = frame.drop(index=[10, 20, 30])
    assert_same_scores(pd.read_parquet(out / SCORES_DIR), pd.read_parquet(score_in_one_process(good)))


@pytest.mark.slow
def test_a_stacked_model_scores_whole_lists_on_ray(
    ray_cluster, tiny_stacked_checkpoint: Path, tmp_path: Path, score_in_one_process
):
    # ~20 queries in blocks of ~40 rows: cut by row count, most lists would be split in two and
    # their list features (rank, z-score, gap within the list) would change
    frame = pd.read_parquet(SAMPLE_PARQUET)
    rows = frame[frame["query_id"].isin(frame["query_id"].drop_duplicates().iloc[:20])]
    single = pd.read_parquet(score_in_one_process(rows, tiny_stacked_checkpoint))
    rows.to_parquet(tmp_path / "pairs.parquet", index=False)
    out = tmp_path / "out"
    result = score_with_ray(
        str(tiny_stacked_checkpoint),
        tmp_path / "pairs.parquet",
        out,
        num_actors=2,
        rows_per_batch=40,
        progress=False,
    )
    assert result.scored_rows == len(rows)
    assert_same_scores(pd.read_parquet(out / SCORES_DIR), single)  # the block column is gone too


def test_block_column_puts_a_query_in_one_block_whatever_the_batch():
    import pyarrow as pa

    from esci_reranker.scale.ray_scoring import BLOCK_COLUMN, with_block_column

    ids = pa.table({"query_id": [5, 7, 5, 9, 7, 11]})
    whole = with_block_column(ids, "query_id", 3)[BLOCK_COLUMN].to_pylist()
    parts = [with_block_column(ids.slice(i, 2), "query_id", 3)[BLOCK_COLUMN].to_pylist() for i in (0, 2, 4)]
    assert [b for part in parts for b in part] == whole
    assert whole[0] == whole[2]
    assert whole[1] == whole[4]
    assert set(whole) <= {0, 1, 2}


@pytest.mark.slow
def test_score_command_with_engine_ray(ray_cluster, tiny_checkpoint: Path, tmp_path: Path):
    rows = pd.read_parquet(SAMPLE_PARQUET).iloc[:50]
    rows.to_parquet(tmp_path / "pairs.parquet", index=False)
    out = tmp_path / "scored"
    result = score_ray(
        tiny_checkpoint,
        tmp_path / "pairs.parquet",
        out,
        "--num-actors",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "scored 50 rows, rejected 0 of 50 with 1 Ray actor(s)" in result.output
    table = pq.read_table(out / SCORES_DIR)
    assert table.num_rows == 50
    assert table.schema.names[-len(SCORE_COLUMNS) :] == list(SCORE_COLUMNS)
    # a second run into the same folder would append: refused before anything starts
    again = score_ray(tiny_checkpoint, tmp_path / "pairs.parquet", out)
    assert_fails(again, f"--output {out}", "not an empty folder")


def test_score_engine_ray_errors(tiny_checkpoint: Path, tmp_path: Path):
    pairs = tmp_path / "pairs.parquet"
    pd.read_parquet(SAMPLE_PARQUET).iloc[:5].assign(score=1.0).to_parquet(pairs)
    base = ("score", "--engine", "ray", "--model", tiny_checkpoint, "--output", tmp_path / "o")
    assert_fails(run(*base, "--input", tmp_path / "none*.parquet"), "--input", "no file matches")
    assert_fails(run(*base, "--input", pairs), "already has column(s) ['score']")
    assert_fails(run(*base, "--input", pairs, "--num-actors", "0"), "--num-actors 0")
    assert_fails(run(*base, "--input", pairs, "--precision", "fp16"), "precision='fp16'")
    assert_fails(
        run(
            "score",
            "--engine",
            "spark",
            "--model",
            tiny_checkpoint,
            "--input",
            pairs,
            "--output",
            tmp_path / "o",
        ),
        "--engine 'spark'",
    )
    assert_fails(
        run(*base[:-2], "--output", tmp_path / "o2", "--input", pairs, "--model", tmp_path), "--model"
    )


def test_engine_ray_without_ray_names_the_extra(tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    result = score_ray(tiny_checkpoint, SAMPLE_PARQUET, tmp_path / "o")
    assert_fails(result, "--engine ray needs the 'ray' extra", RAY_EXTRA)
