"""The public Reranker: loading (local and Hub), predict, rerank, batching order, errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from esci_reranker.data.text import product_text, product_texts
from esci_reranker.labels import ESCI_LABELS
from esci_reranker.model import CheckpointError, PairEncoder, save_checkpoint
from esci_reranker.model.cpu import int8_available
from esci_reranker.reranker import Predictions, RankedCandidate, Reranker
from tests.conftest import SAMPLE_PARQUET, build_tiny_model

QUERY = "red running shoes"
TEXTS = [
    "Nike Air Zoom Pegasus | Nike | Red",
    "socks",
    "Running shoe cleaner kit with brush, foam and towel for sneakers | ShoeCare",
    "Adidas Ultraboost 22 running shoes for women, lightweight and breathable | Adidas | Black",
    "x",
    "Trail runner | Salomon | Blue",
    "Kids' light-up sneakers | Skechers | Pink",
]


@pytest.fixture(scope="module")
def reranker(tiny_checkpoint: Path) -> Reranker:
    return Reranker.from_pretrained(tiny_checkpoint, device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def single_task(tiny_single_task_checkpoint: Path) -> Reranker:
    return Reranker.from_pretrained(tiny_single_task_checkpoint, device="cpu")


# --- loading --------------------------------------------------------------------------------------


def test_save_load_round_trip_gives_the_in_memory_models_outputs(tmp_path: Path):
    model, tokenizer = build_tiny_model(seed=3)
    folder = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    loaded = Reranker.from_pretrained(folder, device="cpu")

    encoder = PairEncoder(tokenizer, model.config)
    encoded = encoder.encode([QUERY] * len(TEXTS), TEXTS)
    with torch.inference_mode():
        out = model(**encoder.collate(encoded, range(len(TEXTS))))
    preds = loaded.predict([(QUERY, t) for t in TEXTS])

    np.testing.assert_allclose(preds.regression_scores, out.score.numpy(), atol=1e-5)
    np.testing.assert_allclose(preds.esci_probs, out.esci_logits.softmax(-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(preds.substitute_probs, out.substitute_logit.sigmoid().numpy(), atol=1e-5)
    np.testing.assert_allclose(preds.expected_gains, out.expected_gain.numpy(), atol=1e-5)
    # A second load of the same folder is bit-identical.
    again = Reranker.from_pretrained(folder, device="cpu").predict([(QUERY, t) for t in TEXTS])
    np.testing.assert_array_equal(again.scores, preds.scores)


def test_missing_folder_error_names_the_local_path_and_the_hub(tmp_path: Path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(CheckpointError) as err:
        Reranker.from_pretrained(missing)
    message = str(err.value)
    assert str(missing) in message
    assert "Hugging Face Hub" in message


def test_plain_transformers_folder_is_refused_with_a_clear_message(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(CheckpointError, match="'bert' is not an esci-reranker checkpoint"):
        Reranker.from_pretrained(tmp_path)


def test_hub_fallback_downloads_with_snapshot_download(tiny_checkpoint: Path, tmp_path: Path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, token=None, **kwargs):
        calls.append({"repo_id": repo_id, "revision": revision, "token": token})
        copy = tmp_path / "snapshot"
        shutil.copytree(tiny_checkpoint, copy, dirs_exist_ok=True)
        return str(copy)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)  # "someone/tiny-esci" must not exist as a local folder
    hub = Reranker.from_pretrained("someone/tiny-esci", device="cpu", revision="v1")
    local = Reranker.from_pretrained(tiny_checkpoint, device="cpu")

    assert calls == [{"repo_id": "someone/tiny-esci", "revision": "v1", "token": None}]
    pairs = [(QUERY, t) for t in TEXTS]
    np.testing.assert_array_equal(hub.predict(pairs).scores, local.predict(pairs).scores)


def test_hub_failure_error_names_both_places(tmp_path: Path, monkeypatch):
    import huggingface_hub

    def fake_snapshot_download(repo_id, **kwargs):
        raise OSError(f"401 Client Error: repository {repo_id} not found")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        Reranker.from_pretrained("someone/missing-model")
    message = str(err.value)
    assert str(tmp_path / "someone" / "missing-model") in message
    assert "Hugging Face Hub repo 'someone/missing-model'" in message
    assert "401" in message


def test_max_length_override_and_its_bounds(tiny_checkpoint: Path):
    short = Reranker.from_pretrained(tiny_checkpoint, device="cpu", max_length=16)
    preds = short.predict([(QUERY, TEXTS[3]), (QUERY, "x")])
    assert preds.truncated.tolist() == [True, False]
    with pytest.raises(ValueError, match="max_length=4"):
        Reranker.from_pretrained(tiny_checkpoint, max_length=4)
    with pytest.raises(ValueError, match="batch_size=0"):
        Reranker.from_pretrained(tiny_checkpoint, batch_size=0)


# --- predict ----------------------------------------------------------------------------------------


def test_predict_fields_and_shapes(reranker: Reranker):
    preds = reranker.predict([(QUERY, t) for t in TEXTS])
    n = len(TEXTS)
    assert isinstance(preds, Predictions)
    assert len(preds) == n
    assert preds.scores.shape == preds.expected_gains.shape == preds.substitute_probs.shape == (n,)
    assert preds.esci_probs.shape == (n, 4)
    np.testing.assert_allclose(preds.esci_probs.sum(1), 1.0, atol=1e-5)
    assert set(preds.esci_classes) <= {"E", "S", "C", "I"}
    assert preds.esci_classes.tolist() == [("E", "S", "C", "I")[i] for i in preds.esci_probs.argmax(1)]
    np.testing.assert_allclose(preds.expected_gains, preds.esci_probs @ [1.0, 0.1, 0.01, 0.0], atol=1e-6)
    assert ((preds.substitute_probs > 0) & (preds.substitute_probs < 1)).all()
    assert not preds.truncated.any()
    assert len(reranker.predict([])) == 0


def test_results_keep_input_order_under_length_sorted_batching(reranker: Reranker):
    texts = [*TEXTS, *(f"{t} extra words {'long ' * i}" for i, t in enumerate(TEXTS))]
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    shuffled = [texts[i] for i in order]

    together = reranker.predict([(QUERY, t) for t in shuffled])  # batches of 3, longest first
    alone = [reranker.predict([(QUERY, t)]) for t in shuffled]
    np.testing.assert_allclose(together.scores, [p.scores[0] for p in alone], atol=1e-5)
    np.testing.assert_allclose(together.esci_probs, np.vstack([p.esci_probs for p in alone]), atol=1e-5)
    assert together.esci_classes.tolist() == [p.esci_classes[0] for p in alone]


def test_prior_model_predicts_in_input_order(tiny_prior_checkpoint: Path):
    prior = Reranker.from_pretrained(tiny_prior_checkpoint, device="cpu", batch_size=2)
    together = prior.predict([(QUERY, t) for t in TEXTS])
    alone = [prior.predict([(QUERY, t)]).scores[0] for t in TEXTS]
    np.testing.assert_allclose(together.scores, alone, atol=1e-5)


def test_long_text_is_truncated_and_reported(reranker: Reranker):
    long_text = "waterproof hiking boot " * 100
    preds = reranker.predict([(QUERY, long_text), (QUERY, "boot")])
    assert preds.truncated.tolist() == [True, False]
    ranked = reranker.rerank(QUERY, [("long", long_text), ("short", "boot")])
    assert {c.product_id: c.truncated for c in ranked} == {"long": True, "short": False}


def test_single_task_model_has_no_classes(single_task: Reranker):
    preds = single_task.predict([(QUERY, t) for t in TEXTS[:3]])
    assert preds.esci_classes.tolist() == ["", "", ""]
    assert np.isnan(preds.esci_probs).all()
    assert np.isnan(preds.substitute_probs).all()
    assert np.isnan(preds.expected_gains).all()
    np.testing.assert_array_equal(preds.scores, preds.regression_scores)
    ranked = single_task.rerank(QUERY, [("a", TEXTS[0]), ("b", TEXTS[1])])
    assert all(c.esci_class is None and c.esci_probs is None and c.substitute_prob is None for c in ranked)


# --- rerank -----------------------------------------------------------------------------------------


def test_rerank_sorts_by_score_and_respects_top_k(reranker: Reranker):
    candidates = [(f"P{i}", t) for i, t in enumerate(TEXTS)]
    ranked = reranker.rerank(QUERY, candidates)
    assert all(isinstance(c, RankedCandidate) for c in ranked)
    assert [c.rank for c in ranked] == list(range(1, len(TEXTS) + 1))
    scores = [c.score for c in ranked]
    assert scores == sorted(scores, reverse=True)
    assert sorted(c.product_id for c in ranked) == sorted(pid for pid, _ in candidates)
    preds = reranker.predict([(QUERY, t) for t in TEXTS])
    by_id = {c.product_id: c for c in ranked}
    for i in range(len(TEXTS)):
        assert by_id[f"P{i}"].score == pytest.approx(float(preds.scores[i]), abs=1e-5)
        assert by_id[f"P{i}"].esci_class == preds.esci_classes[i]
        assert len(by_id[f"P{i}"].esci_probs) == 4

    top = reranker.rerank(QUERY, candidates, top_k=3)
    assert [c.product_id for c in top] == [c.product_id for c in ranked[:3]]
    assert len(reranker.rerank(QUERY, candidates, top_k=100)) == len(TEXTS)


def test_dict_candidates_are_read_as_in_training(reranker: Reranker):
    frame = pd.read_parquet(SAMPLE_PARQUET).head(8)
    training_texts = product_texts(frame, reranker.config.text_fields, reranker.config.long_field_chars)
    columns = ["product_id", "product_title", "product_brand", "product_color", "product_description"]
    records = frame[columns].to_dict(orient="records")
    short_names = [
        {
            "product_id": r["product_id"],
            "title": r["product_title"],
            "brand": r["product_brand"],
            "color": r["product_color"],
        }
        for r in records
    ]
    assert [reranker.text_of(r) for r in records] == training_texts.tolist()
    assert [reranker.text_of(r) for r in short_names] == training_texts.tolist()
    assert reranker.text_of(records[0]) == product_text(records[0])

    from_dicts = reranker.rerank("silicone", records)
    from_tuples = reranker.rerank("silicone", list(zip(frame["product_id"], training_texts, strict=True)))
    assert from_dicts == from_tuples
    # A dict with only a ready text uses it.
    text_only = reranker.rerank("silicone", [{"product_id": "a", "text": training_texts.iloc[0]}])
    assert text_only[0].score == pytest.approx(
        from_tuples[[c.product_id for c in from_tuples].index(records[0]["product_id"])].score, abs=1e-5
    )


def test_a_text_product_is_read_alike_in_every_form(reranker: Reranker):
    # HTML and spacing as a catalogue or a client may send them; training text is cleaned.
    raw = "Silicone  baking mat &amp; liner <b>non-stick</b>\n"
    assert reranker.text_of(raw) == "Silicone baking mat & liner non-stick"
    assert reranker.text_of(raw) == reranker.text_of({"text": raw})
    as_tuple = reranker.rerank("silicone", [("a", raw), ("b", "oven mitt")])
    as_dict = reranker.rerank(
        "silicone", [{"product_id": "a", "text": raw}, {"product_id": "b", "text": "oven mitt"}]
    )
    assert as_tuple == as_dict
    assert (
        reranker.predict([("silicone", raw)]).scores[0]
        == reranker.predict([("silicone", {"text": raw})]).scores[0]
    )


def test_empty_candidate_list_gives_empty_result(reranker: Reranker):
    assert reranker.rerank(QUERY, []) == []


@pytest.mark.parametrize(
    ("query", "candidates", "top_k", "message"),
    [
        (QUERY, [("a", "shoe"), ("a", "boot")], None, "candidate 1: duplicate product_id 'a'"),
        (QUERY, [("a", "shoe"), ("b", "   ")], None, r"candidate 1 \(product_id 'b'\): empty product text"),
        (QUERY, [{"product_id": "a", "title": None, "brand": ""}], None, "empty product text"),
        (QUERY, [{"title": "shoe"}], None, "candidate 0: missing 'product_id'"),
        (QUERY, [("", "shoe")], None, "candidate 0: empty product_id"),
        (QUERY, [("a", None)], None, "candidate 0 .*must be a str or a mapping"),
        (QUERY, ["just text"], None, r"expected \(product_id, text\) or a dict"),
        (QUERY, [("a", "shoe")], 0, "top_k=0"),
        (QUERY, [("a", "shoe")], -2, "top_k=-2"),
        (QUERY, [("a", "shoe")], 1.5, "top_k=1.5"),
        ("  ", [("a", "shoe")], None, "query must be a non-empty string"),
    ],
)
def test_rerank_rejects_bad_input_with_clear_messages(reranker, query, candidates, top_k, message):
    with pytest.raises(ValueError, match=message):
        reranker.rerank(query, candidates, top_k=top_k)


def test_predict_frame_reads_product_columns_or_product_text(reranker: Reranker):
    frame = pd.read_parquet(SAMPLE_PARQUET).head(5)
    by_fields = reranker.predict_frame(frame, progress=False)
    with_text = frame[["query"]].assign(product_text=product_texts(frame))
    np.testing.assert_allclose(reranker.predict_frame(with_text, progress=False).scores, by_fields.scores)
    with pytest.raises(ValueError, match="no 'query' column"):
        reranker.predict_frame(frame.drop(columns="query"))
    with pytest.raises(ValueError, match="neither product columns"):
        reranker.predict_frame(frame[["query", "product_id"]])


@pytest.mark.skipif(not int8_available(), reason="torch without dynamic int8 linear layers")
def test_int8_precision_scores_close_to_fp32_and_stays_inference_only(tiny_prior_checkpoint: Path, tmp_path):
    fp32 = Reranker.from_pretrained(tiny_prior_checkpoint, device="cpu")
    int8 = Reranker.from_pretrained(tiny_prior_checkpoint, device="cpu", precision="int8", tower_cache=16)
    assert int8.info()["precision"] == "int8"
    assert int8.info()["unpadded"] is True
    queries = [QUERY, "usb cable", QUERY, "coffee beans", "kids shoes", QUERY, "trail"]
    a, b = fp32.predict_texts(queries, TEXTS), int8.predict_texts(queries, TEXTS)
    np.testing.assert_allclose(b.scores, a.scores, atol=0.05)
    np.testing.assert_allclose(b.esci_probs, a.esci_probs, atol=0.05)
    assert not np.array_equal(a.scores, b.scores)  # int8 really ran
    again = int8.predict_texts(queries, TEXTS)  # tower cache hits: the same scores
    np.testing.assert_allclose(again.scores, b.scores, atol=1e-6)
    with pytest.raises(RuntimeError, match="cannot be trained"):
        int8.model.train()
    with pytest.raises(ValueError, match="cannot save an int8 model"):
        save_checkpoint(int8.model, int8.pair_encoder.tokenizer, tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


def test_pair_outputs_are_reused_within_the_block_and_never_stale(tiny_prior_checkpoint: Path):
    """Inside ``reuse_pair_outputs`` a pair scored before by the same weights is not run again
    (another Reranker of the same checkpoint finds it too), its outputs are those of a fresh run,
    and a weight changed in place, another precision or the end of the block scores anew."""
    from esci_reranker.reranker import reuse_pair_outputs

    queries = [QUERY, "usb cable", QUERY, "coffee beans", "kids shoes", QUERY, "trail"]
    fresh = Reranker.from_pretrained(tiny_prior_checkpoint, device="cpu")
    expected = fresh.predict_texts(queries, TEXTS)
    reranker = Reranker.from_pretrained(tiny_prior_checkpoint, device="cpu")
    rows_run: list[int] = []
    runner = reranker.runner

    def counting(batch):
        rows_run.append(len(batch["input_ids"]))
        return runner(batch)

    reranker.runner = counting
    with reuse_pair_outputs():
        first = reranker.predict_texts(queries[:4], TEXTS[:4])
        assert sum(rows_run) == 4
        # the first four pairs again among new ones: only the three new ones are run
        again = reranker.predict_texts(queries, TEXTS)
        assert sum(rows_run) == 4 + 3
        for name in ("scores", "esci_probs", "substitute_probs"):
            np.testing.assert_allclose(getattr(again, name), getattr(expected, name), atol=1e-6)
        np.testing.assert_allclose(first.scores, expected.scores[:4], atol=1e-6)
        # every pair seen: nothing is run, the outputs are the same
        assert np.array_equal(reranker.predict_texts(queries, TEXTS).scores, again.scores)
        assert sum(rows_run) == 7
        # a weight changed in place: the memo does not answer for the new weights
        with torch.no_grad():
            reranker.model.score_head.proj.bias.add_(1.0)  # type: ignore[union-attr]
        shifted = reranker.predict_texts(queries, TEXTS)
        assert sum(rows_run) == 14
        np.testing.assert_allclose(shifted.scores, expected.scores + 1.0, atol=1e-5)
        with torch.no_grad():
            reranker.model.score_head.proj.bias.sub_(1.0)  # type: ignore[union-attr]
        # another precision is another entry
        bf16 = Reranker.from_pretrained(tiny_prior_checkpoint, device="cpu", precision="bf16")
        bf16_rows: list[int] = []
        bf16_runner = bf16.runner
        bf16.runner = lambda batch: bf16_rows.append(len(batch["input_ids"])) or bf16_runner(batch)
        bf16.predict_texts(queries, TEXTS)
        assert sum(bf16_rows) == 7
    # outside the block nothing is kept
    reranker.predict_texts(queries, TEXTS)
    assert sum(rows_run) == 21


def test_auto_precision_is_bf16_where_the_device_computes_it_natively(tiny_checkpoint: Path, monkeypatch):
    import esci_reranker.hardware as hardware

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(hardware, "cpu_bf16_support", lambda native=native: (native, "test"))
        reranker = Reranker.from_pretrained(tiny_checkpoint, device="cpu", precision="auto")
        assert reranker.precision == expected == reranker.info()["precision"]


def test_unknown_precision_is_refused(tiny_checkpoint: Path):
    with pytest.raises(
        ValueError, match=r"precision='fp16'; expected 'auto' or one of \['fp32', 'bf16', 'int8'\]"
    ):
        Reranker.from_pretrained(tiny_checkpoint, precision="fp16")
    with pytest.raises(ValueError, match="precision='int8' runs on the CPU only, not on meta"):
        Reranker.from_pretrained(tiny_checkpoint, device="meta", precision="int8")


# --- every family through the one public object ----------------------------------------------------

#: Every kind of checkpoint ``train`` / ``distill`` writes, and whether it answers Tasks 2 and 3
#: (the single-task cross-encoder and the score student rank only: no classes by design).
FAMILIES = {
    "multi_task": ("esci-multitask", True),
    "single_task": ("esci-cross-encoder", False),
    "listwise": ("esci-listwise", True),
    "llm": ("esci-llm", True),
    "stacked": ("esci-multitask", True),
    "student-esci": ("esci-classifier", True),
    "student-score": ("esci-cross-encoder", False),
}
FAMILY_QUERIES = ("red running shoes", "usb c cable")
FAMILY_TEXTS = (
    ("nike trail running shoes | red", "shoe polish kit", "red running socks | nike", "anker usb c cable"),
    ("anker usb c cable | black", "usb c to hdmi adapter", "phone case"),
)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """``(family, checkpoint folder)``, each saved the way its producer saves it."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    if name == "multi_task":
        return name, request.getfixturevalue("tiny_checkpoint")
    if name == "single_task":
        return name, request.getfixturevalue("tiny_single_task_checkpoint")
    if name == "stacked":
        return name, request.getfixturevalue("tiny_stacked_checkpoint")
    if name == "listwise":
        model, tokenizer = build_tiny_model("esci-listwise")
        return name, save_checkpoint(model, tokenizer, root / "listwise")
    if name == "llm":
        pytest.importorskip("peft", reason="the llm extra is not installed")
        from esci_reranker.model import ModelConfig
        from esci_reranker.model.config import LLMSettings
        from esci_reranker.model.llm import build_llm
        from tests.model.tiny_llm import save_tiny_base

        base = save_tiny_base(root / "base")
        config = ModelConfig(model_type="esci-llm", max_length=128, llm=LLMSettings(base_model=str(base)))
        model, tokenizer = build_llm(config)
        return name, save_checkpoint(model, tokenizer, root / "llm")
    from esci_reranker.model.stock import save_stock  # the distilled students' format

    model_type, rank_score = (
        ("esci-classifier", "expected_gain")
        if name == "student-esci"
        else ("esci-cross-encoder", "regression")
    )
    model, tokenizer = build_tiny_model(
        model_type, pooling="cls", head_hidden=32, max_length=32, rank_score=rank_score
    )
    return name, save_stock(model, tokenizer, root / name)


