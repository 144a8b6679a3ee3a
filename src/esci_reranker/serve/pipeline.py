"""Steps the scoring routes share: limits, candidate texts, scoring off the event loop, stats."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from fastapi import Request

from esci_reranker.reranker import Predictions
from esci_reranker.serve.errors import ApiError
from esci_reranker.serve.schemas import Candidate, Stats
from esci_reranker.serve.scoring import Scorer, ScoreResult
from esci_reranker.serve.settings import Settings


def check_count(count: int, settings: Settings, what: str = "candidates") -> None:
    """413 when a request has more than ``MAX_CANDIDATES`` items."""
    if count > settings.max_candidates:
        raise ApiError(
            413,
            f"{count} {what} in one request; the limit is MAX_CANDIDATES={settings.max_candidates}. "
            "Split the request or pre-filter the candidates.",
        )


def check_length(text: str, settings: Settings, where: str) -> None:
    """422 when ``text`` is longer than ``MAX_TEXT_CHARS``; ``where`` names it in the message."""
    if len(text) > settings.max_text_chars:
        raise ApiError(
            422,
            f"{where} is {len(text)} characters; the limit is MAX_TEXT_CHARS={settings.max_text_chars}. "
            "Send a shorter text (the model reads only its first few hundred tokens anyway).",
        )


def candidate_texts(candidates: Sequence[Candidate], scorer: Scorer, settings: Settings) -> list[str]:
    """The model text of every candidate, after the count and length limits; 422 on empty text."""
    check_count(len(candidates), settings)
    texts = []
    for index, candidate in enumerate(candidates):
        record = candidate.record()
        for field, value in record.items():
            check_length(
                value, settings, f"candidates[{index}] (product_id {candidate.product_id!r}) field '{field}'"
            )
        text = scorer.text_of(record)
        if not text.strip():
            fields = scorer.reranker.config.text_fields
            raise ApiError(
                422,
                f"candidates[{index}] (product_id {candidate.product_id!r}) has no product text after cleaning: "
                f"send a non-empty 'text' or one of the fields this model reads ({', '.join(fields)}).",
            )
        texts.append(text)
    return texts


async def score(
    scorer: Scorer, query: str, texts: list[str], records: Sequence[Mapping[str, Any]] | None = None
) -> ScoreResult:
    """``scorer.score_async``: the model runs off the event loop, which keeps serving other requests.

    ``records`` (the candidates' fields) reach a stacked model's features; see ``Scorer.score``.
    """
    return await scorer.score_async(query, texts, records)


def ranking(scores: np.ndarray, top_k: int | None) -> np.ndarray:
    """Indices by descending score (ties keep request order), cut to ``top_k``."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return order[: min(top_k, len(order))] if top_k is not None else order


def label(predictions: Predictions, i: int, multi_task: bool) -> tuple[str | None, bool | None]:
    """Candidate ``i``'s E/S/C/I class and substitute decision, as every endpoint reports them
    (``(None, None)`` for a single-task model; no decision where the probability is not finite).

    One function, so a product gets the same label from ``/rerank``, ``/predict``, ``/search`` and
    the Cohere routes as from ``/classify`` and ``/substitute`` for the same list.
    """
    if not multi_task:
        return None, None
    flag = bool(predictions.is_substitute[i]) if finite(predictions.substitute_probs[i]) is not None else None
    return str(predictions.esci_classes[i]), flag


@dataclass(frozen=True)
class RankedCandidate:
    """One candidate of a ranked response: its position in the request, its ranking score and the
    labels every endpoint reports for it (``substitute_prob`` is None for a single-task model or a
    probability that is not finite)."""

    index: int
    score: float
    esci_class: str | None
    is_substitute: bool | None
    substitute_prob: float | None


def ranked(predictions: Predictions, top_k: int | None, multi_task: bool) -> list[RankedCandidate]:
    """The candidates in ``ranking`` order, each with ``label``'s class and decision: what
    ``/rerank``, ``/predict`` and the Cohere routes list, so all of them rank and label alike."""
    return [
        RankedCandidate(
            int(i),
            float(predictions.scores[i]),
            *label(predictions, i, multi_task),
            finite(predictions.substitute_probs[i]) if multi_task else None,
        )
        for i in ranking(predictions.scores, top_k)
    ]


def finite(value: float) -> float | None:
    """``value`` as a float, or None when it is NaN/inf (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def build_stats(request: Request, scorer: Scorer, result: ScoreResult, num_results: int) -> Stats:
    """The ``stats`` block of a scoring response."""
    scores = result.predictions.scores
    started = getattr(request.state, "started", None)
    total_ms = (time.perf_counter() - started) * 1000.0 if started is not None else result.forward_ms
    return Stats(
        total_latency_ms=round(total_ms, 3),
        model_forward_time_ms=round(result.forward_ms, 3),
        num_candidates=len(scores),
        num_results=num_results,
        num_truncated=int(np.count_nonzero(result.predictions.truncated)),
        device=scorer.device,
        top_score=finite(np.max(scores)) if len(scores) else None,
        avg_score=finite(np.mean(scores)) if len(scores) else None,
        cache_hit=result.cache_hit,
        timestamp=datetime.now(UTC),
    )


def request_id(request: Request) -> str:
    return str(request.state.request_id)
