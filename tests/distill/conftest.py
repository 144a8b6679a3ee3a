"""Fixtures for distillation: a prepared folder whose train split touches the test split, a
stacked tiny teacher (with non-zero decision-rule offsets) and tiny-student config overrides."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import build_tiny_model, stack_teacher, write_small_splits

#: Overrides that make a student tiny and its training a few steps (plus the backbone and data).
TINY_STUDENT = [
    "model.max_length=32",
    "optim.max_steps=4",
    "optim.batch_size=8",
    "optim.group_size=4",
    "eval.every_steps=2",
    "eval.batch_size=32",
    "data.unlabelled_per_query=5",
    "data.similar_queries=3",
    "teacher.batch_size=32",
    "mixed_precision=no",
]


@pytest.fixture(scope="session")
def distill_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared splits (6/3/3 real queries) where the train split also holds one row with a test
    product and one row of another query with a test query's text: both must stay out."""
    folder = write_small_splits(tmp_path_factory.mktemp("distill") / "data")
    train = pd.read_parquet(folder / "train.parquet")
    test = pd.read_parquet(folder / "test.parquet")
    product_row = test.iloc[[0]].copy()  # a test product, under a train query
    product_row[["query_id", "query"]] = train.iloc[0][["query_id", "query"]].to_numpy()
    query_row = train.iloc[[1]].copy()  # a train product, under a new query spelled like a test query
    query_row["query_id"] = int(train["query_id"].max()) + 1000
    query_row["query"] = "  " + str(test.iloc[0]["query"]).upper() + " "
    pd.concat([train, product_row, query_row], ignore_index=True).to_parquet(
        folder / "train.parquet", index=False
    )
    return folder


@pytest.fixture(scope="session")
def stacked_teacher(tmp_path_factory: pytest.TempPathFactory, distill_data: Path) -> Path:
    """A tiny stacked teacher (cross-encoder with the cosine and lexical priors + trees + rules)."""
    from esci_reranker.model import save_checkpoint

    model, tokenizer = build_tiny_model(prior="cosine", lexical=True, seed=3)
    source = save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("teacher") / "cross-encoder")
    return stack_teacher(source, tmp_path_factory.mktemp("teacher") / "stacked", distill_data)


@pytest.fixture(scope="session")
def tiny_student_overrides(tiny_backbone: Path, distill_data: Path) -> list[str]:
    """``--set`` overrides for a tiny student on the tiny backbone and the distillation data."""
    return [f"model.backbone={tiny_backbone}", f"data.dir={distill_data}", *TINY_STUDENT]


@pytest.fixture(scope="session")
def oof_parquet(tmp_path_factory: pytest.TempPathFactory, stacked_teacher: Path, distill_data: Path) -> Path:
    """An ``oof.parquet`` shaped like ``esci-reranker cv``'s: 2 query folds, seed 0, the teacher's
    cross-encoder columns (from the one teacher: the mechanics, not an honest out-of-fold run),
    with that teacher as each fold's saved cross-encoder beside it."""
    from esci_reranker.reranker import Reranker
    from esci_reranker.stack.outputs import frame_outputs
    from esci_reranker.train.cv import fold_model_dir, query_folds

    frame = pd.concat(
        [pd.read_parquet(distill_data / f"{s}.parquet") for s in ("train", "val")], ignore_index=True
    )
    outputs = frame_outputs(Reranker.from_pretrained(stacked_teacher, stacked=False), frame)
    fold_of = {
        q: i for i, queries in enumerate(query_folds(frame["query_id"].to_numpy(), 2)) for q in queries
    }
    outputs.insert(0, "seed", 0)
    outputs.insert(0, "fold", outputs["query_id"].map(fold_of))
    path = tmp_path_factory.mktemp("oof") / "oof.parquet"
    outputs.to_parquet(path, index=False)
    # and beside it each fold's cross-encoder, where cv saves them (model.init=teacher reads them)
    for fold in sorted(set(fold_of.values())):
        shutil.copytree(stacked_teacher, fold_model_dir(path.parent, fold, 0))
    return path
