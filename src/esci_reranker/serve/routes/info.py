"""``GET /info``: what model is loaded and the service limits (needs the API key when one is set)."""

from __future__ import annotations

from fastapi import APIRouter

from esci_reranker.hardware import freed_memory_kept
from esci_reranker.serve.deps import ScorerDep, SettingsDep, StateDep
from esci_reranker.serve.errors import ERROR_RESPONSES
from esci_reranker.serve.memory import MIB, malloc_stats, peak_rss, process_rss
from esci_reranker.serve.schemas import InfoResponse, MemoryStatus, ServiceLimits
from esci_reranker.serve.state import ServiceState

router = APIRouter(tags=["operations"])


@router.get(
    "/info",
    summary="Loaded model and service limits",
    responses={k: v for k, v in ERROR_RESPONSES.items() if k in (401, 429, 503)},
)
def info(scorer: ScorerDep, settings: SettingsDep, state: StateDep) -> InfoResponse:
    """``Reranker.info()`` (name, backbone, heads, max length, device, ...), the limits in force
    and the catalogue index behind /search."""
    index = None
    if settings.index_path:
        index = {"status": state.index_status, "error": state.index_error, "path": settings.index_path}
        if state.index is not None:
            index |= state.index.info() | {"retriever_path": settings.retriever_path}
    return InfoResponse(
        model=scorer.reranker.info(),
        service=ServiceLimits(
            max_candidates=settings.max_candidates,
            max_text_chars=settings.max_text_chars,
            max_body_bytes=settings.max_body_bytes,
            cache_size=settings.cache_size,
            rate_limit=settings.rate_limit or None,
            auth_required=settings.api_key is not None,
            batch_size=settings.batch_size,
            batch_wait_ms=settings.batch_wait_ms,
            max_batch_tokens=settings.batch_token_budget(scorer.reranker.device),
            memory=memory_status(state),
        ),
        index=index,
    )


def memory_status(state: ServiceState) -> MemoryStatus:
    """The process's RSS now and at its peak, and what the memory policy has done."""
    rss = process_rss()
    guard = state.memory
    counters = guard.stats() if guard is not None else {}
    malloc = malloc_stats()
    return MemoryStatus(
        rss_mb=round(rss / MIB, 1) if rss is not None else None,
        peak_rss_mb=round(peak_rss() / MIB, 1),
        limit_mb=state.memory_limit_mb,
        limit_source=state.memory_limit_source,
        malloc_arena_max=state.startup.malloc_arena_max,
        malloc_arena_source=state.startup.malloc_arena_source,
        onednn_cache_capacity=state.startup.onednn_cache_capacity,
        onednn_cache_source=state.startup.onednn_cache_source,
        keeps_freed_memory=freed_memory_kept(),
        malloc_arenas=malloc.arenas if malloc else None,
        malloc_heap_mb=round(malloc.heap_bytes / MIB, 1) if malloc else None,
        malloc_free_mb=round(malloc.free_bytes / MIB, 1) if malloc else None,
        malloc_trim_threshold_mb=(
            state.startup.malloc_trim_threshold // MIB if state.startup.malloc_trim_threshold else None
        ),
        checks=counters.get("checks", 0),
        trims=counters.get("trims", 0),
        trimmed_mb=counters.get("trimmed_mb", 0.0),
    )
