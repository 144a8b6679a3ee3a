"""The training loop on a tiny random encoder and a few real queries: learning, early stopping,
best-checkpoint saving, metrics.json and resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from esci_reranker.model import PairEncoder, load_checkpoint
from esci_reranker.train import loop as loop_module
from esci_reranker.train.config import load_config
from esci_reranker.train.loop import (
    Trainer,
    build_model,
    build_optimizer,
    param_groups,
    read_split,
    read_train_val,
    train,
    training_columns,
    training_frame,
)
from esci_reranker.train.texts import SplitTexts, frame_texts


def make_config(tmp_path, small_splits, tiny_backbone, *overrides):
    return load_config(
        None,
        [
            f"data.dir={small_splits}",
            f"model.backbone={tiny_backbone}",
            "model.max_length=48",
            f"output.save_path={tmp_path / 'model'}",
            "optim.batch_size=16",
            "optim.lr=1e-3",
            "optim.head_lr=1e-2",
            "eval.every_steps=4",
            "eval.patience=100",
            "output.checkpoint_every=4",
            *overrides,
        ],
    )


def test_a_few_steps_lower_the_training_loss(tmp_path, small_splits, tiny_backbone):
    cfg = make_config(tmp_path, small_splits, tiny_backbone, "optim.max_steps=30", "model.dropout=0")
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg)
    frame = read_split(small_splits / "train.parquet", "train").head(32)
    encoder = PairEncoder(tokenizer, model.config)
    batch = encoder.collate(
        encoder.encode(frame["query"].tolist(), frame_texts(frame, model.config)), range(32)
    )
    labels = torch.tensor(["ESCI".index(x) for x in frame["esci_label"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    first = model(**batch, labels=labels).loss.item()
    for _ in range(30):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model(**batch, labels=labels).loss.item() < 0.7 * first


def test_training_saves_the_best_checkpoint_and_test_metrics(tmp_path, small_splits, tiny_backbone):
    cfg = make_config(tmp_path, small_splits, tiny_backbone, "optim.max_steps=8")
    result = train(cfg, progress=False)
    assert result.steps == 8
    # Evaluations at step 0 (the untrained floor), 4 and 8.
    assert [h["step"] for h in result.history] == [0, 4, 8]
    best = max(h["task1.ndcg"] for h in result.history)
    assert result.best_metric == pytest.approx(best)
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["training"]["best_step"] == result.best_step
    assert {"ndcg", "ndcg@10", "mrr", "map", "recall@10"} <= set(metrics["task1"])
    assert {"accuracy", "micro_f1", "macro_f1"} <= set(metrics["task2"])
    assert {"accuracy", "f1", "micro_f1", "macro_f1", "auc"} <= set(metrics["task3"])
    assert metrics["num_queries"] == 3
    log = [json.loads(line) for line in (tmp_path / "train" / "log.jsonl").read_text().splitlines()]
    assert {r["type"] for r in log} == {"train", "val"}
    # Nothing temporary is left beside the model or the run state.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "train"]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["last", "log.jsonl"]


def test_early_stopping_stops_after_patience_evaluations_without_improvement(
    tmp_path, small_splits, tiny_backbone
):
    # With a zero learning rate the validation metric can never improve on the first evaluation.
    cfg = make_config(
        tmp_path, small_splits, tiny_backbone, "optim.lr=1e-12", "optim.head_lr=1e-12", "eval.patience=2"
    )
    cfg.optim.max_steps = 100
    result = train(cfg, progress=False)
    assert result.stopped_early
    assert result.steps == 2 * cfg.eval.every_steps
    assert result.best_step == 0


class _InterruptError(Exception):
    pass


@pytest.mark.parametrize(
    "batching",
    [(), ("optim.batching=query", "optim.group_size=4", "loss.rank_weight=1.0")],
    ids=["length-buckets", "query-groups-with-rank-loss"],
)
def test_resume_after_an_interruption_reaches_the_uninterrupted_state(
    tmp_path, small_splits, tiny_backbone, monkeypatch, batching
):
    overrides = (
        *batching,
        "optim.max_steps=10",
        "model.dropout=0.2",
        "eval.every_steps=5",
        "output.checkpoint_every=3",
        "model.prior=cosine",
        "model.lexical=true",  # the prior heads are fitted once, not again on resume
    )
    full = make_config(tmp_path / "full", small_splits, tiny_backbone, *overrides)
    train(full, progress=False)

    # Simulate a crash inside a dependency during step 7 (after the step-6 checkpoint).
    real_clip = loop_module.Accelerator.clip_grad_norm_
    calls = {"n": 0}

    def clip_then_maybe_die(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise _InterruptError
        return real_clip(self, *args, **kwargs)

    cut = make_config(tmp_path / "cut", small_splits, tiny_backbone, *overrides)
    monkeypatch.setattr(loop_module.Accelerator, "clip_grad_norm_", clip_then_maybe_die)
    with pytest.raises(_InterruptError):
        Trainer(cut, progress=False).train()
    monkeypatch.setattr(loop_module.Accelerator, "clip_grad_norm_", real_clip)
    state = json.loads((tmp_path / "cut" / "train" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 6
    resumed = Trainer(cut, progress=False).train(resume=True)
    assert resumed.steps == 10

    a = load_file(str(tmp_path / "full" / "train" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "train" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    best_a, _ = load_checkpoint(tmp_path / "full" / "model")
    best_b, _ = load_checkpoint(tmp_path / "cut" / "model")
    for (ka, va), (_, vb) in zip(best_a.state_dict().items(), best_b.state_dict().items(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=ka)


def test_prior_heads_are_fitted_to_the_training_split_before_step_0(tmp_path, small_splits, tiny_backbone):
    import numpy as np

    from esci_reranker.model.lexical import query_coverages

    frozen = ("optim.max_steps=2", "optim.lr=1e-12", "optim.head_lr=1e-12", "model.lexical=true")
    train(make_config(tmp_path, small_splits, tiny_backbone, *frozen), progress=False)
    model, _ = load_checkpoint(tmp_path / "model")
    frame = read_split(small_splits / "train.parquet", "train")
    coverage = np.array(query_coverages(frame["query"].tolist(), frame_texts(frame, model.config)))
    gains = frame["esci_label"].map({"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}).to_numpy()
    (slope, intercept), *_ = np.linalg.lstsq(np.c_[coverage, np.ones_like(coverage)], gains, rcond=None)
    head = model.score_head
    assert head.prior_weight.item() == pytest.approx(slope, abs=1e-4)
    assert head.proj.bias.item() == pytest.approx(intercept, abs=1e-4)
    assert model.esci_head.prior_weight.abs().sum() > 0  # logistic fit, not the flat start

    fixed = make_config(tmp_path / "fixed", small_splits, tiny_backbone, *frozen, "model.prior_init=fixed")
    train(fixed, progress=False)
    start, _ = load_checkpoint(tmp_path / "fixed" / "model")
    assert start.score_head.prior_weight.item() == pytest.approx(1.0)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, small_splits, tiny_backbone):
    cfg = make_config(tmp_path, small_splits, tiny_backbone, "optim.max_steps=2")
    with pytest.raises(FileNotFoundError, match="no resumable checkpoint"):
        Trainer(cfg, progress=False).train(resume=True)


def test_missing_split_and_overlapping_queries_are_clear_errors(tmp_path, small_splits, tiny_backbone):
    cfg = make_config(tmp_path, small_splits, tiny_backbone, f"data.val={tmp_path / 'nope.parquet'}")
    with pytest.raises(FileNotFoundError, match="val split not found"):
        train(cfg, progress=False)
    cfg = make_config(tmp_path, small_splits, tiny_backbone, f"data.val={small_splits / 'train.parquet'}")
    with pytest.raises(ValueError, match="share 6 query_id"):
        train(cfg, progress=False)


def test_trainings_with_different_mixed_precision_run_in_one_process(tmp_path, small_splits, tiny_backbone):
    """accelerate keeps one precision per process; a bf16 training (``auto`` on a bf16 host)
    followed by an fp32 one in the same process was refused ("cannot be changed")."""
    from accelerate.state import AcceleratorState

    steps = ["optim.max_steps=2", "eval.every_steps=2", "output.checkpoint_every=100"]
    bf16 = make_config(tmp_path / "bf16", small_splits, tiny_backbone, "mixed_precision=bf16", *steps)
    train(bf16, progress=False)
    assert AcceleratorState().mixed_precision == "bf16"
    fp32 = make_config(tmp_path / "fp32", small_splits, tiny_backbone, "mixed_precision=no", *steps)
    train(fp32, progress=False)
    assert AcceleratorState().mixed_precision == "no"
    assert (tmp_path / "fp32" / "model" / "config.json").is_file()


def test_the_fused_optimizer_updates_as_adamws_per_parameter_loop(tmp_path, small_splits, tiny_backbone):
    """``build_optimizer`` (what training and distillation step with) against the reference
    per-parameter AdamW, over the same groups: the encoder and head learning rates, weight decay
    off for biases and LayerNorms, and the frozen embeddings left out."""
    import copy

    cfg = make_config(tmp_path, small_splits, tiny_backbone, "optim.weight_decay=0.1")
    torch.manual_seed(0)
    fused_model, _ = build_model(cfg)
    loop_model = copy.deepcopy(fused_model)
    fused = build_optimizer(fused_model, cfg.optim)
    reference = torch.optim.AdamW(param_groups(loop_model, cfg.optim), foreach=False)
    assert fused.defaults["fused"]
    assert {g["lr"] for g in fused.param_groups} == {1e-3, 1e-2}
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
            if a.requires_grad:
                a.grad = torch.randn(a.shape, generator=generator)
                b.grad = a.grad.clone()
        fused.step()
        reference.step()
    moved = 0
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
        moved += int(a.requires_grad)
    assert moved > 10


def test_training_reads_only_the_columns_it_uses(tmp_path, small_splits, tiny_backbone):
    cfg = make_config(tmp_path, small_splits, tiny_backbone)
    full = read_split(small_splits / "train.parquet", "train")
    columns = training_columns(cfg.model.text_fields)
    assert {"product_title", "product_brand", "product_color"} <= set(columns)
    assert "product_description" not in columns
    assert "product_bullet_point" not in columns
    read = read_split(small_splits / "train.parquet", "train", columns)
    present = [c for c in columns if c in full.columns and c != "product_text"]
    assert read.columns.tolist() == present  # the file's order; product_text rebuilt from the fields
    assert frame_texts(read, build_model(cfg)[0].config) == frame_texts(full, build_model(cfg)[0].config)
    # a split with the text in product_text only keeps it
    only_text = full[["query_id", "query", "product_id", "esci_label", "product_text"]]
    only_text.to_parquet(tmp_path / "text_only.parquet")
    assert "product_text" in read_split(tmp_path / "text_only.parquet", "train", columns).columns
    # a missing required column is still named, with columns or without
    full.drop(columns=["esci_label"]).to_parquet(tmp_path / "no_label.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['esci_label'\]"):
        read_split(tmp_path / "no_label.parquet", "train", columns)
    # a table read whole, cut to the same columns as read_split reads
    pd.testing.assert_frame_equal(training_frame(full, cfg.model.text_fields), read)
    both = read_train_val(small_splits, columns)
    assert len(both) == len(full) + len(read_split(small_splits / "val.parquet", "val"))
    assert set(both.columns) == set(present)


def test_the_trainer_holds_ids_and_labels_and_reads_texts_by_row(tmp_path, small_splits, tiny_backbone):
    cfg = make_config(tmp_path, small_splits, tiny_backbone, "data.max_train_rows=40")
    trainer = Trainer(cfg)
    trainer._load_data()
    # the texts are not held for every pair: each process reads those of the rows it tokenises
    assert trainer.train_frame.columns.tolist() == ["query_id", "esci_label"]
    assert "product_description" in trainer.val_frame.columns  # evaluation reads the whole split
    # the max_train_rows sample, in the order pandas draws it, and its texts from the file
    full = read_split(small_splits / "train.parquet", "train")
    sample = full.sample(n=40, random_state=cfg.seed)
    assert trainer.train_rows.tolist() == sample.index.tolist()
    assert trainer.train_frame["query_id"].tolist() == sample["query_id"].tolist()
    config = build_model(cfg)[0].config
    queries, texts = SplitTexts(trainer.train_path, config, trainer.train_rows).take([5, 0, 39])
    expected = sample.iloc[[5, 0, 39]]
    assert queries == expected["query"].tolist()
    assert texts == frame_texts(expected, config)


def test_frozen_lower_layers_keep_their_weights_and_the_rest_learn(tmp_path, small_splits, tiny_backbone):
    """``model.freeze_layers``: the embeddings and the lowest layers leave training exactly as
    the backbone gave them (no gradient reaches them), the layers above and the heads move."""
    from transformers import AutoModel

    cfg = make_config(
        tmp_path,
        small_splits,
        tiny_backbone,
        "optim.max_steps=4",
        "eval.at_start=false",
        "model.freeze_layers=1",
    )
    train(cfg, progress=False)
    trained = load_checkpoint(tmp_path / "model")[0].encoder.state_dict()
    start = AutoModel.from_pretrained(tiny_backbone).state_dict()
    layers = {name for name in start if name.startswith("encoder.layer.")}
    assert len({name.split(".")[2] for name in layers}) >= 2
    for name, weight in start.items():
        if name.startswith(("embeddings.", "encoder.layer.0.")):
            torch.testing.assert_close(trained[name], weight, rtol=0, atol=0, msg=name)
    moved = [n for n in layers if n.startswith("encoder.layer.1.") and not torch.equal(trained[n], start[n])]
    assert len(moved) > 10


def test_freezing_more_layers_than_the_backbone_has_is_a_clear_error(tmp_path, small_splits, tiny_backbone):
    cfg = make_config(tmp_path, small_splits, tiny_backbone, "model.freeze_layers=99")
    with pytest.raises(
        ValueError, match=r"model\.freeze_layers=99: the backbone has only \d+ transformer layers"
    ):
        build_model(cfg)
