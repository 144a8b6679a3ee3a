"""The listwise family: list transformer over each query's candidates, list passes, losses, training, serving."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from esci_reranker.model import ListwiseReranker, load_checkpoint, save_checkpoint
from esci_reranker.model.features import pair_encoder_for
from esci_reranker.model.listwise import ListPairEncoder, circle_loss, list_chunks
from tests.conftest import build_tiny_model
from tests.model.helpers import small_train_config

QUERIES = ["red running shoes"] * 6 + ["usb c cable"] * 4
TEXTS = [
    "Nike Pegasus running shoe | Nike | red",
    "Trail running shoes | Salomon | black",
    "Shoe laces, red | Generic",
    "Red dress shoes | Clarks",
    "Running socks | Balega",
    "Shoe polish kit",
    "Anker USB-C cable 2 m | Anker",
    "USB-C to HDMI adapter",
    "Lightning cable | Apple",
    "Phone case",
]


def _randomise(model: ListwiseReranker, seed: int = 1) -> ListwiseReranker:
    """Give every zero-initialised layer random weights, so the list branch actually acts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.abs().sum():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model.eval()


@pytest.fixture(scope="module", params=[{}, {"prior": "cosine", "lexical": True}], ids=["plain", "priors"])
def listwise(request: pytest.FixtureRequest) -> tuple[ListwiseReranker, ListPairEncoder]:
    model, tokenizer = build_tiny_model("esci-listwise", **request.param)
    encoder = pair_encoder_for(tokenizer, model.config)
    assert isinstance(encoder, ListPairEncoder)
    return _randomise(model), encoder


def _outputs(model, encoder, queries, texts) -> dict[str, np.ndarray]:
    encoded = encoder.encode(queries, texts)
    with torch.no_grad():
        out = model(**encoder.collate(encoded, range(len(encoded))))
    return {
        "score": out.score.numpy(),
        "esci_logits": out.esci_logits.numpy(),
        "substitute_logit": out.substitute_logit.numpy(),
    }


def test_shuffling_the_list_permutes_the_outputs_and_changes_nothing_else(listwise) -> None:
    model, encoder = listwise
    base = _outputs(model, encoder, QUERIES, TEXTS)
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(len(QUERIES))
        shuffled = _outputs(model, encoder, [QUERIES[i] for i in perm], [TEXTS[i] for i in perm])
        for name, values in base.items():
            np.testing.assert_allclose(shuffled[name], values[perm], atol=1e-5, err_msg=name)


def test_a_candidate_depends_on_its_own_list_only(listwise) -> None:
    model, encoder = listwise
    both = _outputs(model, encoder, QUERIES, TEXTS)
    alone = _outputs(model, encoder, QUERIES[:6], TEXTS[:6])  # the other list gone: nothing changes
    np.testing.assert_allclose(alone["score"], both["score"][:6], atol=1e-5)
    # ...but a different candidate in the same list changes the others' scores: it is listwise
    edited = _outputs(model, encoder, QUERIES[:6], [*TEXTS[:5], "Garden hose 20 m | Gardena"])
    assert np.abs(edited["score"][:5] - both["score"][:5]).max() > 1e-4


def test_at_init_the_list_branch_is_silent_and_the_model_is_pointwise() -> None:
    model, tokenizer = build_tiny_model("esci-listwise")
    encoder = pair_encoder_for(tokenizer, model.config)
    both = _outputs(model, encoder, QUERIES, TEXTS)
    single = _outputs(model, encoder, QUERIES[:1], TEXTS[:1])
    np.testing.assert_allclose(single["score"], both["score"][:1], atol=1e-5)


def test_list_batches_keep_lists_whole_and_chunk_long_ones_round_robin() -> None:
    model, tokenizer = build_tiny_model("esci-listwise", listwise={"max_list": 4})
    encoder = pair_encoder_for(tokenizer, model.config)
    queries = ["a"] * 10 + ["b"] * 3 + ["c"] * 2
    encoded = encoder.encode(queries, [f"product {i}" for i in range(len(queries))])
    passes = list(encoder.list_batches(encoded, batch_size=5))
    flat = np.concatenate(passes)
    assert sorted(flat.tolist()) == list(range(len(queries)))  # every pair exactly once
    for rows in passes:
        assert len(rows) <= 5
        # a pass never holds more than max_list pairs of one list: two chunks would read as one list
        lists = [queries[i] for i in rows]
        assert max(lists.count(q) for q in lists) <= 4
    # query "a" (10 pairs, max_list 4) is dealt into ceil(10/4) = 3 chunks: rows i::3
    a_passes = [sorted(rows.tolist()) for rows in passes if queries[rows[0]] == "a"]
    assert sorted(a_passes) == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [c.tolist() for c in list_chunks(np.arange(3), 4)] == [[0, 1, 2]]