def test_every_family_loads_and_answers_its_tasks_through_predict_and_rerank(family: tuple[str, Path]):
    name, folder = family
    model_type, three_tasks = FAMILIES[name]
    reranker = Reranker.from_pretrained(folder, device="cpu", batch_size=3)
    assert reranker.info()["model_type"] == model_type
    assert (reranker.stacker is not None) == (name == "stacked")

    # two queries' lists interleaved: results come back in input order, whatever the family
    pairs = [(q, t) for q, texts in zip(FAMILY_QUERIES, FAMILY_TEXTS, strict=True) for t in texts]
    order = np.random.default_rng(0).permutation(len(pairs))
    preds = reranker.predict([pairs[i] for i in order])
    assert len(preds) == len(pairs)
    assert np.isfinite(preds.scores).all()
    if three_tasks:  # Task 2: a class and its probabilities; Task 3: a probability and a decision
        assert set(preds.esci_classes) <= set("ESCI")
        np.testing.assert_allclose(preds.esci_probs.sum(axis=1), 1.0, atol=1e-5)
        assert ((preds.substitute_probs >= 0) & (preds.substitute_probs <= 1)).all()
        np.testing.assert_array_equal(
            preds.is_substitute, preds.substitute_probs >= preds.substitute_threshold
        )
    else:  # ranks only, and says so rather than inventing classes
        assert preds.esci_classes.tolist() == [""] * len(pairs)
        assert np.isnan(preds.esci_probs).all()
        assert np.isnan(preds.substitute_probs).all()

    # rerank is the same scoring path: one query's candidates, best first, same scores as predict
    query, texts = FAMILY_QUERIES[0], FAMILY_TEXTS[0]
    ranked = reranker.rerank(query, [(f"p{i}", t) for i, t in enumerate(texts)])
    assert [c.rank for c in ranked] == list(range(1, len(texts) + 1))
    assert [c.score for c in ranked] == sorted((c.score for c in ranked), reverse=True)
    by_pair = {pairs[i]: preds.scores[row] for row, i in enumerate(order)}
    for c in ranked:
        assert c.score == pytest.approx(by_pair[(query, texts[int(c.product_id[1:])])], abs=1e-4)
        if three_tasks:
            assert c.esci_class in ESCI_LABELS
            assert c.substitute_prob is not None
            assert 0.0 <= c.substitute_prob <= 1.0
            assert c.is_substitute == (c.substitute_prob >= preds.substitute_threshold)
        else:
            assert (c.esci_class, c.esci_probs, c.substitute_prob, c.is_substitute) == (
                None,
                None,
                None,
                None,
            )


@pytest.mark.parametrize("chunk_rows", [1, 37])
def test_score_parquet_gives_a_stacked_model_whole_lists_across_chunks(
    tiny_stacked_checkpoint: Path, tmp_path: Path, chunk_rows: int
):
    from esci_reranker.reranker import score_parquet

    frame = pd.read_parquet(SAMPLE_PARQUET)
    rows = frame[frame["query_id"].isin(frame["query_id"].drop_duplicates().iloc[:6])]
    rows.to_parquet(tmp_path / "pairs.parquet", index=False)
    reranker = Reranker.from_pretrained(tiny_stacked_checkpoint, device="cpu")
    assert score_parquet(
        reranker, tmp_path / "pairs.parquet", tmp_path / "one.parquet", progress=False
    ) == len(rows)
    written = score_parquet(
        reranker,
        tmp_path / "pairs.parquet",
        tmp_path / "chunks.parquet",
        chunk_rows=chunk_rows,
        progress=False,
    )
    assert written == len(rows)
    one, chunks = pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "chunks.parquet")
    # the same rows in the same order, each scored beside its whole list
    pd.testing.assert_frame_equal(chunks, one)
