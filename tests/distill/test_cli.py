"""``esci-reranker distill``, ``distill-cv`` and ``export`` on teachers and students, from the shell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.helpers import assert_fails, run


def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def test_distill_command_writes_a_student_that_exports(
    stacked_teacher: Path, tiny_student_overrides: list[str], tmp_path: Path
):
    from sentence_transformers import CrossEncoder

    out = tmp_path / "student"
    result = run(
        "distill", "--teacher", stacked_teacher, "--config", "configs/distill_score.yaml", "--out", out,
        "--no-progress", *_sets(tiny_student_overrides),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"student-score: {out / 'model'}" in result.output
    assert (out / "distill.json").is_file()
    exported = run("export", "--model", out / "model", "--format", "tei", "--out", tmp_path / "tei")
    assert exported.exit_code == 0, exported.output
    assert CrossEncoder(str(tmp_path / "tei")).predict([("shoes", "red shoes")]).shape == (1,)
    # a stock student as the teacher: there is no encoder of ours to start a student from
    again = run(
        "distill", "--teacher", out / "model", "--config", "configs/distill_score.yaml", "--out", tmp_path / "s2",
        "--no-progress", *_sets(tiny_student_overrides),
    )  # fmt: skip
    # (the teacher's outputs were scored first: its weight-loading progress precedes the error line)
    assert again.exit_code == 2, again.output
    error = again.stderr[again.stderr.index("error: ") :]
    assert "model.init=teacher:" in error
    assert "has no encoder weights of ours" in error
    assert "use model.init=backbone" in error
    assert "Traceback" not in again.stderr


def test_distill_command_takes_retrieved_products_from_the_catalogue(
    stacked_teacher: Path, tiny_student_overrides: list[str], distill_data: Path, tmp_path: Path
):
    import pandas as pd

    pytest.importorskip("usearch", reason="the retrieval extra is not installed")
    from esci_reranker.retrieval.flow import open_or_build_catalogue
    from tests.retrieval.conftest import build_tiny_retriever

    frame = pd.concat([pd.read_parquet(distill_data / f"{s}.parquet") for s in ("train", "val")])
    test_products = frozenset(pd.read_parquet(distill_data / "test.parquet")["product_id"].astype(str))
    catalogue = tmp_path / "catalogue"  # built as make run builds it, with a tiny retriever
    retriever = build_tiny_retriever(tmp_path / "retriever")
    open_or_build_catalogue(frame, catalogue, test_products, retriever=retriever, log=lambda _: None)
    out = tmp_path / "student"
    result = run(
        "distill", "--teacher", stacked_teacher, "--config", "configs/distill_esci.yaml", "--out", out,
        "--catalogue", catalogue, "--no-progress", *_sets(tiny_student_overrides),
        "--set", "data.retrieved_share=0.4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    draws = json.loads((out / "distill.json").read_text())["unlabelled_draws"]
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert draws["retrieved"] == 2 * pairs["query_id"].nunique()  # round(5 * 0.4) a query
    assert not set(pairs["product_id"].astype(str)) & test_products
    # with a catalogue there, the validation queries run through its search flow, labelled by both
    flow = json.loads((out / "distill.json").read_text())["validation_flow"]
    assert flow["reference"] == "teacher"
    assert flow["queries"] == pairs.loc[pairs["split"] == "val", "query_id"].nunique()
    teacher, student = flow["models"]["teacher"], flow["models"]["student"]
    assert teacher["results"] == student["results"] > 0  # the same retrieved lists for both
    assert all(0.0 <= v <= 1.0 for v in flow["agreement"]["student"].values() if v is not None)
    assert json.loads((out / "model" / "distill.json").read_text())["validation_flow"] == flow
    assert "search flow of the" in result.output
    assert "foreign products labelled E" in result.output

    # retrieved products foreign to the query only (catalogue_lists' rule, tested in retrieval)
    foreign = run(
        "distill", "--teacher", stacked_teacher, "--config", "configs/distill_esci.yaml", "--out",
        tmp_path / "foreign", "--catalogue", catalogue, "--no-progress", "--no-flow",
        *_sets(tiny_student_overrides), "--set", "data.retrieved_share=0.4", "--set", "data.retrieved_rule=foreign",
    )  # fmt: skip
    assert foreign.exit_code == 0, foreign.output
    assert "retrieved products (foreign)" in foreign.output
    assert "search flow of the" not in foreign.output
    summary = json.loads((tmp_path / "foreign" / "distill.json").read_text())
    assert "validation_flow" not in summary
    assert 0 < summary["unlabelled_draws"]["retrieved"] <= 2 * pairs["query_id"].nunique()


def test_distill_command_names_a_bad_key_and_a_missing_teacher(
    tiny_student_overrides: list[str], tmp_path: Path
):
    bad_key = run(
        "distill", "--teacher", tmp_path, "--config", "configs/distill_score.yaml", "--out", tmp_path / "o",
        "--set", "loss.rank_weigth=2",
    )  # fmt: skip
    assert_fails(bad_key, "loss.rank_weigth: unknown key")
    missing = run(
        "distill", "--teacher", tmp_path / "nowhere", "--config", "configs/distill_score.yaml",
        "--out", tmp_path / "o", *_sets(tiny_student_overrides),
    )  # fmt: skip
    assert_fails(missing, "no checkpoint at local path")


def test_export_of_the_stacked_teacher_points_to_distill(stacked_teacher: Path, tmp_path: Path):
    for fmt in ("hf-classifier", "st-cross-encoder", "tei", "onnx"):
        result = run("export", "--model", stacked_teacher, "--format", fmt, "--out", tmp_path / fmt)
        assert_fails(
            result, "is a stacked model", "esci-reranker distill --teacher", "configs/distill_score.yaml"
        )
        assert not (tmp_path / fmt).exists()
    onnx = run("export", "--model", stacked_teacher, "--format", "onnx", "--out", tmp_path / "onnx")
    assert_fails(onnx, "the ONNX graph would hold the cross-encoder alone", "pass --cross-encoder-only")
    wrong = run(
        "export", "--model", stacked_teacher, "--format", "tei", "--cross-encoder-only", "--out", tmp_path / "t"
    )  # fmt: skip
    assert_fails(wrong, "--cross-encoder-only: only --format onnx", "not tei; drop the flag")


def test_onnx_export_of_the_stacked_teacher_is_its_first_stage_and_says_so(
    stacked_teacher: Path, tmp_path: Path
):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "first-stage"
    result = run(
        "export", "--model", stacked_teacher, "--format", "onnx", "--cross-encoder-only", "--out", out
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "onnx.json").read_text())["stage"] == "cross-encoder-only"
    assert "first stage of a stacked model only" in (out / "README.md").read_text()


def test_distill_cv_command_prints_student_and_teacher(
    stacked_teacher: Path, oof_parquet: Path, tiny_student_overrides: list[str], tmp_path: Path
):
    out = tmp_path / "cv"
    result = run(
        "distill-cv", "--teacher", stacked_teacher, "--config", "configs/distill_score.yaml", "--oof", oof_parquet,
        "--out", out, "--seeds", "0", "--baselines", "bm25", *_sets(tiny_student_overrides),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| student |" in result.output
    assert "| teacher |" in result.output
    assert "| bm25 |" in result.output
    saved = json.loads((out / "distill_cv.json").read_text())
    assert [(e["fold"], e["seed"]) for e in saved["entries"]] == [(0, 0), (1, 0)]
    assert (out / "teacher_oof.parquet").is_file()
    missing = run("distill-cv", "--teacher", stacked_teacher, "--config", "configs/distill_score.yaml",
                  "--oof", tmp_path / "none.parquet", "--out", out)  # fmt: skip
    assert_fails(missing, "no such file; `esci-reranker cv --out DIR` writes DIR/oof.parquet")


def test_distill_cv_starts_each_folds_student_from_that_folds_cross_encoder(
    stacked_teacher: Path,
    oof_parquet: Path,
    tiny_student_overrides: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    import shutil

    import esci_reranker.distill.student as student_module

    folds = tmp_path / "folds"  # as `esci-reranker cv --out folds` leaves it
    folds.mkdir()
    oof = Path(shutil.copy(oof_parquet, folds / "oof.parquet"))
    args = [
        "distill-cv", "--teacher", stacked_teacher, "--config", "configs/distill_esci.yaml", "--oof", oof,
        "--out", tmp_path / "cv", "--baselines", "none", *_sets(tiny_student_overrides), "--set", "model.init=teacher",
    ]  # fmt: skip
    assert_fails(
        run(*args),
        "each fold's cross-encoder, which cv saves beside --oof",
        "model.init=teacher starts each fold's student from it",
        "data.unlabelled_per_query > 0 scores each fold's unlabelled pairs with it",
        str(folds / "fold0" / "seed0" / "model"),
    )
    for fold in (0, 1):
        shutil.copytree(stacked_teacher, folds / f"fold{fold}" / "seed0" / "model")
    started_from: list[Path] = []
    real = student_module.build_student

    def recording(cfg, text_fields, long_field_chars, teacher_encoder=None):
        started_from.append(teacher_encoder)
        return real(cfg, text_fields, long_field_chars, teacher_encoder)

    monkeypatch.setattr(student_module, "build_student", recording)
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert started_from == [folds / "fold0" / "seed0" / "model", folds / "fold1" / "seed0" / "model"]
    entries = json.loads((tmp_path / "cv" / "distill_cv.json").read_text())["entries"]
    # the shipped esci config labels by the plain argmax of what the student learnt
    assert not any(e["decision_rules"]["fitted"] for e in entries)


def test_distill_cv_resume_trains_only_the_missing_runs(
    stacked_teacher: Path, oof_parquet: Path, tiny_student_overrides: list[str], tmp_path: Path
):
    out = tmp_path / "cv"
    args = [
        "distill-cv", "--teacher", stacked_teacher, "--config", "configs/distill_score.yaml", "--oof", oof_parquet,
        "--out", out, "--seeds", "0", "--baselines", "none", *_sets(tiny_student_overrides),
    ]  # fmt: skip
    assert run(*args).exit_code == 0
    saved = json.loads((out / "distill_cv.json").read_text())
    # An interrupted run: the second fold's entry never got written.
    kept = saved["entries"][0]
    (out / "distill_cv.json").write_text(json.dumps({**saved, "entries": [kept]}))
    resumed = run(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "fold 1/2, seed 0: finished earlier, kept (--resume)" in resumed.output
    assert "fold 2/2, seed 0: student-score on" in resumed.output
    again = json.loads((out / "distill_cv.json").read_text())
    assert again["entries"][0] == kept
    assert [(e["fold"], e["seed"]) for e in again["entries"]] == [(0, 0), (1, 0)]
    # Another config must not be mixed with these runs.
    other = run(*args, "--set", "optim.lr=1e-3", "--resume")
    assert_fails(other, "--resume:", "another config_sha256", "run without --resume")
    # Resuming with seeds that leave out seed 0 would rewrite distill_cv.json without its entries.
    fewer_args = list(args)
    fewer_args[fewer_args.index("--seeds") + 1] = "1"
    fewer = run(*fewer_args, "--resume")
    assert_fails(fewer, "--resume:", "seed(s) 0 that --seeds 1 leaves out", "pass --seeds 0,1")
    assert json.loads((out / "distill_cv.json").read_text())["entries"] == again["entries"]