def test_reranker_groups_arbitrary_pairs_by_query(listwise, tmp_path: Path) -> None:
    from esci_reranker.reranker import Reranker

    model, encoder = listwise
    folder = save_checkpoint(model, encoder.tokenizer, tmp_path / "lw")
    reranker = Reranker.from_pretrained(folder, device="cpu", batch_size=4)
    calls = []
    runner = reranker.runner
    reranker.runner = lambda batch: calls.append(len(batch["input_ids"])) or runner(batch)
    ranked = reranker.rerank(QUERIES[0], [(f"p{i}", t) for i, t in enumerate(TEXTS[:6])])
    assert calls == [6]  # one list pass, though batch_size is 4
    by_id = {c.product_id: c.score for c in ranked}
    # the same pairs interleaved with another query's, in any order: same scores per pair
    perm = np.random.default_rng(0).permutation(len(QUERIES))
    preds = reranker.predict([(QUERIES[i], TEXTS[i]) for i in perm])
    for row, i in enumerate(perm):
        if i < 6:
            assert preds.scores[row] == pytest.approx(by_id[f"p{i}"], abs=1e-5)
    expected = _outputs(model, encoder, QUERIES, TEXTS)["score"]
    np.testing.assert_allclose(preds.scores, expected[perm], atol=1e-4)
    assert ranked[0].esci_class in "ESCI"
    assert ranked[0].substitute_prob is not None


def test_save_load_round_trip(listwise, tmp_path: Path) -> None:
    model, encoder = listwise
    folder = save_checkpoint(model, encoder.tokenizer, tmp_path / "lw")
    loaded, tokenizer = load_checkpoint(folder)
    assert isinstance(loaded, ListwiseReranker)
    assert loaded.config == model.config
    again = _outputs(loaded, pair_encoder_for(tokenizer, loaded.config), QUERIES, TEXTS)
    np.testing.assert_allclose(again["score"], _outputs(model, encoder, QUERIES, TEXTS)["score"], atol=1e-6)


@pytest.mark.parametrize("fmt", ["onnx", "hf-classifier", "st-cross-encoder", "tei"])
def test_stock_exports_are_refused_with_the_distill_route(fmt: str, tmp_path: Path) -> None:
    from tests.cli.helpers import assert_fails, run

    # the head layout a stock classifier computes (CLS, tanh layer as wide as the encoder, no
    # prior): what is refused is the list transformer, not the layout
    model, tokenizer = build_tiny_model("esci-listwise", pooling="cls", head_hidden=32)
    folder = save_checkpoint(model, tokenizer, tmp_path / "lw")
    result = run("export", "--model", folder, "--format", fmt, "--out", tmp_path / "out")
    assert_fails(
        result,
        f"export --format {fmt}: {folder} is a listwise checkpoint (model_type 'esci-listwise')",
        "there is no stock equivalent",
        f"esci-reranker distill --teacher {folder}",
    )
    assert not (tmp_path / "out").exists()


def test_iterative_inference_keeps_survivors_above_the_dropped() -> None:
    model, tokenizer = build_tiny_model(
        "esci-listwise", listwise={"iterative_rounds": 2, "iterative_drop": 0.5}
    )
    _randomise(model)
    encoder = pair_encoder_for(tokenizer, model.config)
    iterative = _outputs(model, encoder, QUERIES[:6], TEXTS[:6])["score"]
    model.config.listwise.iterative_rounds = 0
    single = _outputs(model, encoder, QUERIES[:6], TEXTS[:6])["score"]
    # round 1 drops the 3 lowest of the one-pass scores; they keep those scores, below the rest
    dropped = np.argsort(single, kind="stable")[:3]
    np.testing.assert_allclose(iterative[dropped], single[dropped], atol=1e-6)
    kept = np.setdiff1d(np.arange(6), dropped)
    assert iterative[kept].min() > iterative[dropped].max()
    assert not np.allclose(iterative[kept], single[kept])  # the survivors were re-scored


