"""The three ESCI tasks over HTTP: ``/rerank`` (Task 1), ``/classify`` (Task 2), ``/substitute``
(Task 3) and ``/predict`` (all three). All share one model call per request through the cache.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import APIRouter, Request

from esci_reranker.labels import ESCI_LABELS
from esci_reranker.serve import pipeline
from esci_reranker.serve.deps import ScorerDep, SettingsDep
from esci_reranker.serve.errors import ERROR_RESPONSES, ApiError, ErrorResponse
from esci_reranker.serve.schemas import (
    ClassifiedProduct,
    ClassifyResponse,
    EsciProbabilities,
    PredictedProduct,
    PredictResponse,
    RankedProduct,
    RerankResponse,
    ScoringRequest,
    SubstituteProduct,
    SubstituteResponse,
)
from esci_reranker.serve.scoring import Scorer, ScoreResult

router = APIRouter(tags=["scoring"], responses=ERROR_RESPONSES)

_Response = TypeVar("_Response", ClassifyResponse, SubstituteResponse)

_SINGLE_TASK: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "The loaded model is single-task (no Task 2/3 heads)."}
}


def _require_multi_task(scorer: Scorer, task: str) -> None:
    if not scorer.multi_task:
        raise ApiError(
            409,
            f"the loaded model ({scorer.model_id}) is single-task: it has no {task} head. "
            "Use POST /rerank or /predict, or serve a multi-task checkpoint.",
        )


async def _score(
    request: Request, body: ScoringRequest, scorer: Scorer, settings: SettingsDep
) -> ScoreResult:
    request.state.num_candidates = len(body.candidates)  # for the access log, also when rejected
    pipeline.check_length(body.query, settings, "query")
    texts = pipeline.candidate_texts(body.candidates, scorer, settings)
    records = [c.record() for c in body.candidates] if scorer.stacked else None
    return await pipeline.score(scorer, body.query, texts, records)


def _in_request_order(
    response: type[_Response], request: Request, scorer: Scorer, result: ScoreResult, results: list[Any]
) -> _Response:
    """A Task 2 or Task 3 response: one result per candidate in request order, the request id, the stats."""
    return response(
        request_id=pipeline.request_id(request),
        results=results,
        stats=pipeline.build_stats(request, scorer, result, len(results)),
    )


def _ranked_products(body: ScoringRequest, result: ScoreResult, scorer: Scorer) -> list[PredictedProduct]:
    """The candidates by score, best first, cut to ``top_k``, as ``/predict`` lists them; ``/rerank``
    lists the same products without ``substitute_prob``."""
    return [
        PredictedProduct(
            product_id=body.candidates[c.index].product_id,
            score=c.score,
            esci_class=c.esci_class,  # type: ignore[arg-type]
            is_substitute=c.is_substitute,
            substitute_prob=c.substitute_prob,
        )
        for c in pipeline.ranked(result.predictions, body.top_k, scorer.multi_task)
    ]


@router.post("/rerank", summary="Task 1: order candidates by relevance")
async def rerank(
    body: ScoringRequest, request: Request, scorer: ScorerDep, settings: SettingsDep
) -> RerankResponse:
    """Candidates sorted by the model's ranking score, best first, cut to ``top_k``, each with its
    E/S/C/I class and substitute decision (null for a single-task model)."""
    result = await _score(request, body, scorer, settings)
    ranked = [
        RankedProduct(**product.model_dump(exclude={"substitute_prob"}))
        for product in _ranked_products(body, result, scorer)
    ]
    return RerankResponse(
        request_id=pipeline.request_id(request),
        ranked=ranked,
        stats=pipeline.build_stats(request, scorer, result, len(ranked)),
    )


@router.post("/classify", summary="Task 2: E/S/C/I class of each candidate", responses=_SINGLE_TASK)
async def classify(
    body: ScoringRequest, request: Request, scorer: ScorerDep, settings: SettingsDep
) -> ClassifyResponse:
    """The predicted ESCI class and the four class probabilities, in request order."""
    _require_multi_task(scorer, "Task 2 (E/S/C/I classification)")
    result = await _score(request, body, scorer, settings)
    preds = result.predictions
    results = [
        ClassifiedProduct(
            product_id=candidate.product_id,
            esci_class=str(preds.esci_classes[i]),  # type: ignore[arg-type]
            probabilities=EsciProbabilities(
                **{label: float(p) for label, p in zip(ESCI_LABELS, preds.esci_probs[i], strict=True)}
            ),
        )
        for i, candidate in enumerate(body.candidates)
    ]
    return _in_request_order(ClassifyResponse, request, scorer, result, results)


@router.post("/substitute", summary="Task 3: is each candidate a substitute?", responses=_SINGLE_TASK)
async def substitute(
    body: ScoringRequest, request: Request, scorer: ScorerDep, settings: SettingsDep
) -> SubstituteResponse:
    """The substitute probability and ``is_substitute`` (probability >= the model's decision
    threshold: its stacker's rule, 0.5 without one), in request order."""
    _require_multi_task(scorer, "Task 3 (substitute detection)")
    result = await _score(request, body, scorer, settings)
    probs = result.predictions.substitute_probs
    results = [
        SubstituteProduct(
            product_id=candidate.product_id,
            is_substitute=bool(result.predictions.is_substitute[i]),
            substitute_prob=float(probs[i]),
        )
        for i, candidate in enumerate(body.candidates)
    ]
    return _in_request_order(SubstituteResponse, request, scorer, result, results)


@router.post("/predict", summary="All three tasks, ranked")
async def predict(
    body: ScoringRequest, request: Request, scorer: ScorerDep, settings: SettingsDep
) -> PredictResponse:
    """Candidates sorted as in ``/rerank``, each with its class and substitute decision
    (null for a single-task model)."""
    result = await _score(request, body, scorer, settings)
    ranked = _ranked_products(body, result, scorer)
    return PredictResponse(
        request_id=pipeline.request_id(request),
        ranked=ranked,
        stats=pipeline.build_stats(request, scorer, result, len(ranked)),
    )
