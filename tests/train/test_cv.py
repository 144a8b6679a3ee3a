"""Cross-validation over query folds."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from esci_reranker.train.config import load_config
from esci_reranker.train.cv import CVResult, FoldResult, _write, cross_validate, query_folds, read_resumable


def test_query_folds_are_disjoint_cover_every_query_and_are_seeded():
    ids = np.repeat(np.arange(10), 3)
    folds = query_folds(ids, 3)
    assert sorted(len(f) for f in folds) == [3, 3, 4]
    assert set().union(*folds) == set(range(10))
    assert sum(len(f) for f in folds) == 10
    assert folds == query_folds(ids, 3)
    assert folds != query_folds(ids, 3, seed=7)


def test_query_folds_reject_too_few_queries_or_folds():
    with pytest.raises(ValueError, match="at least 2"):
        query_folds(np.arange(5), 1)
    with pytest.raises(ValueError, match="3 queries cannot make 4 folds"):
        query_folds(np.arange(3), 4)


def test_cross_validate_trains_each_fold_without_a_test_split(tmp_path, small_splits, tiny_backbone):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train", "val"):  # no test.parquet: cross-validation must not need one
        shutil.copy(small_splits / f"{name}.parquet", data / f"{name}.parquet")
    cfg = load_config(
        None,
        [f"model.backbone={tiny_backbone}", "model.max_length=32", "optim.max_steps=2", "eval.every_steps=1"],
    )
    result = cross_validate(cfg, data, tmp_path / "cv", folds=3, seeds=(0, 1), baselines=("bm25",))
    assert [(r.fold, r.seed) for r in result.runs] == [(f, s) for f in range(3) for s in (0, 1)]
    saved = json.loads((tmp_path / "cv" / "cv.json").read_text())
    summary = saved["summary"]
    assert summary["runs"] == 6
    assert summary["mean"] == pytest.approx(np.mean([r.best_metric for r in result.runs]))
    for run in result.runs:
        assert run.best_metric >= run.start_metric  # the untrained model is the floor
        assert sorted(run.curve) == [0, 1, 2]  # evaluated at the start and after each step
        assert run.start_metric == run.curve[0]
        assert run.end_metric == run.curve[2]
        assert run.best_metric == max(run.curve.values())
    assert summary["end_mean"] == pytest.approx(np.mean([r.end_metric for r in result.runs]))
    assert summary["mean_curve"]["1"] == pytest.approx(np.mean([r.curve[1] for r in result.runs]))
    # BM25 ranked each fold's validation queries: the same numbers as evaluating it directly
    from esci_reranker.eval.baselines import run_baseline
    from esci_reranker.train.loop import read_split

    assert len(saved["baselines_per_fold"]["bm25"]) == 3
    fold0 = read_split(tmp_path / "cv" / "fold0" / "data" / "val.parquet", "val")
    direct = run_baseline("bm25", fold0, text_fields=cfg.model.text_fields).metrics["task1"]["ndcg"]
    assert saved["baselines_per_fold"]["bm25"][0] == pytest.approx(direct)
    assert summary["baselines"]["bm25"] == pytest.approx(np.mean(saved["baselines_per_fold"]["bm25"]))


def test_summary_has_no_untrained_figure_when_no_run_scored_step_0():
    # eval.at_start: false -> the first evaluation is a trained model; it must not pass as the start
    runs = [
        FoldResult(f, 0, best, 10, 10, float("nan"), 1.0, end_metric=best, curve={10: best})
        for f, best in enumerate((0.8, 0.9))
    ]
    summary = CVResult("ndcg", runs).summary()
    assert summary["start_mean"] is None
    assert summary["gain_mean"] is None
    assert summary["mean"] == pytest.approx(0.85)
    runs[0].start_metric, runs[0].curve[0] = 0.7, 0.7  # one run scored its start: only it counts
    summary = CVResult("ndcg", runs).summary()
    assert summary["start_mean"] == pytest.approx(0.7)
    assert summary["gain_mean"] == pytest.approx(0.1)


def test_cross_validate_rejects_an_unknown_baseline(tmp_path, small_splits):
    cfg = load_config(None, [])
    with pytest.raises(ValueError, match="baselines: unknown \\['bm42'\\]"):
        cross_validate(cfg, small_splits, tmp_path / "cv", baselines=("bm42",))


def test_cv_command_prints_the_curve_and_the_baselines(tmp_path, small_splits, tiny_backbone):
    from tests.cli.helpers import assert_fails, run

    args = ["cv", "--data", small_splits, "--out", tmp_path / "cv", "--folds", "2"]
    sets = [
        f"model.backbone={tiny_backbone}",
        "model.stacker=none",  # the cross-encoder's own CV (the stacked one: tests/stack)
        "model.max_length=32",
        "optim.max_steps=1",
        "eval.every_steps=1",
    ]
    for item in sets:
        args += ["--set", item]
    result = run(*args, "--baselines", "bm25")
    assert result.exit_code == 0, result.output
    assert "2 runs: best val ndcg" in result.output
    assert "mean over runs by step: 0: " in result.output
    assert "baseline bm25: 0." in result.output
    assert "bi-encoder" not in result.output
    # every task, overall and per query type, from the fold models' out-of-fold predictions
    assert "| model | nDCG | nDCG@10 | T2 micro-F1 | T2 macro-F1 | T3 micro-F1 | T3 AUC |" in result.output
    assert "| cross_encoder | 0." in result.output
    import pandas as pd

    types = pd.concat([pd.read_parquet(small_splits / f"{n}.parquet") for n in ("train", "val")])
    for qtype in types["esci_query_source"].unique():
        assert f"| {qtype} | cross_encoder | 0." in result.output
    assert (tmp_path / "cv" / "oof.parquet").is_file()
    assert_fails(run(*args, "--baselines", "bm42"), "baselines: unknown ['bm42']")


def test_out_of_fold_cv_with_select_last_scores_the_final_model_once(tmp_path, small_splits, tiny_backbone):
    """With ``oof`` and ``eval.select: last`` the fold's final metric comes from the out-of-fold
    pass (the same model on the same queries); the training does not validate that step too."""
    import pandas as pd

    from esci_reranker.eval.ranking import ranking_metrics
    from esci_reranker.stack.cv import cross_encoder_run

    cfg = load_config(
        None,
        [
            f"model.backbone={tiny_backbone}",
            "model.stacker=none",
            "model.max_length=32",
            "optim.max_steps=2",
            "eval.every_steps=1",
            "eval.select=last",
        ],
    )
    out = tmp_path / "cv"
    result = cross_validate(cfg, small_splits, out, folds=2, baselines=(), oof=True)
    oof = pd.read_parquet(out / "oof.parquet")
    for run in result.runs:
        log = [
            json.loads(line) for line in (out / f"fold{run.fold}" / "seed0" / "train" / "log.jsonl").open()
        ]
        assert [r["step"] for r in log if r["type"] == "val"] == [0, 1]  # not step 2: the OOF pass scores it
        rows = oof[oof["fold"] == run.fold].reset_index(drop=True)
        expected = ranking_metrics(cross_encoder_run(rows))["ndcg"]
        assert run.end_metric == run.best_metric == run.curve[2] == pytest.approx(expected)
        assert sorted(run.curve) == [0, 1, 2]


def test_skipping_the_final_validation_needs_select_last(small_splits, tiny_backbone):
    from esci_reranker.train.loop import train

    cfg = load_config(None, [f"model.backbone={tiny_backbone}", f"data.dir={small_splits}"])
    with pytest.raises(ValueError, match=r"validate_at_end=False needs eval\.select='last'"):
        train(cfg, progress=False, validate_at_end=False)


def test_resume_keeps_finished_runs_and_trains_only_the_rest(
    tmp_path, small_splits, tiny_backbone, monkeypatch
):
    import pandas as pd

    import esci_reranker.train.loop as loop

    sets = [
        f"model.backbone={tiny_backbone}",
        "model.stacker=none",
        "model.max_length=32",
        "optim.max_steps=1",
        "eval.every_steps=1",
        "eval.select=last",
    ]
    cfg = load_config(None, sets)
    out = tmp_path / "cv"
    first = cross_validate(cfg, small_splits, out, folds=2, seeds=(0,), baselines=(), oof=True)
    # an interrupted run: the second fold's result never reached cv.json
    saved = json.loads((out / "cv.json").read_text())
    saved["runs"] = saved["runs"][:1]
    (out / "cv.json").write_text(json.dumps(saved))

    trained: list[tuple[int, str]] = []
    real_train = loop.train

    def counting_train(run_cfg, **kwargs):
        trained.append((run_cfg.seed, run_cfg.output.save_path.parent.parent.name))
        return real_train(run_cfg, **kwargs)

    monkeypatch.setattr(loop, "train", counting_train)
    lines: list[str] = []
    again = cross_validate(
        cfg, small_splits, out, folds=2, seeds=(0, 1), baselines=(), oof=True, resume=True, log=lines.append
    )
    assert trained == [(1, "fold0"), (0, "fold1"), (1, "fold1")]  # fold 0 seed 0 was kept
    assert "fold 1/2, seed 0: finished earlier, kept (--resume)" in lines
    assert [(r.fold, r.seed) for r in again.runs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert again.runs[0].end_metric == first.runs[0].end_metric
    oof = pd.read_parquet(out / "oof.parquet")
    assert sorted(set(zip(oof["fold"], oof["seed"], strict=True))) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert not oof.duplicated(["seed", "query_id", "product_id"]).any()

    other = load_config(None, [*sets[:-3], "optim.max_steps=2", *sets[-2:]])
    with pytest.raises(
        ValueError, match=r"--resume: .*cv\.json was written by a CV with another config_sha256"
    ):
        cross_validate(other, small_splits, out, folds=2, seeds=(0,), baselines=(), oof=True, resume=True)
    with pytest.raises(ValueError, match="another folds"):
        cross_validate(cfg, small_splits, out, folds=3, seeds=(0,), baselines=(), oof=True, resume=True)
    # Fewer --seeds than were run would rewrite cv.json and oof.parquet without seed 1's results.
    with pytest.raises(ValueError, match=r"seed\(s\) 1 that --seeds 0 leaves out.*--seeds 0,1"):
        cross_validate(cfg, small_splits, out, folds=2, seeds=(0,), baselines=(), oof=True, resume=True)
    assert [(r["fold"], r["seed"]) for r in json.loads((out / "cv.json").read_text())["runs"]] == [
        (0, 0), (0, 1), (1, 0), (1, 1)
    ]  # fmt: skip


def test_cv_json_is_strict_json_and_resume_reads_unmeasured_figures_back_as_nan(tmp_path):
    # eval.at_start off: the start is not measured. cv.json must still parse under a strict
    # reader (jq rejects NaN), and --resume must get NaN back, not None, to compute with it.
    runs = [FoldResult(0, 0, 0.8, 10, 10, float("nan"), 1.0, end_metric=0.8, curve={10: 0.8})]
    path = tmp_path / "cv.json"
    _write(path, CVResult("ndcg", runs), {"k": 1})

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    strict = json.loads(path.read_text(), parse_constant=refuse)
    assert strict["runs"][0]["start_metric"] is None
    assert strict["summary"]["start_mean"] is None
    saved = read_resumable(path, {"k": 1}, "CV", seeds=(0,), items="runs")
    assert saved is not None
    back = FoldResult(
        **{**saved["runs"][0], "curve": {int(k): v for k, v in saved["runs"][0]["curve"].items()}}
    )
    assert np.isnan(back.start_metric)
    assert (back.best_metric, back.end_metric, back.curve) == (0.8, 0.8, {10: 0.8})


@pytest.mark.parametrize("command", ["cv", "distill-cv"])
@pytest.mark.parametrize("seeds", ["a,b", "", "0,0", "-1"])
def test_bad_seeds_are_refused_by_name_before_any_work(tmp_path, command, seeds):
    from tests.cli.helpers import assert_fails, run

    extra = [
        "--teacher",
        tmp_path,
        "--config",
        "configs/distill_score.yaml",
        "--oof",
        tmp_path / "oof.parquet",
    ]
    result = run(
        command, *(extra if command == "distill-cv" else []), "--seeds", seeds, "--out", tmp_path / "out"
    )
    assert_fails(result, f"--seeds {seeds!r}: expected distinct integers >= 0")
    assert not (tmp_path / "out").exists()