def test_circle_loss_matches_the_formula() -> None:
    scores = torch.tensor([0.9, 0.2, 0.5, 0.1])
    labels = torch.tensor([0, 3, 0, 1])  # E, I, E, S
    groups = torch.tensor([0, 0, 0, 1])  # the second list has no exact pair: skipped
    m, gamma = 0.25, 4.0
    sp, sn = [0.9, 0.5], [0.2]
    lp = [-gamma * max(0, 1 + m - s) * (s - (1 - m)) for s in sp]
    ln = [gamma * max(0, s + m) * (s - m) for s in sn]
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    expected = math.log1p(math.exp(lse(ln) + lse(lp)))
    assert circle_loss(scores, labels, groups, m, gamma).item() == pytest.approx(expected, rel=1e-5)
    assert circle_loss(scores, torch.tensor([0, 0, 0, 0]), groups, m, gamma).item() == 0.0


def test_stage_one_freezes_the_encoder_but_trains_the_list_transformer() -> None:
    model, tokenizer = build_tiny_model("esci-listwise")
    encoder = pair_encoder_for(tokenizer, model.config)
    model.loss_config.rank_weight = 1.0
    model.loss_config.circle_weight = 0.5
    model.stage1_steps = 1
    batch = encoder.collate(encoder.encode(QUERIES, TEXTS), range(len(QUERIES)))
    labels = torch.tensor([0, 1, 2, 3, 0, 3, 0, 2, 3, 3])
    for step, frozen in ((0, True), (1, False)):
        model.train()
        model.zero_grad(set_to_none=True)
        model.on_train_step(step)
        out = model(**batch, labels=labels)
        assert set(out.losses) == {"score", "rank", "esci", "substitute", "circle"}
        out.loss.backward()
        encoder_grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
        assert all(g is None for g in encoder_grads) is frozen
        # the list branch learns from step 0 (its output layer first: it starts at zero)
        assert model.list_out.weight.grad is not None
        assert model.list_out.weight.grad.abs().sum() > 0


def test_listwise_trains_end_to_end_and_serves(
    tiny_backbone: Path, small_splits: Path, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from esci_reranker.reranker import Reranker
    from esci_reranker.serve import create_app, load_settings
    from esci_reranker.train.loop import train

    cfg = small_train_config(
        "listwise",
        small_splits,
        tiny_backbone,
        "model.max_length=48",
        "optim.max_steps=4",
        "optim.batch_size=32",
        "optim.group_size=32",
        "eval.every_steps=2",
        "eval.batch_size=16",
        f"output.save_path={tmp_path / 'model'}",
        "output.checkpoint_every=2",
    )
    result = train(cfg, progress=False)
    assert result.steps == 4
    assert result.test_metrics is not None
    assert {"task1", "task2", "task3"} <= set(result.test_metrics)
    reranker = Reranker.from_pretrained(result.save_path, device="cpu")
    assert reranker.config.model_type == "esci-listwise"
    assert reranker.config.list_level
    app = create_app(load_settings(batch_wait_ms=5), reranker)  # batching asked for: list models go direct
    with TestClient(app) as client:
        body = {
            "query": "red shoes",
            "candidates": [{"product_id": f"p{i}", "text": t} for i, t in enumerate(TEXTS)],
        }
        ranked = client.post("/rerank", json=body).json()["ranked"]
        assert sorted(r["product_id"] for r in ranked) == sorted(f"p{i}" for i in range(len(TEXTS)))
        expected = {
            c.product_id: c.score
            for c in reranker.rerank("red shoes", [(f"p{i}", t) for i, t in enumerate(TEXTS)])
        }
        for item in ranked:
            assert item["score"] == pytest.approx(expected[item["product_id"]], abs=1e-5)
        v1 = client.post("/v1/rerank", json={"query": "red shoes", "documents": TEXTS[:4], "top_n": 2}).json()
        assert len(v1["results"]) == 2
        classified = client.post("/classify", json=body)
        assert classified.status_code == 200
