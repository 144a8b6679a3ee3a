"""What one app instance holds: settings, metrics, cache, and the model as it loads and warms up."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

from esci_reranker.hardware import resolve_precision
from esci_reranker.reranker import Reranker, select_device
from esci_reranker.serve.admission import QueueBound
from esci_reranker.serve.batching import DynamicBatcher
from esci_reranker.serve.cache import PredictionCache
from esci_reranker.serve.memory import (
    MemoryGuard,
    StartupPolicy,
    apply_startup_policy,
    container_memory_limit,
    malloc_trim,
)
from esci_reranker.serve.metrics import Metrics
from esci_reranker.serve.scoring import Scorer, SingleThread
from esci_reranker.serve.settings import Settings

if TYPE_CHECKING:
    from esci_reranker.retrieval.index import CatalogueIndex, Retrieved

ModelStatus = Literal["loading", "ready", "failed"]
#: The catalogue index behind /search: ``not_configured`` without ``INDEX_PATH``.
IndexStatus = Literal["not_configured", "loading", "ready", "failed"]
#: Builds the reranker from settings; ``load_reranker`` unless a test injects another.
Loader = Callable[[Settings], Reranker]

log = logging.getLogger("esci_reranker.serve")

#: Whether ``freeze_startup_objects`` has run in this process.
_startup_frozen = False


def freeze_startup_objects() -> bool:
    """Once per process, after the model is loaded and warm: collect, then move every object the
    garbage collector tracks (torch, transformers, the model, the service: ~490,000 for the
    stacked default) into its permanent generation (``gc.freeze``), so no later collection scans
    them again.

    Why: a full collection walks every tracked object with the GIL held, a large fraction of a
    second of CPU over the loaded service, during which no thread runs Python: the event loop
    answers nothing, a load-shedding 429 included. Requests keep creating objects that live long enough to reach
    the oldest generation, so full collections keep coming under load. These objects live as long
    as the process, so freezing them loses nothing; what requests create later is still collected.
    Returns True when it froze now, False when an earlier call did (a second app in the process).
    """
    global _startup_frozen
    if _startup_frozen:
        return False
    _startup_frozen = True
    gc.collect()  # garbage left from loading is freed, not frozen
    gc.freeze()
    # A full collection now scans nearly nothing, and it resets the collector's count of old
    # objects: the next full collection is then due once a quarter as many objects as are tracked
    # since have reached the oldest generation, not a quarter of the frozen ones (~120,000). So
    # full collections over what serving creates come often and stay short.
    gc.collect()
    return True


def load_reranker(settings: Settings) -> Reranker:
    """``Reranker.from_pretrained`` on ``MODEL_PATH`` / ``HF_MODEL_REPO_ID`` / the default folder,
    in the arithmetic ``PRECISION`` asks for."""
    source, origin = settings.model_source()
    log.info(
        "loading model %s (from %s) on device %s",
        source,
        origin,
        settings.inference_device,
        extra={"model": source, "origin": origin},
    )
    precision = resolve_precision(settings.precision, select_device(settings.inference_device))
    return Reranker.from_pretrained(
        source,
        device=settings.inference_device,
        batch_size=settings.batch_size,
        precision=precision,
        tower_cache=settings.tower_cache_size,
    )


class ServiceState:
    """The app's shared objects. ``scorer`` is None until a model is attached; ``status`` is
    ``ready`` only after one warm-up forward pass, which is what ``/ready`` reports.
    """

    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader = load_reranker) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = loader
        self.cache = PredictionCache(settings.cache_size) if settings.cache_size > 0 else None
        self.queue = QueueBound(settings.max_queued_requests, metrics)
        # The arena cap and oneDNN's cache size must be set before the service's threads allocate
        # and before the model's first forward: here, at app creation.
        #: The memory policy's limit (MiB; None: off) and where it came from (``Settings.memory_limit``).
        self.memory_limit_mb, self.memory_limit_source = settings.memory_limit(container_memory_limit())
        self.startup: StartupPolicy = apply_startup_policy(self.memory_limit_mb, settings.malloc_arena_max)
        self.memory = (
            MemoryGuard(self.memory_limit_mb * 1024 * 1024, metrics=metrics)
            if self.memory_limit_mb is not None
            else None
        )
        self.scorer: Scorer | None = None
        self.status: ModelStatus = "loading"
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.index: CatalogueIndex | None = None
        self.index_status: IndexStatus = "loading" if settings.index_path else "not_configured"
        self.index_error: str | None = None
        self._retrieval = SingleThread("esci-retrieval")

    @property
    def ready(self) -> bool:
        """The model is warm, and the catalogue index is loaded when one is configured."""
        return self.status == "ready" and self.index_status in ("ready", "not_configured")

    @property
    def model_loaded(self) -> bool:
        return self.scorer is not None

    def attach(self, reranker: Reranker) -> None:
        """Use ``reranker`` for scoring (requests are accepted from now on; /ready waits for warm-up).

        With ``BATCH_WAIT_MS > 0`` the scorer gets a ``DynamicBatcher`` (its worker thread starts
        with the first forward pass, the warm-up, and stops in ``close``).
        """
        batcher = None
        # A list-level model (listwise) scores a request's candidates together: its pairs must not
        # be split over, or merged into, other requests' forward passes, so it takes the direct path.
        if self.settings.batch_wait_ms > 0 and not reranker.config.list_level:
            batcher = DynamicBatcher(
                reranker,
                self.settings.batch_wait_ms,
                self.settings.batch_token_budget(reranker.device),
                self.metrics,
                after_batch=self.memory.check if self.memory is not None else None,
            )
            if self._closed:  # shutting down before the background load finished
                batcher.close()
        self.scorer = Scorer(reranker, self.cache, self.metrics, batcher, memory=self.memory)
        self.metrics.watch_tower_cache(getattr(reranker, "tower_cache_stats", lambda: None))

    def open(self) -> None:
        """At start-up: give the scorer a fresh batcher if an earlier shutdown of this app closed it
        (an app can be started again, e.g. by several ``TestClient`` contexts)."""
        self._closed = False
        scorer = self.scorer
        if scorer is not None and scorer.batcher is not None and scorer.batcher.closed:
            self.attach(scorer.reranker)

    def close(self) -> None:
        """Stop the dynamic batcher at shutdown: waiting requests get a 503, none hangs."""
        self._closed = True
        if self.scorer is not None:
            self.scorer.close()
        self._retrieval.close()

    # -- the catalogue index (POST /search) --------------------------------------------------------
    def _retrieval_thread(self) -> ThreadPoolExecutor:
        """The one thread that runs retrievals: the query encoder's torch OpenMP pool belongs to
        the thread that calls it, so one thread keeps one pool (as the scorer's model thread does)."""
        return self._retrieval.get()

    def retrieve(self, query: str, n: int, mode: str) -> Future[list[Retrieved]]:
        """Run ``CatalogueIndex.retrieve`` on the retrieval thread."""
        if self.index is None:
            raise RuntimeError("ServiceState.retrieve: no catalogue index is loaded.")
        return self._retrieval_thread().submit(self.index.retrieve, query, n, mode)

    def attach_index(self, index: CatalogueIndex) -> None:
        """Serve ``index`` for /search (after checking the model can read its stored fields)."""
        from esci_reranker.retrieval.search import check_reranker_fields, unstored_feature_fields

        if self.scorer is not None:
            check_reranker_fields(index, self.scorer.reranker.config.text_fields, self.scorer.model_id)
            if missing := unstored_feature_fields(index, self.scorer.reranker):
                # Served anyway (titles alone still rank), but /search then reads less of each
                # product than /rerank given the whole product: say so once, at start-up.
                log.warning(
                    "the catalogue index does not store fields the model's stacker reads; /search "
                    "labels may differ from /rerank's on whole products (rebuild the index with "
                    "--store-fields)",
                    extra={"index": str(index.folder), "missing_fields": missing},
                )
        self._retrieval_thread().submit(index.retrieve, "warm up", 1).result()
        self.index = index
        self.index_status = "ready"
        self.index_error = None
        log.info("catalogue index ready", extra={"index": str(index.folder), "products": len(index)})

    def load_index(self) -> None:
        """Open ``INDEX_PATH`` (with ``RETRIEVER_PATH`` when set); record a failure instead of raising."""
        path = self.settings.index_path
        if not path or self.index is not None:
            return
        try:
            from esci_reranker.retrieval.index import CatalogueIndex

            log.info("loading catalogue index %s", path, extra={"index": path})
            self.attach_index(CatalogueIndex.open(path, retriever=self.settings.retriever_path))
        except Exception as err:  # a bad index must show in /ready and /search, not kill the server
            self.index_status = "failed"
            self.index_error = f"{type(err).__name__}: {err}"
            log.exception(
                "catalogue index failed to load; /search answers 503", extra={"error": self.index_error}
            )

    def warm_up(self) -> None:
        """One dummy forward pass, then mark the service ready."""
        if self.scorer is None:
            raise RuntimeError(
                "ServiceState.warm_up: no model attached; call attach() or load_and_warm_up()."
            )
        self.scorer.warm_up()
        freeze_startup_objects()  # before the trim below, which then returns what the collection freed
        if self.memory is not None:
            # Loading leaves its temporary buffers (safetensors reads, tokenizer and tree parsing)
            # free in malloc's arenas: give them back once, so the idle RSS is what serving needs.
            malloc_trim()
        self.status = "ready"
        self.metrics.model_loaded.set(1)
        log.info("model ready", extra={"model": self.scorer.model_id, "device": self.scorer.device})

    def load_and_warm_up(self) -> None:
        """Load with ``loader`` (unless a model is attached), warm up, then open the catalogue index
        when ``INDEX_PATH`` is set; record a failure instead of raising."""
        try:
            if self.scorer is None:
                self.attach(self.loader(self.settings))
            self.warm_up()
        except Exception as err:  # any load failure must show in /ready and /health, not kill the server
            self.status = "failed"
            self.error = f"{type(err).__name__}: {err}"
            self.metrics.model_loaded.set(0)
            log.exception("model failed to load; /ready and /health answer 503", extra={"error": self.error})
        self.load_index()

    def start_loading(self) -> None:
        """Load and warm up in a daemon thread, so the server answers /health meanwhile."""
        self._thread = threading.Thread(target=self.load_and_warm_up, name="esci-model-loader", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading has finished (ready or failed); False on timeout."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return self.status != "loading"
