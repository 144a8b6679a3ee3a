"""Searcher: retrieve then rerank through the Reranker's public API; rank_hits on hand-made predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from esci_reranker.reranker import Predictions, Reranker
from esci_reranker.retrieval.index import CatalogueIndex, Retrieved
from esci_reranker.retrieval.search import Searcher, rank_hits


def _retrieved(n: int) -> list[Retrieved]:
    return [
        Retrieved(
            key=i,
            product_id=f"p{i}",
            fields={"title": f"t{i}"},
            score=1.0 - i / 10,
            bm25_rank=i + 1,
            dense_rank=None,
        )
        for i in range(n)
    ]


def _predictions(scores: list[float], classes: list[str], subs: list[float]) -> Predictions:
    n = len(scores)
    s = np.asarray(scores, dtype=np.float32)
    return Predictions(
        scores=s,
        regression_scores=s,
        expected_gains=s,
        esci_classes=np.asarray(classes),
        # row i: (0.4 + i/100, 0.3, 0.2, 0.1 - i/100), so each hit's probabilities are its own
        esci_probs=np.asarray([[0.4 + i / 100, 0.3, 0.2, 0.1 - i / 100] for i in range(n)], dtype=np.float32),
        substitute_probs=np.asarray(subs, dtype=np.float32),
        truncated=np.zeros(n, bool),
    )


def test_rank_hits_orders_by_the_model_and_flags_substitutes() -> None:
    items = _retrieved(4)
    preds = _predictions([0.1, 0.9, 0.5, 0.9], ["I", "E", "S", "C"], [0.2, 0.6, 0.5, float("nan")])
    hits = rank_hits(items, top_k=3, predictions=preds)
    # 0.9 ties keep the retrieval order (p1 before p3); then p2.
    assert [h.product_id for h in hits] == ["p1", "p3", "p2"]
    assert [h.rank for h in hits] == [1, 2, 3]
    assert [h.esci_class for h in hits] == ["E", "C", "S"]
    assert [h.is_substitute for h in hits] == [True, None, True]  # NaN probability: no decision
    assert hits[1].esci_probs == pytest.approx((0.43, 0.3, 0.2, 0.07))  # p3's row
    assert hits[0].score == pytest.approx(0.9)
    assert hits[0].retrieval_score == pytest.approx(0.9)
    assert hits[0].sources == ("bm25",)
    assert hits[0].title == "t1"
    plain = rank_hits(items, top_k=2)
    assert [h.product_id for h in plain] == ["p0", "p1"]
    assert plain[0].esci_class is None
    assert plain[0].esci_probs is None
    assert plain[0].score == pytest.approx(1.0)
    with pytest.raises(ValueError, match="3 predictions for 4 candidates"):
        rank_hits(items, 2, _predictions([1, 2, 3], ["E"] * 3, [0, 0, 0]))


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory, tiny_retriever: Path) -> CatalogueIndex:
    from tests.retrieval.conftest import small_catalogue

    folder = tmp_path_factory.mktemp("searcher")
    small_catalogue().to_parquet(folder / "p.parquet", index=False)
    CatalogueIndex.build(folder / "p.parquet", folder / "index", retriever=str(tiny_retriever))
    return CatalogueIndex.open(folder / "index")


def test_searcher_reranks_the_retrieved_candidates(index: CatalogueIndex, tiny_checkpoint: Path) -> None:
    reranker = Reranker.from_pretrained(tiny_checkpoint, device="cpu")
    searcher = Searcher(index, reranker)
    result = searcher.search("wireless earbuds", top_k=5, candidates=20)
    retrieved = index.retrieve("wireless earbuds", 20)
    assert result.reranked
    assert result.num_candidates == 20
    assert len(result.hits) == 5
    # The order is the reranker's own over the same candidates.
    expected = reranker.rerank(
        "wireless earbuds", [{"product_id": r.product_id, **r.fields} for r in retrieved], top_k=5
    )
    assert [h.product_id for h in result.hits] == [c.product_id for c in expected]
    assert [h.esci_class for h in result.hits] == [c.esci_class for c in expected]
    assert [h.score for h in result.hits] == pytest.approx([c.score for c in expected], abs=1e-5)
    plain = searcher.search("wireless earbuds", top_k=5, candidates=20, rerank=False)
    assert [h.product_id for h in plain.hits] == [r.product_id for r in retrieved[:5]]
    assert not plain.reranked
    assert "rerank" not in plain.timings_ms
    with pytest.raises(ValueError, match="candidates=3; expected an integer >= top_k"):
        searcher.search("earbuds", top_k=5, candidates=3)
    with pytest.raises(ValueError, match="top_k=0"):
        searcher.search("earbuds", top_k=0)


def test_searcher_refuses_a_reranker_reading_fields_the_index_lacks(
    index: CatalogueIndex, tiny_checkpoint: Path
) -> None:
    reranker = Reranker.from_pretrained(tiny_checkpoint, device="cpu")
    reranker.config.text_fields = ("title", "bullets")
    with pytest.raises(ValueError, match=r"reads the product field\(s\) \['bullets'\].*--store-fields"):
        Searcher(index, reranker)
