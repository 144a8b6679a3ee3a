"""Baselines on a small hand-written split: run format, BM25 and bi-encoder put the obvious match first."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esci_reranker.eval.baselines import (
    baseline_texts,
    bi_encoder_run,
    bm25_run,
    bm25_scores,
    parse_baselines,
    random_run,
    run_baseline,
)
from esci_reranker.eval.evaluator import evaluate_run
from esci_reranker.model.lexical import word_tokens

RUN_COLUMNS = ["query_id", "product_id", "esci_label", "esci_query_source", "score"]


def top_labels(run: pd.DataFrame) -> dict[int, str]:
    """The true label of each query's top-scored candidate."""
    best = run.sort_values(["query_id", "score"], ascending=[True, False]).groupby("query_id").head(1)
    return dict(zip(best["query_id"], best["esci_label"], strict=True))


def test_random_run_format_and_seeds(split: pd.DataFrame) -> None:
    run = random_run(split, seed=3)
    assert list(run.columns) == RUN_COLUMNS
    assert run["product_id"].tolist() == split["product_id"].tolist()
    np.testing.assert_array_equal(run["score"], random_run(split, seed=3)["score"])
    assert not np.array_equal(run["score"], random_run(split, seed=4)["score"])


def test_random_baseline_is_the_mean_over_seeds(split: pd.DataFrame) -> None:
    result = run_baseline("random", split, seeds=3)
    per_seed = [evaluate_run(random_run(split, s))["task1"]["ndcg"] for s in range(3)]
    assert result.metrics["task1"]["ndcg"] == pytest.approx(np.mean(per_seed))
    assert result.metrics["task1_std"]["ndcg"] == pytest.approx(np.std(per_seed))
    assert result.metrics["num_seeds"] == 3
    assert result.metrics["name"] == "random"
    pd.testing.assert_frame_equal(result.run, random_run(split, 0))


def test_bm25_puts_the_obvious_match_first(split: pd.DataFrame) -> None:
    run = bm25_run(split)
    assert list(run.columns) == RUN_COLUMNS
    assert top_labels(run) == {101: "E", 102: "E", 103: "E"}
    # A product sharing no query word scores 0.
    assert run.loc[run["product_id"] == "B021", "score"].item() == 0.0
    assert run_baseline("bm25", split).metrics["task1"]["mrr"] == 1.0


def test_bm25_tokens_and_empty_inputs() -> None:
    assert word_tokens("The RED shoes, for running!") == ["red", "shoes", "running"]
    assert bm25_scores("", ["red shoes", "blue"]).tolist() == [0.0, 0.0]
    assert bm25_scores("the of", ["red shoes"]).tolist() == [0.0]  # only stopwords
    assert bm25_scores("red", ["", ""]).tolist() == [0.0, 0.0]
    scores = bm25_scores("red shoes", ["red shoes", "blue hat", ""])
    assert scores[0] > 0
    assert scores[1] == scores[2] == 0.0


def test_bm25_handles_empty_query_and_categoricals(split: pd.DataFrame) -> None:
    split.loc[split["query_id"] == 101, "query"] = None
    split["query"] = split["query"].astype("category")
    run = bm25_run(split)
    assert (run.loc[run["query_id"] == 101, "score"] == 0.0).all()


def test_baseline_texts_precedence(split: pd.DataFrame) -> None:
    assert baseline_texts(split).tolist() == split["product_text"].tolist()
    assert baseline_texts(split, ["title"]).tolist() == split["product_title"].tolist()
    assert baseline_texts(split.drop(columns="product_text"))[0] == "Red Running Shoes for Men | Nike | red"
    with pytest.raises(ValueError, match="neither 'product_text'"):
        baseline_texts(split[["query_id", "query", "product_id", "esci_label"]])


def test_missing_columns_and_bad_names(split: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match=r"bm25 baseline: the data is missing column\(s\) \['query'\]"):
        bm25_run(split.drop(columns="query"))
    with pytest.raises(ValueError, match="unknown"):
        run_baseline("tfidf", split)
    with pytest.raises(ValueError, match="seeds=0"):
        run_baseline("random", split, seeds=0)
    assert parse_baselines("bm25, random") == ("random", "bm25")
    assert parse_baselines("none") == ()
    with pytest.raises(ValueError, match="unknown"):
        parse_baselines("random,splade")


