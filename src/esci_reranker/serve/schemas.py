"""Request and response bodies of the HTTP API (requests and responses are separate models).

Requests reject unknown keys (a misspelt ``titel`` is an error, not a silently empty field),
except the ``/v1/rerank`` compatibility request, which ignores the extra keys Cohere and Jina
clients send (``model``, ``max_chunks_per_doc``, ...). ``/v2/rerank`` follows Cohere's v2 request,
whose keys are all known (``model``, ``priority`` and ``relevant_spans`` are accepted and ignored).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from esci_reranker.data.text import FIELD_COLUMNS

EsciClass = Literal["E", "S", "C", "I"]


def _valid_unicode(value: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); they cannot be tokenized or encoded back to UTF-8.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains an unpaired UTF-16 surrogate (not valid Unicode text)") from None
    return value


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must contain non-whitespace characters")
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
Query = Annotated[
    str, StringConstraints(min_length=1), AfterValidator(_valid_unicode), AfterValidator(_non_blank)
]
ProductId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=256),
    AfterValidator(_valid_unicode),
    AfterValidator(_non_blank),
]


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------
class Candidate(BaseModel):
    """A product to score: its ready ``text``, or catalogue fields the model builds its text from."""

    model_config = ConfigDict(extra="forbid")

    product_id: ProductId = Field(description="Your id of the product; unique within the request.")
    text: Text | None = Field(None, description="The product text as the model should read it.")
    title: Text | None = Field(None, validation_alias=AliasChoices("title", "product_title"))
    brand: Text | None = Field(None, validation_alias=AliasChoices("brand", "product_brand"))
    color: Text | None = Field(None, validation_alias=AliasChoices("color", "product_color"))
    description: Text | None = Field(
        None, validation_alias=AliasChoices("description", "product_description")
    )
    bullets: Text | None = Field(None, validation_alias=AliasChoices("bullets", "product_bullet_point"))

    @model_validator(mode="after")
    def _text_or_fields(self) -> Candidate:
        fields = self.fields()
        if self.text is None and not fields:
            raise ValueError(
                f"candidate {self.product_id!r} has no text: send 'text' or product fields "
                f"({', '.join(FIELD_COLUMNS)})"
            )
        if self.text is not None and fields:
            raise ValueError(
                f"candidate {self.product_id!r} has both 'text' and product fields ({', '.join(fields)}); "
                "send one or the other"
            )
        return self

    def fields(self) -> dict[str, str]:
        """The product fields that were given, by short name (``title``, ``brand``, ...)."""
        return {name: value for name in FIELD_COLUMNS if (value := getattr(self, name)) is not None}

    def record(self) -> dict[str, str]:
        """What ``Reranker.text_of`` reads: ``{"text": ...}`` or the given fields."""
        return {"text": self.text} if self.text is not None else self.fields()


def _request_config(extra: Literal["forbid", "ignore"], example: dict[str, Any]) -> ConfigDict:
    """A request model's config: what to do with unknown keys, and the example the API docs show."""
    return ConfigDict(extra=extra, json_schema_extra={"examples": [example]})


class ScoringRequest(BaseModel):
    """One query and the candidates to score for it (``/rerank``, ``/classify``, ``/substitute``, ``/predict``)."""

    model_config = _request_config(
        "forbid",
        {
            "query": "wireless earbuds",
            "candidates": [
                {"product_id": "B01", "title": "Soundcore Life P2 Wireless Earbuds", "brand": "Anker"},
                {"product_id": "B02", "text": "USB-C charging cable 2 m | Amazon Basics"},
            ],
            "top_k": 10,
        },
    )

    query: Query = Field(description="The search query.")
    candidates: list[Candidate] = Field(description="Products to score; an empty list gives empty results.")
    top_k: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="Keep only the best top_k in ranked lists (/rerank, /predict); "
        "/classify and /substitute answer every candidate.",
    )

    @field_validator("candidates")
    @classmethod
    def _unique_ids(cls, candidates: list[Candidate]) -> list[Candidate]:
        first: dict[str, int] = {}
        for index, candidate in enumerate(candidates):
            if candidate.product_id in first:
                raise ValueError(
                    f"duplicate product_id {candidate.product_id!r} at candidates {first[candidate.product_id]} "
                    f"and {index}; product ids must be unique within a request"
                )
            first[candidate.product_id] = index
        return candidates


