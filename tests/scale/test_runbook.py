"""docs/scale.md runs: every ```bash runbook block, in order, at tiny scale, so the runbook cannot rot.

The ```bash runbook-env block of the doc is replaced by small values: raw ESCI files made from
the bundled sample (a few queries), a tiny random encoder, 2 CPU training processes, 2 Ray
actors on the local Ray that `score --engine ray` starts, as for a user without a cluster.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from esci_reranker.data.io import EXAMPLE_COLUMNS, PRODUCTS_COLUMNS
from tests.conftest import SAMPLE_PARQUET

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "scale.md"
pytestmark = pytest.mark.slow


def runbook_blocks(text: str, marker: str) -> list[str]:
    """The bodies of the fenced blocks whose info string is exactly ``bash <marker>``."""
    return re.findall(rf"^```bash {re.escape(marker)}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def raw_esci_files(folder: Path, train_queries: int = 8, test_queries: int = 3) -> Path:
    """Amazon's two raw files (their names and columns) holding a few of the sample's queries."""
    frame = pd.read_parquet(SAMPLE_PARQUET)
    seen = frame.drop_duplicates("query_id")
    train_ids = seen.loc[seen["split"] != "holdout", "query_id"].iloc[:train_queries]
    test_ids = seen.loc[seen["split"] == "holdout", "query_id"].iloc[:test_queries]
    frame = frame[frame["query_id"].isin([*train_ids, *test_ids])].reset_index(drop=True)
    frame["split"] = frame["split"].map({"train": "train", "dev": "train", "holdout": "test"})
    examples = frame[list(EXAMPLE_COLUMNS)].assign(
        example_id=range(len(frame)), small_version=1, large_version=1
    )
    folder.mkdir(parents=True)
    examples.to_parquet(folder / "shopping_queries_dataset_examples.parquet", index=False)
    products = frame[list(PRODUCTS_COLUMNS)].drop_duplicates(["product_id", "product_locale"])
    products.to_parquet(folder / "shopping_queries_dataset_products.parquet", index=False)
    return folder


def test_the_blocks_are_found_and_the_settings_match():
    text = RUNBOOK.read_text()
    [settings] = runbook_blocks(text, "runbook-env")
    names = re.findall(r"^([A-Z_]+)=", settings, flags=re.MULTILINE)
    assert names == ["ESCI", "RUN", "NPROC", "TRAIN_SETS", "DISTILL_SETS", "ACTORS", "GPUS_PER_ACTOR"]
    commands = "\n".join(runbook_blocks(text, "runbook"))
    for command in (
        "esci-reranker prepare",
        "torchrun",
        "--set output.save_path=$RUN/stacked",
        "--resume",
        "esci-reranker evaluate",
        "esci-reranker distill --teacher $RUN/stacked",
        "esci-reranker export",
        "--engine ray --model $RUN/stacked",
    ):
        assert command in commands


def test_runbook_commands_run_at_tiny_scale(tmp_path: Path, tiny_backbone: Path):
    pytest.importorskip("ray")
    text = RUNBOOK.read_text()
    run = tmp_path / "run"
    settings = {
        "ESCI": raw_esci_files(tmp_path / "esci"),
        "RUN": run,
        "NPROC": 2,
        # the stacked default's folds and trees made small for a few queries (ignored by the
        # cross-encoder alone)
        "TRAIN_SETS": f"--set model.backbone={tiny_backbone} --set model.max_length=32 "
        "--set optim.max_steps=2 --set eval.every_steps=1 --set stack.folds=2 --set stack.max_rounds=10 "
        "--set stack.inner_folds=2 --set stack.min_data_in_leaf=5",
        # tiny students of the tiny stacked teacher, on a few unlabelled pairs per query
        "DISTILL_SETS": f"--set model.backbone={tiny_backbone} --set model.max_length=32 "
        "--set optim.max_steps=2 --set eval.every_steps=1 --set optim.batch_size=8 --set optim.group_size=4 "
        "--set data.unlabelled_per_query=4 --set data.similar_queries=2",
        "ACTORS": 2,
        "GPUS_PER_ACTOR": 0,
    }
    script = "\n".join(
        [
            "set -euo pipefail",
            *(f"{k}={shlex.quote(str(v))}" for k, v in settings.items()),
            *runbook_blocks(text, "runbook"),
        ]
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    # The commands run as a user runs them: `score --engine ray` starts its own local Ray in its
    # own process (the session's shared cluster belongs to this process, not to the subprocess).
    for variable in ("WORLD_SIZE", "RAY_ADDRESS"):
        env.pop(variable, None)
    done = subprocess.run(
        ["bash", "-c", script], cwd=RUNBOOK.parents[1], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"

    stats = json.loads((run / "data" / "stats.json").read_text())
    assert set(stats["splits"]) == {"train", "val", "test"}
    assert (run / "model" / "config.json").is_file()
    log = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == 2
    assert "task1" in json.loads((run / "eval" / "metrics.json").read_text())
    summary = json.loads((run / "scores" / "summary.json").read_text())
    pairs = sum(s["rows"] for s in stats["splits"].values())
    assert summary["input_rows"] == pairs
    assert summary["scored_rows"] + summary["rejected_rows"] == pairs
    assert summary["keys_checked"]
    assert '"scored_rows"' in done.stdout  # the documented `cat` of the summary
    # the stacked default: two fold models, the trees, the final model with its stacker
    folds = run / "stacked_train" / "folds"
    assert sorted(p.parents[2].name for p in folds.glob("fold*/seed0/model/config.json")) == [
        "fold0",
        "fold1",
    ]
    assert (run / "stacked" / "stacker" / "stacker.json").is_file()
    assert "task1" in json.loads((run / "eval_stacked" / "metrics.json").read_text())
    # the students of the stacked default, one evaluated, both exported
    for student in ("student-esci", "student-score"):
        summary = json.loads((run / student / "distill.json").read_text())
        assert summary["student"] == student
        assert summary["teacher"]["stacked"]
    assert "task2" in json.loads((run / "eval_student_esci" / "metrics.json").read_text())
    assert (run / "export" / "student-score" / "config.json").is_file()
    assert list((run / "export" / "student-esci-onnx").glob("*.onnx"))
