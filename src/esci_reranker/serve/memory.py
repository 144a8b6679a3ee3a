"""Bounded service memory: the process's resident memory, glibc malloc's arenas and trimming, and the
policy ``MEMORY_LIMIT_MB`` applies (docs/serving.md, "Memory").

Why the service's RSS grows under concurrent load although no Python object outlives its request:
glibc's malloc gives threads their own *arenas* (up to 8 per core) so they do not contend for one
lock, and a freed block returns to the arena it came from, not to the OS. Every thread that
tokenises, parses JSON or runs a forward pass thus grows an arena to its own high-water mark, and
``hardware.keep_freed_memory`` (which makes forwards ~1.4x faster by not giving freed activation
memory back) tells malloc to keep up to 1 GB of free heap per arena. The memory is free, reusable,
but resident. The policy therefore:

- caps the arenas at start-up (``mallopt(M_ARENA_MAX)``, what ``MALLOC_ARENA_MAX`` does), so the
  threads share a few heaps instead of each keeping its own high-water mark;
- lowers that 1 GB trim threshold to ``POLICY_TRIM_THRESHOLD`` (``hardware.cap_freed_memory``),
  so free memory at the top of a heap beyond a few forwards' activations goes back to the OS as
  soon as it is freed;
- shrinks oneDNN's JIT kernel cache, which otherwise fills with kernels for one-off input shapes
  (memory in use, which no trim returns; see ``apply_startup_policy``);
- after each forward pass compares the RSS with the limit and, when it is over, hands the free
  pages of every arena back to the OS (``malloc_trim(0)``), which keeps the speed of reused memory
  below the limit and pays for page faults only above it. When the memory in use is itself over
  the limit, the free memory kept on top of it is bounded by ``RETRIM_STEP_BYTES``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import re
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from esci_reranker.hardware import cap_freed_memory, glibc, malloc_trim

if TYPE_CHECKING:
    from esci_reranker.serve.metrics import Metrics

log = logging.getLogger("esci_reranker.serve")

MIB: Final[int] = 1024 * 1024
#: ``mallopt`` parameter number of ``M_ARENA_MAX`` (glibc malloc.h).
_M_ARENA_MAX: Final[int] = -8
#: The environment variable glibc itself reads for the arena cap (at process start).
ARENA_VARIABLE: Final[str] = "MALLOC_ARENA_MAX"
#: Arenas the policy allows when ``MALLOC_ARENA_MAX`` is not set: one for the model thread, one shared
#: by the others (measured in docs/serving.md).
POLICY_ARENAS: Final[int] = 2
#: oneDNN's variable for its primitive (JIT kernel) cache, and the capacity the policy sets: enough
#: for the dozen or so linear-layer shapes of one forward (pair pass and two towers) to be reused
#: within it, far below oneDNN's default of 1024 (see ``apply_startup_policy``).
ONEDNN_CACHE_VARIABLE: Final[str] = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
POLICY_ONEDNN_CACHE: Final[int] = 64
#: After a trim that left the RSS over the limit, trim again only once it has grown by this much:
#: trimming memory that is in use frees nothing and costs a walk over every arena. It is also the
#: free memory malloc keeps above the limit when what is in use is already over it (the plateau is
#: in use + this), so it is about one forward's activations (25 MiB at the default 2048 padded
#: tokens in the memory breakdown): the forward after a trim reuses its buffers, and freed memory
#: beyond that goes back. With 64 MiB the stacked default at 16 clients plateaued at 1,063 MiB,
#: a step above the ~1,000 MiB it held in use (docs/serving.md, "Memory").
RETRIM_STEP_BYTES: Final[int] = 32 * MIB
#: The trim threshold (``M_TRIM_THRESHOLD``) under the policy, instead of ``keep_freed_memory``'s
#: 1 GB: free memory at the top of a heap up to this size is kept for the next forwards (about
#: 2.5 forwards' activations at 2048 padded tokens); beyond it, malloc gives it back on ``free``,
#: without waiting for the RSS check.
POLICY_TRIM_THRESHOLD: Final[int] = 64 * MIB


def process_rss() -> int | None:
    """The resident set size of this process in bytes (``/proc/self/statm``); None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as file:
            pages = int(file.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The highest RSS this process has had, in bytes (``getrusage``; kB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if platform.system() == "Darwin" else 1024)


@dataclass(frozen=True)
class MallocStats:
    """glibc malloc's own account (``malloc_info``), summed over its arenas, in bytes.

    Attributes:
        arenas: arenas (heaps) malloc has created.
        heap_bytes: memory the arenas got from the OS and still hold (``system current``).
        free_bytes: of that, free chunks (``fast`` + ``rest``): memory a trim could give back, less
            what an earlier trim already returned (freed chunks stay in malloc's lists).
        mmap_bytes: blocks above the mmap threshold, mapped one by one.
    """

    arenas: int
    heap_bytes: int
    free_bytes: int
    mmap_bytes: int


_TOTAL = re.compile(r'<total type="(fast|rest|mmap)" count="\d+" size="(\d+)"/>')
_SYSTEM = re.compile(r'<system type="current" size="(\d+)"/>')


def malloc_stats() -> MallocStats | None:
    """What glibc's malloc holds (``malloc_info`` parsed); None off glibc. Takes every arena's lock
    briefly: for ``/info``, not for a hot path."""
    libc = glibc()
    if libc is None:
        return None
    buffer, size = ctypes.c_void_p(), ctypes.c_size_t()
    libc.open_memstream.restype = ctypes.c_void_p
    stream = libc.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
    if not stream:
        return None
    try:
        libc.malloc_info(0, ctypes.c_void_p(stream))
    finally:
        libc.fclose(ctypes.c_void_p(stream))
    try:
        text = ctypes.string_at(buffer, size.value).decode("utf-8", "replace")
    finally:
        libc.free(buffer)
    # The totals after the last </heap> are the whole process's; each <heap> has its own before.
    tail = text[text.rfind("</heap>") :]
    totals = {kind: int(n) for kind, n in _TOTAL.findall(tail)}
    system = _SYSTEM.findall(tail)
    return MallocStats(
        arenas=text.count("<heap nr="),
        heap_bytes=int(system[0]) if system else 0,
        free_bytes=totals.get("fast", 0) + totals.get("rest", 0),
        mmap_bytes=totals.get("mmap", 0),
    )


#: cgroup files that state the container's memory limit (v2, then v1); "max" or a huge v1 value
#: means none.
CGROUP_LIMIT_FILES: Final[tuple[str, ...]] = (
    "/sys/fs/cgroup/memory.max",
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
)
#: A v1 cgroup without a limit reports a page-rounded 2**63 - 1; anything this large is "none".
_NO_LIMIT: Final[int] = 1 << 60


def container_memory_limit(files: tuple[str, ...] = CGROUP_LIMIT_FILES) -> int | None:
    """The memory limit (bytes) of the container (cgroup) this process runs in; None when there is
    none or it cannot be read (not Linux, no cgroup file)."""
    for name in files:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < _NO_LIMIT:
            return int(text)
        return None
    return None


def set_arena_max(arenas: int) -> bool:
    """Cap glibc malloc's arenas at ``arenas`` for threads that have none yet (``mallopt(M_ARENA_MAX)``).

    glibc fixes its arena limit the first time a thread needs a new arena beyond the first 8, so
    this must run early, before many threads have allocated (``create_app`` does, at start-up);
    arenas that exist stay. Returns False off glibc or when glibc refused the value.
    """
    if arenas < 1:
        raise ValueError(f"set_arena_max(arenas={arenas}): expected >= 1.")
    libc = glibc()
    return libc is not None and libc.mallopt(_M_ARENA_MAX, int(arenas)) == 1


@dataclass(frozen=True)
class StartupPolicy:
    """What the start-up step set for the process (shown by ``/info``).

    Attributes:
        malloc_arena_max: the arena cap (None: glibc's default, 8 per core).
        malloc_arena_source: ``MALLOC_ARENA_MAX`` (the user's), ``policy`` or ``glibc default``.
        onednn_cache_capacity: oneDNN's primitive cache capacity (None: its default, 1024).
        onednn_cache_source: ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` (the user's), ``policy`` or
            ``oneDNN default``.
        malloc_trim_threshold: the bound the policy put on the trim threshold of
            ``keep_freed_memory``, bytes (None: no bound, 1 GB while it keeps freed memory).
    """

    malloc_arena_max: int | None
    malloc_arena_source: str
    onednn_cache_capacity: int | None
    onednn_cache_source: str
    malloc_trim_threshold: int | None = None


def apply_startup_policy(limit_mb: int | None, arena_max: int | None) -> StartupPolicy:
    """At start-up (app creation, before the model's first forward and before the service's
    threads allocate), with ``MEMORY_LIMIT_MB`` set:

    - cap glibc malloc's arenas at ``POLICY_ARENAS`` unless ``MALLOC_ARENA_MAX`` is set (glibc
      applied that one when the process started; it is applied again here, for apps built from
      Python with it in the settings);
    - set oneDNN's primitive cache to ``POLICY_ONEDNN_CACHE`` entries unless
      ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` is set. oneDNN JIT-compiles a kernel per input shape
      and keeps the last 1024 (~100 KB each). The unpadded encoder's linear layers see a new
      shape (the batch's real-token count) on nearly every forward, so the cache fills with
      kernels that are rarely used again: ~100 MB of RSS over a few minutes of traffic. oneDNN
      reads the variable once, at its first kernel: it takes effect when this runs before the
      process's first forward (as in ``esci-reranker serve``), not in a process that has already
      run the model;
    - bound the trim threshold ``keep_freed_memory`` sets (1 GB) at ``POLICY_TRIM_THRESHOLD``
      (``hardware.cap_freed_memory``: now if it is in effect, else when the model loads). A user's
      ``MALLOC_TRIM_THRESHOLD_`` / ``GLIBC_TUNABLES`` or ``ESCI_KEEP_FREED_MEMORY=0`` leave malloc
      to glibc (whose own threshold is far lower).
    """
    if arena_max is not None:
        arenas, arena_source = arena_max, ARENA_VARIABLE
        set_arena_max(arena_max)
    elif limit_mb is not None:
        arenas, arena_source = POLICY_ARENAS, "policy"
        if not set_arena_max(POLICY_ARENAS):
            log.warning("MEMORY_LIMIT_MB: could not cap malloc arenas (not glibc?); trimming still applies")
    else:
        arenas, arena_source = None, "glibc default"
    given = os.environ.get(ONEDNN_CACHE_VARIABLE, "").strip()
    if given:
        cache: int | None = int(given) if given.isdigit() else None
        cache_source = ONEDNN_CACHE_VARIABLE
    elif limit_mb is not None:
        os.environ[ONEDNN_CACHE_VARIABLE] = str(POLICY_ONEDNN_CACHE)
        cache, cache_source = POLICY_ONEDNN_CACHE, "policy"
    else:
        cache, cache_source = None, "oneDNN default"
    trim_threshold = None
    if limit_mb is not None:
        trim_threshold = POLICY_TRIM_THRESHOLD
        cap_freed_memory(trim_threshold)
    return StartupPolicy(arenas, arena_source, cache, cache_source, trim_threshold)


class MemoryGuard:
    """Keeps the process's RSS near ``limit_bytes`` by trimming malloc when it is over.

    ``check()`` runs after each forward pass, on the thread that ran it (the batcher's, or the
    direct path's model thread), after the requests of that forward have their answers. It reads
    the RSS (a few µs) and trims when it is over the limit, unless an earlier trim already left it
    over the limit and it has not grown by ``retrim_step_bytes`` since (so a limit below what the
    model needs costs one trim per step of growth, not one per forward).

    Args:
        limit_bytes: the RSS above which free memory is handed back to the OS.
        rss: reads the current RSS in bytes (``process_rss``; tests inject their own).
        trim: hands free memory back (``malloc_trim``).
        metrics: where the trim counters go (None: nowhere).
        retrim_step_bytes: growth after a trim that did not get under the limit before the next one.
    """

    def __init__(
        self,
        limit_bytes: int,
        *,
        rss: Callable[[], int | None] = process_rss,
        trim: Callable[[], object] = malloc_trim,
        metrics: Metrics | None = None,
        retrim_step_bytes: int = RETRIM_STEP_BYTES,
    ) -> None:
        if limit_bytes < 1:
            raise ValueError(f"MemoryGuard limit_bytes={limit_bytes}; expected > 0.")
        self.limit_bytes = limit_bytes
        self.rss = rss
        self.trim = trim
        self.metrics = metrics
        self.retrim_step_bytes = retrim_step_bytes
        self.checks = 0
        self.trims = 0
        self.trimmed_bytes = 0
        self.last_rss: int | None = None
        self._floor: int | None = None  # RSS right after a trim that stayed over the limit
        self._lock = threading.Lock()
        self._warned = False
        if metrics is not None:
            metrics.memory_limit.set(limit_bytes)

    def check(self) -> bool:
        """Trim when the RSS is over the limit (see the class); True when a trim ran."""
        if not self._lock.acquire(blocking=False):  # another thread is checking: one is enough
            return False
        try:
            self.checks += 1
            before = self.rss()
            self.last_rss = before
            if before is None or before <= self.limit_bytes:
                self._floor = None
                return False
            if self._floor is not None and before < self._floor + self.retrim_step_bytes:
                return False
            self.trim()
            after = self.rss()
            after = before if after is None else after
            self.last_rss = after
            self.trims += 1
            freed = max(0, before - after)
            self.trimmed_bytes += freed
            if self.metrics is not None:
                self.metrics.memory_trims.inc()
                self.metrics.memory_trimmed.inc(freed)
            self._floor = after if after > self.limit_bytes else None
            if self._floor is not None and not self._warned:
                self._warned = True
                log.warning(
                    "RSS is %d MiB after trimming malloc, over MEMORY_LIMIT_MB=%d: the model and its "
                    "working set need more; raise MEMORY_LIMIT_MB or lower MAX_BATCH_TOKENS",
                    after // MIB,
                    self.limit_bytes // MIB,
                )
            return True
        finally:
            self._lock.release()

    def stats(self) -> dict[str, Any]:
        """Counters for ``/info``."""
        return {
            "limit_mb": self.limit_bytes // MIB,
            "checks": self.checks,
            "trims": self.trims,
            "trimmed_mb": round(self.trimmed_bytes / MIB, 1),
        }