class SearchRequest(BaseModel):
    """A query to run against the catalogue index (``POST /search``)."""

    model_config = _request_config("forbid", {"query": "wireless earbuds", "top_k": 10, "rerank": True})

    query: Query = Field(description="The search query.")
    top_k: int = Field(
        10,
        ge=1,
        le=10_000,
        strict=True,
        description="Results to return (<= candidates, <= SEARCH_MAX_TOP_K).",
    )
    candidates: int = Field(
        100, ge=1, le=100_000, strict=True, description="Products to retrieve and rerank (<= MAX_CANDIDATES)."
    )
    rerank: bool = Field(
        True,
        strict=True,
        description="Rerank the retrieved products with the model (false: retrieval order).",
    )
    mode: Literal["hybrid", "bm25", "dense"] = Field("hybrid", description="Which retrievers to use.")


class V1Document(BaseModel):
    """A document in the Cohere/Jina shape."""

    model_config = ConfigDict(extra="ignore")

    text: Text


class V1RerankRequest(BaseModel):
    """The Cohere/Jina ``/v1/rerank`` request; ``model`` and other vendor keys are accepted and ignored."""

    model_config = _request_config(
        "ignore",
        {
            "query": "wireless earbuds",
            "documents": ["Soundcore Life P2 Wireless Earbuds | Anker", {"text": "USB-C cable 2 m"}],
            "top_n": 1,
            "return_documents": True,
        },
    )

    query: Query
    documents: list[Text | V1Document] = Field(description="Strings, or objects with a 'text' key.")
    top_n: int | None = Field(None, ge=1, strict=True, description="Keep only the best top_n (default: all).")
    return_documents: bool = Field(False, strict=True, description="Echo each document's text in its result.")
    model: str | None = Field(None, description="Ignored: the service answers with the model it loaded.")

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class V2RerankRequest(BaseModel):
    """The Cohere v2 ``/v2/rerank`` request (what ``cohere.ClientV2.rerank`` posts).

    As in Cohere's v2 API, ``model`` is required and ``documents`` are plain strings. ``model``,
    ``priority`` and ``relevant_spans`` are accepted and ignored (the service answers with the
    model it loaded, in request order, without spans); other unknown keys are rejected, so a
    misspelt ``top_k`` is an error rather than silently ignored.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "esci-reranker",
                    "query": "wireless earbuds",
                    "documents": ["Soundcore Life P2 Wireless Earbuds | Anker", "USB-C cable 2 m"],
                    "top_n": 1,
                }
            ]
        },
    )

    model: str = Field(description="Required, as in Cohere's v2 API; ignored: the loaded model answers.")
    query: Query
    documents: list[Text] = Field(description="The texts to rank (strings, as in Cohere's v2 API).")
    top_n: int | None = Field(None, ge=1, strict=True, description="Keep only the best top_n (default: all).")
    max_tokens_per_doc: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="Cut each document to its first max_tokens_per_doc tokens (the model's tokenizer) "
        "before scoring; the model's own max length applies either way (default: no cut).",
    )
    priority: int | None = Field(
        None, strict=True, description="Accepted and ignored (requests run in order)."
    )
    relevant_spans: dict[str, Any] | None = Field(
        None, description="Accepted and ignored: results carry no relevant_spans."
    )


# ---------------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------------
class Stats(BaseModel):
    """How a scoring request was served. Scores summarise every candidate, not only the returned top_k."""

    total_latency_ms: float = Field(description="From receiving the request to building the response.")
    model_forward_time_ms: float = Field(description="Model time; 0 when answered from the cache.")
    num_candidates: int
    num_results: int
    num_truncated: int = Field(description="Candidates whose (query, text) pair was cut to the model length.")
    device: str
    top_score: float | None = Field(description="Highest ranking score (null without candidates).")
    avg_score: float | None = Field(description="Mean ranking score (null without candidates).")
    cache_hit: bool
    timestamp: datetime = Field(description="When the response was built (UTC, ISO 8601).")


class EsciProbabilities(BaseModel):
    E: float
    S: float
    C: float
    I: float  # noqa: E741  (the ESCI class name)


_LABEL_DOC = "The E/S/C/I class, as /classify gives it for the same list; null for a single-task model."
_FLAG_DOC = (
    "The substitute decision, as /substitute gives it for the same list; null for a single-task model."
)


class RankedProduct(BaseModel):
    product_id: str
    score: float
    esci_class: EsciClass | None = Field(None, description=_LABEL_DOC)
    is_substitute: bool | None = Field(None, description=_FLAG_DOC)


class RerankResponse(BaseModel):
    request_id: str
    ranked: list[RankedProduct] = Field(description="Sorted by score, best first; ties keep request order.")
    stats: Stats


class ClassifiedProduct(BaseModel):
    product_id: str
    esci_class: EsciClass
    probabilities: EsciProbabilities


class ClassifyResponse(BaseModel):
    request_id: str
    results: list[ClassifiedProduct] = Field(description="In request order.")
    stats: Stats


class SubstituteProduct(BaseModel):
    product_id: str
    is_substitute: bool = Field(
        description="substitute_prob >= the model's threshold (0.5 unless its stacker chose one)."
    )
    substitute_prob: float


class SubstituteResponse(BaseModel):
    request_id: str
    results: list[SubstituteProduct] = Field(description="In request order.")
    stats: Stats


class PredictedProduct(BaseModel):
    product_id: str
    score: float
    esci_class: EsciClass | None = Field(description="Null for a single-task model.")
    is_substitute: bool | None = Field(description="Null for a single-task model.")
    substitute_prob: float | None = Field(description="Null for a single-task model.")


class PredictResponse(BaseModel):
    request_id: str
    ranked: list[PredictedProduct] = Field(
        description="Sorted by score, best first; ties keep request order."
    )
    stats: Stats


class SearchResult(BaseModel):
    rank: int
    product_id: str
    title: str
    brand: str
    color: str
    score: float = Field(description="The model's ranking score when reranked, else the retrieval score.")
    retrieval_score: float = Field(description="The retrieval (fusion) score.")
    esci_class: EsciClass | None = Field(description="Null without reranking or for a single-task model.")
    probabilities: EsciProbabilities | None = Field(
        None, description="The four class probabilities esci_class was decided from; null likewise."
    )
    is_substitute: bool | None = Field(description="substitute_prob >= the model's threshold; null likewise.")
    substitute_prob: float | None
    sources: list[Literal["bm25", "dense"]] = Field(description="The retrievers that found the product.")
    bm25_rank: int | None = Field(description="Rank in BM25's list (null: not in it).")
    dense_rank: int | None = Field(description="Rank in the dense retriever's list (null: not in it).")


class SearchStats(BaseModel):
    """How a search was served."""

    total_latency_ms: float = Field(description="From receiving the request to building the response.")
    retrieval_ms: float = Field(description="BM25 + query embedding + HNSW search + fusion.")
    model_forward_time_ms: float = Field(description="Reranking model time; 0 when cached or not reranked.")
    num_candidates: int = Field(description="Products retrieved (and reranked).")
    num_results: int
    reranked: bool
    cache_hit: bool
    device: str
    index_products: int = Field(description="Products in the catalogue index.")
    timestamp: datetime


class SearchResponse(BaseModel):
    request_id: str
    query: str
    results: list[SearchResult] = Field(description="Best first.")
    stats: SearchStats


class V1Result(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(
        description="The model's ranking score (as in /rerank; not calibrated to 0..1)."
    )
    document: V1Document | None = Field(None, description="Present when return_documents is true.")
    esci_class: EsciClass | None = Field(None, description=_LABEL_DOC + " (An addition to Cohere's shape.)")
    is_substitute: bool | None = Field(None, description=_FLAG_DOC + " (An addition to Cohere's shape.)")


class V1Usage(BaseModel):
    search_units: int = 1


class V1RerankResponse(BaseModel):
    id: str = Field(description="Same as request_id.")
    request_id: str
    model: str
    results: list[V1Result] = Field(description="Sorted by relevance_score, best first.")
    usage: V1Usage
    stats: Stats


class V2Result(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(
        description="The model's ranking score (as in /rerank and /v1/rerank; not calibrated to 0..1)."
    )
    esci_class: EsciClass | None = Field(None, description=_LABEL_DOC + " (An addition to Cohere's shape.)")
    is_substitute: bool | None = Field(None, description=_FLAG_DOC + " (An addition to Cohere's shape.)")


class V2ApiVersion(BaseModel):
    version: str = "2"


class V2BilledUnits(BaseModel):
    search_units: int = 1


class V2Meta(BaseModel):
    """Cohere's ``meta`` block: the API version and the (nominal) billed units."""

    api_version: V2ApiVersion = Field(default_factory=V2ApiVersion)
    billed_units: V2BilledUnits = Field(default_factory=V2BilledUnits)