@pytest.mark.slow
def test_bi_encoder_on_the_packaged_model(split: pd.DataFrame) -> None:
    # The split twice under other query ids: same query and text must give the same cosine,
    # which also holds because each distinct text is encoded once and reused.
    doubled = pd.concat([split, split.assign(query_id=split["query_id"] + 1000)], ignore_index=True)
    run = bi_encoder_run(doubled, batch_size=4, device="cpu")
    assert list(run.columns) == RUN_COLUMNS
    assert top_labels(run) == {101: "E", 102: "E", 103: "E", 1101: "E", 1102: "E", 1103: "E"}
    assert run["score"].between(-1.0 - 1e-6, 1.0 + 1e-6).all()
    scores = run["score"].to_numpy()
    np.testing.assert_allclose(scores[: len(split)], scores[len(split) :], atol=1e-6)
    assert len(np.unique(np.round(scores[: len(split)], 6))) == len(split)


def test_bi_encoder_runs_share_the_embeddings_of_their_weights(split: pd.DataFrame, tiny_backbone) -> None:
    from transformers import AutoModel

    from esci_reranker.model.tower_cache import weights_cache

    plain = bi_encoder_run(split, model_path=tiny_backbone, batch_size=3, device="cpu", shared_cache=False)
    cache = weights_cache(AutoModel.from_pretrained(tiny_backbone))
    before = cache.stats()
    first = bi_encoder_run(split, model_path=tiny_backbone, batch_size=3, device="cpu")
    texts = split["query"].nunique() + baseline_texts(split).nunique()
    assert cache.stats()["misses"] - before["misses"] <= texts  # each text encoded at most once
    after_first = cache.stats()
    # another split with the same texts (e.g. the test split's products seen by an earlier run)
    second = bi_encoder_run(
        split.assign(query_id=split["query_id"] + 7), model_path=tiny_backbone, device="cpu"
    )
    assert cache.stats()["misses"] == after_first["misses"]
    assert cache.stats()["hits"] - after_first["hits"] == texts
    np.testing.assert_allclose(first["score"], plain["score"], atol=1e-6)
    np.testing.assert_allclose(second["score"], plain["score"], atol=1e-6)


def test_bi_encoder_embeddings_are_the_encoders_own_when_run_padding_free(
    split: pd.DataFrame, tiny_backbone, monkeypatch
) -> None:
    """On a CPU the baseline encodes padding-free; its embeddings are those of the encoder's own
    padded forward, and an encoder that the padding-free path refuses runs as it is."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from esci_reranker.eval import baselines
    from esci_reranker.model.unpadded import UnpaddedEncoder

    calls: list[int] = []
    unpadded_call = UnpaddedEncoder.__call__

    def spy(self, batches):
        calls.append(len(batches))
        return unpadded_call(self, batches)

    monkeypatch.setattr(UnpaddedEncoder, "__call__", spy)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    model = AutoModel.from_pretrained(tiny_backbone).eval()
    texts = [*split["query"].unique(), *baseline_texts(split).unique()]
    probe = texts[:8]
    forward = baselines._forward(model, tokenizer, torch.device("cpu"), probe, 64)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        own = model(**batch).last_hidden_state
        ours = forward(batch)
    real = batch["attention_mask"].bool()
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # some padding
    torch.testing.assert_close(ours[real], own[real], atol=1e-5, rtol=0)
    assert ours[~real].abs().max() == 0  # the padded positions carry nothing
    assert calls  # the padding-free path ran, not the module's own forward

    class NotBert(torch.nn.Module):  # no BERT layers: refused, and the plain forward serves
        def forward(self, **batch):
            return model(**batch)

    plain = baselines._forward(NotBert(), tokenizer, torch.device("cpu"), probe, 64)
    calls.clear()
    with torch.inference_mode():
        torch.testing.assert_close(plain(batch), own)
    assert not calls
    embeddings = baselines.encode(texts, tokenizer, model, torch.device("cpu"), 5, 64)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((own * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(embeddings, pooled, atol=1e-5)
