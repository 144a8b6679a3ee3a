"""The stacked pipeline (the default config) with 2 CPU processes (torchrun, gloo) on a tiny model.

Checks that every cross-encoder of the stacked recipe (the out-of-fold ones and the final one)
trains data-parallel as one process with the same global batch, that the out-of-fold scoring
shared out over the processes gives the same rows, so the trees come out identical, and that
``pipeline --resume`` keeps the folds a stopped job finished. Each process runs
tests/stack/pipeline_worker.py.

Tolerance: weights equal to 1e-6 (absolute), as tests/train/test_multiprocess.py explains (the
same pairs in each global batch; only float summation order may differ), and the LightGBM text of
the trees byte for byte. ``model.prior_init=fixed``: the prior fit's tower pass shares a process-
wide cache of text embeddings between the trainings of a process, and which batch a text was
first embedded in (so its last float bits) then depends on how the pairs were shared out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from tests.conftest import free_port

TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = Path(__file__).with_name("pipeline_worker.py")
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "multi_task.yaml"
FOLDS = 2
pytestmark = pytest.mark.slow


def _pipeline(out: Path, backbone: Path, processes: int, *extra: str, env: dict[str, str] | None = None):
    """``esci-reranker pipeline`` of the default (stacked) config into ``out`` with the tiny
    backbone in ``processes`` (1 or 2) processes, global batch 32; returns the finished process."""
    sets = (
        f"model.backbone={backbone}",
        "model.max_length=32",
        "model.dropout=0",
        "model.prior_init=fixed",
        "optim.max_steps=3",
        "optim.group_size=8",
        "optim.batch_size=16",
        # global batch 32: 2 accumulated batches in one process, one batch on each of two
        f"optim.grad_accum_steps={3 - processes}",
        f"stack.folds={FOLDS}",
        "stack.max_rounds=20",
        "stack.inner_folds=2",
    )
    command = ["pipeline", "--config", str(CONFIG), "--out", str(out), "--baselines", "none"]
    command += ["--no-index", "--no-progress", *(x for s in sets for x in ("--set", s)), *extra]
    launcher = [sys.executable] if processes == 1 else [
        str(TORCHRUN), "--nproc_per_node", str(processes), "--master_port", str(free_port()),
    ]  # fmt: skip
    variables = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    variables.pop("WORLD_SIZE", None)
    return subprocess.run(
        [*launcher, str(WORKER), str(out.parent / f"{out.name}-record"), *command],
        env=variables,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def _trainings(out: Path, rank: int = 0) -> list[str]:
    return json.loads((out.parent / f"{out.name}-record" / f"trainings-{rank}.json").read_text())


def _models(out: Path) -> list[Path]:
    """The fold models, then the final model, of a pipeline in ``out``."""
    folds = [out / "train" / "folds" / f"fold{k}" / "seed0" / "model" for k in range(FOLDS)]
    return [*folds, out / "model"]


def _max_difference(a: Path, b: Path) -> float:
    left, right = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert left.keys() == right.keys()
    return max(float((left[k] - right[k]).abs().max()) for k in left)


def _assert_same_models_and_trees(a: Path, b: Path) -> None:
    for left, right in zip(_models(a), _models(b), strict=True):
        assert _max_difference(left, right) <= 1e-6, left
    for task in ("ranker", "classifier", "substitute"):
        assert (a / "model" / "stacker" / f"{task}.txt").read_text() == (
            b / "model" / "stacker" / f"{task}.txt"
        ).read_text(), task
    rules = [json.loads((o / "model" / "stacker" / "stacker.json").read_text())["rules"] for o in (a, b)]
    assert rules[0] == rules[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, dropout_free_backbone: Path) -> dict[str, Path]:
    """The same stacked pipeline in one process (2 accumulation steps) and in two;
    each folder's printed output is in ``<folder>-record/stdout.txt``."""
    root = tmp_path_factory.mktemp("stacked-ddp")
    outs = {"one": root / "one", "two": root / "two"}
    for name, processes in (("one", 1), ("two", 2)):
        done = _pipeline(outs[name], dropout_free_backbone, processes)
        assert done.returncode == 0, done.stderr[-4000:]
        (root / f"{name}-record" / "stdout.txt").write_text(done.stdout)
    return outs


def test_two_processes_give_the_fold_models_and_the_stacker_of_one(runs: dict[str, Path]):
    one, two = runs["one"], runs["two"]
    _assert_same_models_and_trees(one, two)
    # the out-of-fold rows, scored in shares by the two processes, are the one-process rows
    oof = [pd.read_parquet(o / "train" / "folds" / "oof.parquet") for o in (one, two)]
    pd.testing.assert_frame_equal(oof[0], oof[1], check_exact=True)
    # every training ran on both processes: the 2 fold models and the final one
    assert len(_trainings(two, 0)) == len(_trainings(two, 1)) == FOLDS + 1
    # the main process alone printed the job (one copy of each table)
    assert (two.parent / "two-record" / "stdout.txt").read_text().count("Test split") == 1
    metrics = [json.loads((o / "model" / "metrics.json").read_text()) for o in (one, two)]
    assert metrics[0]["task1"] == metrics[1]["task1"]


def test_resume_keeps_the_finished_fold_and_ends_as_an_uninterrupted_run(
    runs: dict[str, Path], dropout_free_backbone: Path
):
    cut = runs["two"].parent / "cut"
    # stopped before the second training: fold 0 finished (model, out-of-fold rows, cv.json)
    stopped = _pipeline(cut, dropout_free_backbone, 2, env={"CRASH_AT_TRAINING": "2"})
    assert stopped.returncode != 0
    assert "simulated stop before training 2" in stopped.stderr
    fold0 = _models(cut)[0] / "model.safetensors"
    written = fold0.stat().st_mtime_ns
    assert [r["fold"] for r in json.loads((cut / "train" / "folds" / "cv.json").read_text())["runs"]] == [0]

    resumed = _pipeline(cut, dropout_free_backbone, 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "fold 1/2, seed 0: finished earlier, kept (--resume)" in resumed.stdout
    # fold 0 was not trained again: this job trained fold 1 and the final model only
    for rank in (0, 1):
        assert _trainings(cut, rank) == [str(p) for p in _models(cut)[1:]]
    assert fold0.stat().st_mtime_ns == written
    _assert_same_models_and_trees(runs["two"], cut)