class V2RerankResponse(BaseModel):
    """Cohere's v2 rerank response (``id``, ``results``, ``meta``) plus this service's
    ``request_id``, ``model`` and ``stats`` (Cohere's clients keep unknown keys)."""

    id: str = Field(description="Same as request_id.")
    results: list[V2Result] = Field(description="Sorted by relevance_score, best first.")
    meta: V2Meta = Field(default_factory=V2Meta)
    request_id: str
    model: str
    stats: Stats


class ErrorDetail(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body."""

    error: str = Field(description="A stable code: validation_error, unauthorized, rate_limited, ...")
    message: str = Field(description="What was wrong and how to fix it.")
    request_id: str | None = None
    details: list[ErrorDetail] | None = None


class HealthResponse(BaseModel):
    status: Literal["ok", "failed"] = Field(description="'failed' (503) when the model could not be loaded.")
    model_loaded: bool
    model_status: Literal["loading", "ready", "failed"]
    error: str | None = None


class ReadyResponse(BaseModel):
    ready: bool = Field(description="The model is warm and, when INDEX_PATH is set, the index is loaded.")
    model_status: Literal["loading", "ready", "failed"]
    error: str | None = None
    index_status: Literal["not_configured", "loading", "ready", "failed"] = "not_configured"
    index_error: str | None = None


class MemoryStatus(BaseModel):
    """The process's resident memory and the memory policy (``MEMORY_LIMIT_MB``) in force."""

    rss_mb: float | None = Field(description="Resident memory now, MiB (null where /proc is missing).")
    peak_rss_mb: float = Field(description="Highest resident memory since start, MiB.")
    limit_mb: int | None = Field(description="The memory policy's limit, MiB (null: no policy).")
    limit_source: str = Field(
        "default",
        description="Where the limit came from: MEMORY_LIMIT_MB, container (90 % of the cgroup's limit), "
        "default (960 MiB) or off (MEMORY_LIMIT_MB=0).",
    )
    malloc_arena_max: int | None = Field(description="glibc malloc arena cap (null: glibc's default).")
    malloc_arena_source: str = Field(description="MALLOC_ARENA_MAX, policy, or glibc default.")
    onednn_cache_capacity: int | None = Field(
        description="oneDNN primitive cache capacity set at start-up (null: oneDNN's default, 1024)."
    )
    onednn_cache_source: str = Field(
        description="ONEDNN_PRIMITIVE_CACHE_CAPACITY, policy, or oneDNN default."
    )
    keeps_freed_memory: bool = Field(
        description="Whether malloc keeps freed memory for reuse (ESCI_KEEP_FREED_MEMORY)."
    )
    malloc_arenas: int | None = Field(None, description="Arenas glibc malloc has created (null off glibc).")
    malloc_heap_mb: float | None = Field(None, description="Memory malloc's arenas hold from the OS, MiB.")
    malloc_free_mb: float | None = Field(
        None, description="Of that, free chunks (what a trim can give back, less what one already did), MiB."
    )
    malloc_trim_threshold_mb: int | None = Field(
        None,
        description="Free memory at the top of a malloc heap kept for reuse, MiB: the policy's bound on "
        "the 1 GB kept while keeps_freed_memory (null: no bound).",
    )
    checks: int = Field(0, description="RSS checks after forward passes (with a limit).")
    trims: int = Field(
        0, description="Times free malloc memory was handed back to the OS (RSS over the limit)."
    )
    trimmed_mb: float = Field(0.0, description="Resident memory those trims released, MiB.")


class ServiceLimits(BaseModel):
    max_candidates: int
    max_text_chars: int
    max_body_bytes: int
    cache_size: int
    rate_limit: str | None
    auth_required: bool
    batch_size: int
    batch_wait_ms: float = Field(description="Dynamic batching wait; 0 = off.")
    max_batch_tokens: int = Field(
        description="Dynamic batching: padded tokens per forward pass (MAX_BATCH_TOKENS, or the device's default)."
    )
    memory: MemoryStatus


class InfoResponse(BaseModel):
    model: dict[str, Any] = Field(description="Reranker.info(): name, backbone, heads, device, ...")
    service: ServiceLimits
    index: dict[str, Any] | None = Field(
        None,
        description="The catalogue index behind /search: status, path, products, retriever, fields, fusion "
        "(null when INDEX_PATH is not set).",
    )
