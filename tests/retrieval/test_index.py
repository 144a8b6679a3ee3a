"""The catalogue index: round trip, streaming build, update/delete, and the retriever mismatch error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from esci_reranker.retrieval.encoder import DenseEncoder, IndexMismatchError, reuse_embeddings
from esci_reranker.retrieval.index import CatalogueIndex, CatalogueIndexError
from tests.retrieval.conftest import SAMPLE, small_catalogue


@pytest.fixture
def built(tmp_path: Path, catalogue_file: Path, tiny_retriever: Path) -> Path:
    out = tmp_path / "index"
    CatalogueIndex.build(catalogue_file, out, retriever=str(tiny_retriever), batch_rows=16)
    return out


def test_round_trip_manifest_products_and_retrieval(built: Path, tiny_retriever: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["counts"] == {
        "products": 82,
        "deleted": 0,
        "keys": 82,
        "segments": 1,
        "vocabulary": manifest["counts"]["vocabulary"],
    }
    assert manifest["retriever"]["name"] == str(tiny_retriever)
    assert manifest["retriever"]["dim"] == 32
    assert manifest["fields"] == ["title", "brand", "color"]
    assert manifest["ann"]["library"] == "usearch"
    assert manifest["bm25"]["library"] == "bm25s"

    index = CatalogueIndex.open(built)
    assert len(index) == 82
    # The made-up products are the last two rows: keys 80 and 81, fields as cleaned.
    assert index.products([81, 80]) == [
        {"product_id": "ZZ-2", "title": "Zebrawood cutting board", "brand": "Woodly", "color": ""},
        {"product_id": "ZZ-1", "title": "Quokkaphone wireless earbuds", "brand": "Acme", "color": "Teal"},
    ]
    # A word found in one product only: BM25 ranks it first and only it.
    hits = index.retrieve("quokkaphone", n=5, mode="bm25")
    assert [h.product_id for h in hits] == ["ZZ-1"]
    assert hits[0].sources == ("bm25",)
    assert hits[0].bm25_rank == 1
    assert hits[0].dense_rank is None
    # The exact product text embeds to the same vector: dense search ranks it first (cosine 1).
    dense = index.retrieve("Zebrawood cutting board | Woodly", n=3, mode="dense")
    assert dense[0].product_id == "ZZ-2"
    assert dense[0].score == pytest.approx(1.0, abs=2e-3)
    hybrid = index.retrieve("Zebrawood cutting board | Woodly", n=10)
    assert hybrid[0].product_id == "ZZ-2"
    assert hybrid[0].sources == ("bm25", "dense")
    assert len(hybrid) == 10
    assert len({h.key for h in hybrid}) == 10


def test_batch_size_does_not_change_the_index(
    tmp_path: Path, catalogue_file: Path, tiny_retriever: Path
) -> None:
    one = tmp_path / "one"
    many = tmp_path / "many"
    CatalogueIndex.build(catalogue_file, one, retriever=str(tiny_retriever), batch_rows=1000)
    CatalogueIndex.build(catalogue_file, many, retriever=str(tiny_retriever), batch_rows=7)
    a, b = CatalogueIndex.open(one), CatalogueIndex.open(many)
    for query in ("wireless earbuds", "silicone sealant clear", "cutting board"):
        ra, rb = a.retrieve(query, n=20), b.retrieve(query, n=20)
        assert [r.product_id for r in ra] == [r.product_id for r in rb]


def test_reused_embeddings_give_the_same_vectors_and_index(
    tmp_path: Path, catalogue_file: Path, tiny_retriever: Path, other_retriever: Path
) -> None:
    texts = ["ceramic coffee mug | Acme | Blue", "garden hose 50 ft", "usb c cable"]
    encoder = DenseEncoder.load(str(tiny_retriever))
    plain = encoder.encode(texts)
    fresh = tmp_path / "fresh"
    CatalogueIndex.build(catalogue_file, fresh, retriever=str(tiny_retriever))
    first, second = tmp_path / "first", tmp_path / "second"
    with reuse_embeddings(max_texts=1000) as memo:
        half = encoder.encode(texts[:2])
        both = encoder.encode([texts[2], texts[0], texts[2]])
        assert memo.hits == 1  # texts[0]; texts[2] is embedded once for both places
        np.testing.assert_allclose(half, plain[:2], atol=1e-6)
        np.testing.assert_allclose(both, plain[[2, 0, 2]], atol=1e-6)
        # bf16 and another retriever are other tables: nothing of the fp32 ones is served
        assert not np.array_equal(encoder.encode(texts[:1], precision="bf16"), plain[:1])
        other = DenseEncoder.load(str(other_retriever)).encode(texts[:1])
        assert not np.allclose(other, plain[:1], atol=1e-3)
        assert memo.hits == 1
        CatalogueIndex.build(catalogue_file, first, retriever=str(tiny_retriever))
        hits = memo.hits
        CatalogueIndex.build(catalogue_file, second, retriever=str(tiny_retriever))
        assert memo.hits - hits == CatalogueIndex.read_manifest(second)["counts"]["products"] + 4  # + probe
    assert len(memo) == len(texts) + 2 + CatalogueIndex.read_manifest(first)["counts"]["products"] + 4
    # outside the block nothing is kept
    encoder.encode(texts)
    assert memo.hits - hits == CatalogueIndex.read_manifest(second)["counts"]["products"] + 4
    for a, b in ((fresh, first), (first, second)):
        ia, ib = CatalogueIndex.open(a), CatalogueIndex.open(b)
        for query in ("wireless earbuds", "silicone sealant clear", "cutting board"):
            assert [r.product_id for r in ia.retrieve(query, n=20)] == [
                r.product_id for r in ib.retrieve(query, n=20)
            ]


def test_many_texts_embed_padding_free_as_sentence_transformers_does_and_feed_the_tower_cache(
    tiny_retriever: Path,
) -> None:
    """An index build's batches (``PADDING_FREE_MIN_TEXTS`` texts or more) skip the padding: the
    embeddings are sentence-transformers' own to float rounding; inside ``reuse_embeddings`` they
    go to the tower cache of these weights, which the bi-encoder baseline and the prior fits read."""
    from esci_reranker.model.tower_cache import weights_cache
    from esci_reranker.retrieval.encoder import PADDING_FREE_MIN_TEXTS

    frame = pd.read_parquet(SAMPLE)
    texts = list(dict.fromkeys(frame["product_title"].astype(str)))[: PADDING_FREE_MIN_TEXTS + 20]
    encoder = DenseEncoder.load(str(tiny_retriever))
    own = encoder._embed_own(texts, None, False)
    fast = encoder.encode(texts)
    assert encoder._unpadded is True  # the layout and the probe check let it through
    np.testing.assert_allclose(fast, own, atol=1e-5)
    cache = weights_cache(encoder.model[0].auto_model)
    cache.clear()
    with reuse_embeddings():
        fresh = DenseEncoder.load(str(tiny_retriever))
        np.testing.assert_allclose(fresh.encode(texts), own, atol=1e-5)
    transformer = encoder.model[0]
    ids = transformer.tokenizer(texts, truncation=True, max_length=transformer.max_seq_length)["input_ids"]
    assert cache.stats()["entries"] == len({tuple(row) for row in ids})  # one a distinct token sequence
    # a search's few texts take sentence-transformers' path, which fills no cache
    cache.clear()
    with reuse_embeddings():
        np.testing.assert_allclose(encoder.encode(texts[:3]), own[:3], atol=1e-5)
    assert cache.stats()["entries"] == 0


def test_the_memo_keeps_at_most_its_bound(tiny_retriever: Path) -> None:
    encoder = DenseEncoder.load(str(tiny_retriever))
    texts = [f"product {i}" for i in range(10)]
    with reuse_embeddings(max_texts=4) as memo:
        out = encoder.encode(texts)
        assert len(memo) == 4
        np.testing.assert_allclose(encoder.encode(texts), out, atol=1e-6)
        assert memo.hits == 4


def test_duplicates_and_empty_products_are_skipped(tmp_path: Path, tiny_retriever: Path) -> None:
    frame = pd.DataFrame(
        {
            "product_id": ["A", "B", "A", "C", ""],
            "title": ["first a", "bee", "second a", "", "no id"],
            "brand": ["x", "y", "z", "", "w"],
        }
    )
    path = tmp_path / "p.parquet"
    frame.to_parquet(path)
    stats = CatalogueIndex.build(path, tmp_path / "i", retriever=str(tiny_retriever))
    assert (stats.added, stats.duplicates_skipped, stats.empty_skipped) == (2, 1, 2)
    index = CatalogueIndex.open(tmp_path / "i")
    assert [p["title"] for p in index.products([0, 1])] == ["first a", "bee"]  # the first A wins


def _bm25_table(index: CatalogueIndex, query: str) -> dict[str, float]:
    keys, scores = index.bm25_search(query, 1000)
    ids = [p["product_id"] for p in index.products(keys)]
    return dict(zip(ids, np.round(scores, 4).tolist(), strict=True))


def test_update_replaces_adds_and_deletes_like_a_fresh_build(
    built: Path, tmp_path: Path, tiny_retriever: Path
) -> None:
    changes = pd.DataFrame(
        {
            "product_id": ["ZZ-1", "ZZ-3"],
            "product_title": ["Platypod bluetooth speaker", "Quokkaphone charging case"],
            "product_brand": ["Acme", "Acme"],
        }
    )
    changes_file = tmp_path / "changes.parquet"
    changes.to_parquet(changes_file)
    first_id = small_catalogue()["product_id"].iloc[0]
    stats = CatalogueIndex.update(built, changes_file, delete=[first_id, "NOPE"])
    assert (stats.added, stats.replaced, stats.deleted, stats.not_found) == (1, 1, 1, ["NOPE"])

    index = CatalogueIndex.open(built)
    manifest = index.manifest
    assert manifest["counts"]["products"] == 82
    assert manifest["counts"]["deleted"] == 2
    assert [s["rows"] for s in manifest["segments"]] == [82, 2]
    # The replaced product answers to its new words only; the new one is found; the deleted one is gone.
    assert [h.product_id for h in index.retrieve("platypod", 5, mode="bm25")] == ["ZZ-1"]
    assert [h.product_id for h in index.retrieve("quokkaphone", 5, mode="bm25")] == ["ZZ-3"]
    all_dense = index.retrieve("anything at all", 200, mode="dense")
    assert len(all_dense) == 82
    assert first_id not in {h.product_id for h in all_dense}
    assert index.retrieve("Platypod bluetooth speaker | Acme", 1, mode="dense")[0].product_id == "ZZ-1"

    # BM25 statistics are those of the live catalogue: equal to a fresh build of it.
    fresh_frame = small_catalogue()
    fresh_frame = fresh_frame[fresh_frame["product_id"] != first_id]
    fresh_frame = pd.concat([fresh_frame[fresh_frame["product_id"] != "ZZ-1"], changes], ignore_index=True)
    fresh_file = tmp_path / "fresh.parquet"
    fresh_frame.to_parquet(fresh_file)
    CatalogueIndex.build(fresh_file, tmp_path / "fresh", retriever=str(tiny_retriever))
    fresh = CatalogueIndex.open(tmp_path / "fresh")
    for query in ("wireless earbuds", "quokkaphone case", "clear silicone"):
        assert _bm25_table(index, query) == _bm25_table(fresh, query)


def test_delete_only_update_and_a_second_update(built: Path, tmp_path: Path) -> None:
    CatalogueIndex.update(built, delete=["ZZ-2"])
    index = CatalogueIndex.open(built)
    assert len(index) == 81
    assert index.retrieve("zebrawood", 5, mode="bm25") == []
    again = pd.DataFrame({"product_id": ["ZZ-2"], "title": ["Zebrawood serving tray"]})
    again.to_parquet(tmp_path / "again.parquet")
    stats = CatalogueIndex.update(built, tmp_path / "again.parquet")
    assert (stats.added, stats.replaced) == (1, 0)  # deleted before, so it comes back as new
    index = CatalogueIndex.open(built)
    assert [h.product_id for h in index.retrieve("zebrawood tray", 5, mode="bm25")] == ["ZZ-2"]
    assert index.products([82]) == [
        {"product_id": "ZZ-2", "title": "Zebrawood serving tray", "brand": "", "color": ""}
    ]


def test_bf16_embedding_keeps_the_fp32_probe_and_records_precisions(
    built: Path, tmp_path: Path, catalogue_file: Path, tiny_retriever: Path
) -> None:
    half = tmp_path / "bf16"
    CatalogueIndex.build(catalogue_file, half, retriever=str(tiny_retriever), precision="bf16")
    fp32_manifest = json.loads((built / "manifest.json").read_text())
    manifest = json.loads((half / "manifest.json").read_text())
    assert fp32_manifest["retriever"]["precisions"] == ["fp32"]
    assert manifest["retriever"]["precisions"] == ["bf16"]
    # The probe names the model, not the precision: both indexes carry the same fp32 probe, and
    # an fp32 query encoder opens the bf16-built index.
    assert manifest["retriever"]["probe"] == fp32_manifest["retriever"]["probe"]
    index = CatalogueIndex.open(half)
    assert index.encoder.precision == "fp32"
    # Product vectors embedded in bf16 are close to fp32 ones, and not the same numbers.
    encoder = DenseEncoder.load(str(tiny_retriever))
    texts = ["Zebrawood cutting board | Woodly", "Quokkaphone wireless earbuds | Acme | Teal"]
    full, reduced = encoder.encode(texts), encoder.encode(texts, precision="bf16")
    cosine = np.einsum("nd,nd->n", full, reduced)
    assert cosine.min() > 0.99
    assert not np.array_equal(full, reduced)
    assert index.retrieve(texts[0], 1, mode="dense")[0].product_id == "ZZ-2"
    # An update in another precision is recorded beside the first.
    pd.DataFrame({"product_id": ["ZZ-9"], "title": ["Wombat desk lamp"]}).to_parquet(tmp_path / "u.parquet")
    CatalogueIndex.update(half, tmp_path / "u.parquet", precision="fp32")
    assert CatalogueIndex.read_manifest(half)["retriever"]["precisions"] == ["bf16", "fp32"]
    with pytest.raises(ValueError, match=r"embedding precision 'int8'.*reranker"):
        DenseEncoder.load(str(tiny_retriever), precision="int8")


def test_mismatched_retriever_is_refused(built: Path, other_retriever: Path, wide_retriever: Path) -> None:
    with pytest.raises(IndexMismatchError, match=r"embeds text differently \(probe cosine") as err:
        CatalogueIndex.open(built, retriever=str(other_retriever))
    assert str(other_retriever) in str(err.value)
    assert "--retriever" in str(err.value)
    with pytest.raises(IndexMismatchError, match=r"holds 32-dimensional vectors .* makes 48-dimensional"):
        CatalogueIndex.open(built, retriever=str(wide_retriever))
    with pytest.raises(IndexMismatchError):
        CatalogueIndex.update(built, delete=["ZZ-1"], retriever=str(other_retriever))
    # Nothing was changed by the refused update.
    assert len(CatalogueIndex.open(built)) == 82


def test_same_retriever_loaded_elsewhere_is_accepted(
    built: Path, tiny_retriever: Path, tmp_path: Path
) -> None:
    import shutil

    moved = tmp_path / "moved-retriever"
    shutil.copytree(tiny_retriever, moved)
    index = CatalogueIndex.open(built, retriever=DenseEncoder.load(moved))
    assert index.retrieve("quokkaphone", 1)[0].product_id == "ZZ-1"


def test_missing_index_and_bad_inputs(tmp_path: Path, tiny_retriever: Path) -> None:
    with pytest.raises(CatalogueIndexError, match="no catalogue index here"):
        CatalogueIndex.open(tmp_path)
    with pytest.raises(CatalogueIndexError, match="products file not found"):
        CatalogueIndex.build(tmp_path / "nope.parquet", tmp_path / "i", retriever=str(tiny_retriever))
    pd.DataFrame({"id": ["a"], "title": ["t"]}).to_parquet(tmp_path / "noid.parquet")
    with pytest.raises(CatalogueIndexError, match="no 'product_id' column"):
        CatalogueIndex.build(tmp_path / "noid.parquet", tmp_path / "i", retriever=str(tiny_retriever))
    assert not (tmp_path / "i").exists()  # a failed build leaves nothing behind
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(
        json.dumps({"format": "esci-reranker catalogue index", "version": 99})
    )
    with pytest.raises(CatalogueIndexError, match="version 99"):
        CatalogueIndex.open(tmp_path / "old")


def test_retrieve_validates_arguments(built: Path) -> None:
    index = CatalogueIndex.open(built)
    with pytest.raises(ValueError, match="non-empty"):
        index.retrieve("  ", 5)
    with pytest.raises(ValueError, match="n=0"):
        index.retrieve("earbuds", 0)
    with pytest.raises(ValueError, match="mode='sparse'"):
        index.retrieve("earbuds", 5, mode="sparse")


def test_retrieve_keys_ranks_as_retrieve_for_many_queries(built: Path) -> None:
    """The batched, fields-free retrieval mining uses gives each query the list ``retrieve``
    gives it, in every mode and across batch boundaries; ``product_ids`` names the keys."""
    index = CatalogueIndex.open(built)
    queries = ["wireless earbuds", "quokkaphone", "Zebrawood cutting board | Woodly", "usb cable", "shoes"]
    for mode in ("hybrid", "bm25", "dense"):
        lists = index.retrieve_keys(queries, n=12, mode=mode, batch_size=2)
        assert len(lists) == len(queries)
        for query, keys in zip(queries, lists, strict=True):
            hits = index.retrieve(query, n=12, mode=mode)
            assert keys.tolist() == [h.key for h in hits], (mode, query)
            assert index.product_ids(keys) == [h.product_id for h in hits]
    assert index.retrieve_keys(["quokkaphone"], n=5, mode="bm25")[0].tolist() == [80]
    assert index.product_ids([81, 80, 81]) == ["ZZ-2", "ZZ-1", "ZZ-2"]
    assert index.product_ids([]) == []
    with pytest.raises(ValueError, match=r"queries\[1\]"):
        index.retrieve_keys(["earbuds", " "], n=5)
    with pytest.raises(ValueError, match="n=0"):
        index.retrieve_keys(["earbuds"], n=0)


def test_the_sample_index_retrieves_the_same_in_every_build(tmp_path: Path, tiny_retriever: Path) -> None:
    """Its graph is built on one thread, so a query retrieves the same products from two builds
    of the sample (the main job's search-flow figures then depend on the model alone)."""
    from esci_reranker.retrieval.sample import build_sample_index

    first = CatalogueIndex.open(build_sample_index(tmp_path / "a", retriever=tiny_retriever))
    second = CatalogueIndex.open(build_sample_index(tmp_path / "b", retriever=tiny_retriever))
    queries = [
        "womens running shoes without laces",
        "usb c cable",
        "coffee beans",
        "kids toys",
        "iphone case",
    ]
    for query in queries:
        a, b = first.retrieve(query, 100), second.retrieve(query, 100)
        assert len(a) == 100
        assert [r.product_id for r in a] == [r.product_id for r in b]
