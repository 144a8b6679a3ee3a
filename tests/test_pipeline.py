"""The main job end to end on the bundled sample, with a tiny random backbone and a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esci_reranker.pipeline import run_pipeline

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "multi_task.yaml"


def run_tiny(tmp_path: Path, backbone: Path, overrides: tuple[str, ...], lines: list[str], **options):
    """``run_pipeline`` of the default config into ``tmp_path / "run"`` with the tiny ``backbone``,
    2 steps, short pairs, the random and BM25 baselines and ``overrides``; log lines go to ``lines``."""
    return run_pipeline(
        CONFIG,
        tmp_path / "run",
        overrides=(f"model.backbone={backbone}", "optim.max_steps=2", "model.max_length=32", *overrides),
        baselines=("random", "bm25"),
        progress=False,
        log=lines.append,
        **options,
    )


@pytest.mark.slow
def test_stacked_pipeline_trains_folds_stacker_and_final_model(tmp_path, tiny_backbone):
    pytest.importorskip("usearch", reason="the retrieval extra is not installed")
    from tests.retrieval.conftest import build_tiny_retriever

    retriever = build_tiny_retriever(tmp_path / "retriever")
    lines: list[str] = []
    result = run_pipeline(
        CONFIG,  # the default: model.stacker gbdt
        tmp_path / "run",
        overrides=(
            f"model.backbone={tiny_backbone}",
            "optim.max_steps=2",
            "model.max_length=32",
            "stack.max_rounds=20",
            "stack.negatives_per_query=3",  # the catalogue negatives' path, end to end
            # the job's own scoring in bf16 (what eval.precision=auto picks on a bf16 host)
            "eval.precision=bf16",
        ),
        baselines=("random", "bm25"),
        progress=False,
        log=lines.append,
        build_index=False,  # the index stage is the same for both paths; tested below
        index_retriever=retriever,  # the train+val catalogue of the search flow and the negatives
    )
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} >= {"data", "model", "train", "eval", "timings.json"}
    assert not (out / "index").exists()
    assert result.index_dir is None
    assert (out / "model" / "stacker" / "stacker.json").is_file()
    assert result.test_metrics["num_queries"] == 41
    assert "by_query_type" in result.test_metrics
    assert "bm25" in result.test_table
    # the validation split is training data of the final model: cross-validation replaces it
    assert result.cv_table is not None
    for row in ("| stacker |", "| cross_encoder |", "| bm25 |", "| negations | stacker |"):
        assert row in result.cv_table
    assert next(line for line in lines if "cross-encoder fold" in line).endswith("hold out 28")
    assert sum("cross-encoder fold" in line for line in lines) == 4
    model_metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert model_metrics["task1"]["ndcg"] == pytest.approx(result.test_metrics["task1"]["ndcg"])
    assert set(model_metrics["training"]["cv"]) == {"stacker", "cross_encoder", "bm25"}
    # the class trees learnt from catalogue negatives, none of them a test product
    (negatives,) = (out / "train" / "folds").glob("negatives_*.parquet")
    assert negatives.name.endswith("_bf16.parquet")  # scored by the fold models in bf16
    import pandas as pd

    test_products = set(pd.read_parquet(out / "data" / "test.parquet")["product_id"])
    assert not set(pd.read_parquet(negatives)["product_id"]) & test_products
    stacker = json.loads((out / "model" / "stacker" / "stacker.json").read_text())
    assert stacker["info"]["negative_rows"] == len(pd.read_parquet(negatives))
    # the substitute threshold in the test metrics is the model's decision rule
    rules = json.loads((out / "model" / "stacker" / "stacker.json").read_text())["rules"]
    assert result.test_metrics["task3"]["threshold"] == pytest.approx(rules["substitute_threshold"])
    # the out-of-fold outputs the trees learnt from are the fold models' scores in bf16, as the
    # stacked model's cross-encoder will score when served with PRECISION=auto on such a host
    assert model_metrics["training"]["scoring_precision"] == "bf16"
    from esci_reranker.reranker import Reranker
    from esci_reranker.stack.outputs import frame_outputs
    from esci_reranker.train.cv import fold_model_dir

    oof = pd.read_parquet(out / "train" / "folds" / "oof.parquet")
    fold0 = oof[(oof["fold"] == 0) & (oof["seed"] == 0)].reset_index(drop=True)
    judged = pd.concat(pd.read_parquet(out / "data" / f"{s}.parquet") for s in ("train", "val"))
    held_out = judged.set_index(["query_id", "product_id"]).loc[
        list(zip(fold0["query_id"], fold0["product_id"], strict=True))
    ]
    fold_model = fold_model_dir(out / "train" / "folds", 0, 0)
    scores = {
        p: frame_outputs(Reranker.from_pretrained(fold_model, precision=p), held_out.reset_index())[
            "ce_score"
        ]
        for p in ("bf16", "fp32")
    }
    assert fold0["ce_score"].to_numpy() == pytest.approx(scores["bf16"].to_numpy(), abs=1e-6)
    assert abs(fold0["ce_score"].to_numpy() - scores["fp32"].to_numpy()).max() > 1e-6


@pytest.mark.slow
def test_pipeline_writes_model_evaluation_and_tables_in_fixed_places(tmp_path, tiny_backbone, monkeypatch):
    # The index stage with a tiny random retriever (the packaged one takes ~1 min to embed 6.6k
    # products on 2 cores); it needs the retrieval extra, as `make run` installs it.
    pytest.importorskip("usearch", reason="the retrieval extra is not installed")
    from esci_reranker.reranker import Reranker
    from tests.retrieval.conftest import build_tiny_retriever

    retriever = build_tiny_retriever(tmp_path / "tiny-st")
    lines: list[str] = []
    overrides = ("model.stacker=none", "eval.every_steps=1")
    loads: list[Path] = []
    real_load = Reranker.from_pretrained.__func__

    def counted(cls, path, *args, **kwargs):
        loads.append(Path(path))
        return real_load(cls, path, *args, **kwargs)

    monkeypatch.setattr(Reranker, "from_pretrained", classmethod(counted))
    result = run_tiny(tmp_path, tiny_backbone, overrides, lines, index_retriever=retriever)
    out = tmp_path / "run"
    # the final model is loaded once: the val and test evaluations and the search flow share it
    assert loads.count(out / "model") == 1
    assert {p.name for p in out.iterdir()} >= {
        "data",
        "model",
        "train",
        "eval",
        "eval_val",
        "index",
        "timings.json",
    }
    stats = json.loads((out / "data" / "stats.json").read_text())
    assert [stats["splits"][s]["queries"] for s in ("train", "val", "test")] == [97, 13, 41]
    assert result.test_metrics["num_queries"] == 41
    assert result.val_metrics["num_queries"] == 13
    assert {"predictions.parquet", "metrics.json", "report.md"} <= {p.name for p in (out / "eval").iterdir()}
    for table in (result.test_table, result.val_table):
        assert "bm25" in table
        assert "random" in table
    # The model folder carries the test metrics and how training went (used by `push`).
    model_metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert model_metrics["task1"]["ndcg"] == pytest.approx(result.test_metrics["task1"]["ndcg"])
    assert model_metrics["training"]["steps"] == 2
    assert lines[0].startswith("[1/5] prepare")
    # The sample's search index, what `esci-reranker search --index OUT/index` reads: every product
    # of the sample, searchable, timed in timings.json.
    from esci_reranker.retrieval import CatalogueIndex

    assert result.index_dir == out / "index"
    assert lines[-2].startswith("[5/5] index the sample's products")
    # then the test queries go through the search flow on that index
    assert lines[-1].strip().startswith("search flow (41 test queries")
    assert "## Search flow" in (out / "eval" / "report.md").read_text()
    assert json.loads((out / "eval" / "flow" / "metrics.json").read_text())["overall"]["num_queries"] == 41
    index = CatalogueIndex.open(out / "index")
    assert len(index) == 6613
    assert index.retrieve("wireless earbuds", 5)
    assert json.loads((out / "timings.json").read_text())["index"] > 0
