"""One behaviour everywhere: the same query and candidate list gives every product the same E/S/C/I
label and substitute flag from ``Reranker.rerank``, ``/rerank``, ``/classify``, ``/substitute``,
``/predict``, ``/search`` (what the page shows) and the Cohere routes ``/v1/rerank`` and
``/v2/rerank``, with a tiny stacked model (whose list features read the whole list), on the
batched and the direct scoring paths."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from esci_reranker.reranker import Reranker
from tests.serve.conftest import MakeClient
from tests.serve.helpers import stacked_with_mixed_labels

QUERY = "quokkaphone wireless earbuds"
#: The whole tiny catalogue would do as well; 30 keeps the test quick and still mixes classes.
LIST_SIZE = 30


@pytest.fixture(scope="module")
def stacked_reranker(tiny_stacked_checkpoint: Path, tiny_index: Path) -> Reranker:
    return stacked_with_mixed_labels(tiny_stacked_checkpoint, tiny_index, QUERY, LIST_SIZE)


def _ready(client: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/ready").json()["index_status"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.1)


def _post(client: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == 200, f"{path}: {response.text}"
    return response.json()


def _service_labels(client: Any, candidates: list[dict[str, str]]) -> dict[str, dict[str, tuple]]:
    """Each scoring route's (class, substitute flag) per product id for one candidate list."""
    body = {"query": QUERY, "candidates": candidates}
    rerank = _post(client, "/rerank", body)["ranked"]
    predict = _post(client, "/predict", body)["ranked"]
    classify = _post(client, "/classify", body)["results"]
    substitute = {r["product_id"]: r["is_substitute"] for r in _post(client, "/substitute", body)["results"]}
    return {
        "/rerank": {r["product_id"]: (r["esci_class"], r["is_substitute"]) for r in rerank},
        "/predict": {r["product_id"]: (r["esci_class"], r["is_substitute"]) for r in predict},
        "/classify+/substitute": {
            r["product_id"]: (r["esci_class"], substitute[r["product_id"]]) for r in classify
        },
    }


def _library_labels(reranker: Reranker, candidates: list[Any]) -> dict[str, tuple]:
    return {c.product_id: (c.esci_class, c.is_substitute) for c in reranker.rerank(QUERY, candidates)}


@pytest.mark.parametrize("batch_wait_ms", [2.0, 0.0], ids=["batched", "direct"])
def test_every_path_labels_a_product_alike(
    make_client: MakeClient, stacked_reranker: Reranker, tiny_index: Path, batch_wait_ms: float
) -> None:
    # No response cache: every route runs the model itself.
    client = make_client(
        reranker=stacked_reranker, index_path=str(tiny_index), batch_wait_ms=batch_wait_ms, cache_size=0
    )
    _ready(client)

    # The list /search scores: the products it retrieves, as its index stores them.
    found = _post(client, "/search", {"query": QUERY, "candidates": LIST_SIZE, "top_k": LIST_SIZE})["results"]
    assert len(found) == LIST_SIZE
    by_search = {r["product_id"]: (r["esci_class"], r["is_substitute"]) for r in found}
    fields = [
        {"product_id": r["product_id"], **{k: r[k] for k in ("title", "brand", "color") if r[k]}}
        for r in found
    ]
    # The same list in another order: a list is its products, not their order.
    random.Random(0).shuffle(fields)

    expected = _library_labels(stacked_reranker, fields)
    assert by_search == expected, "/search"
    for route, labels in _service_labels(client, fields).items():
        assert labels == expected, route

    # The check can fail: both classes and both flags occur, and the cross-encoder's own labels (a
    # path that skipped the stacker) differ.
    assert {label for label, _ in expected.values()} == {"E", "I"}
    assert {flag for _, flag in expected.values()} == {True, False}
    alone = Reranker.from_pretrained(stacked_reranker.name, device="cpu", stacked=False)
    assert _library_labels(alone, fields) != expected

    # The same products as plain text (HTML and extra spaces included, which every path cleans
    # alike), through the routes that take text and the Cohere-compatible ones.
    texts = [stacked_reranker.text_of(f).replace(" ", "  ", 1) + " &amp; <b>new</b>" for f in fields]
    ids = [f["product_id"] for f in fields]
    text_candidates = [{"product_id": i, "text": t} for i, t in zip(ids, texts, strict=True)]
    expected_text = _library_labels(stacked_reranker, list(zip(ids, texts, strict=True)))
    assert _library_labels(stacked_reranker, text_candidates) == expected_text
    for route, labels in _service_labels(client, text_candidates).items():
        assert labels == expected_text, f"{route} (text)"
    v1 = _post(client, "/v1/rerank", {"query": QUERY, "documents": texts})["results"]
    v2 = _post(client, "/v2/rerank", {"model": "m", "query": QUERY, "documents": texts})["results"]
    for route, results in (("/v1/rerank", v1), ("/v2/rerank", v2)):
        assert {ids[r["index"]]: (r["esci_class"], r["is_substitute"]) for r in results} == expected_text, (
            route
        )
    # And the scores agree too.
    scores = {
        c.product_id: c.score for c in stacked_reranker.rerank(QUERY, list(zip(ids, texts, strict=True)))
    }
    ranked = _post(client, "/rerank", {"query": QUERY, "candidates": text_candidates})["ranked"]
    assert {r["product_id"]: r["score"] for r in ranked} == pytest.approx(scores, abs=1e-5)
    for results in (v1, v2):
        assert {ids[r["index"]]: r["relevance_score"] for r in results} == pytest.approx(scores, abs=1e-5)
