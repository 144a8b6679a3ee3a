"""What the machine can do: CPU model and flags, native bf16, the precision to use by default, and
the one allocator setting CPU inference needs (``keep_freed_memory``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
from pathlib import Path
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "int8"]
#: The arithmetic a torch model can run in (``Reranker.from_pretrained(precision=...)``).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")


def cpu_flags() -> set[str]:
    """The CPU feature flags from ``/proc/cpuinfo`` (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    """The CPU's model name, as the OS reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), and the evidence.

    ``torch.backends.cpu.get_cpu_capability()`` does not say (it reports ``AVX512`` for CPUs with
    and without BF16), so the CPU flags are read; without them bf16 autocast is emulated and slow.
    """
    native = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    capability = torch.backends.cpu.get_cpu_capability()
    if native:
        return True, f"cpu flags {native}"
    if "AMX" in capability.upper():
        return True, f"torch cpu capability {capability}"
    return False, f"no avx512_bf16/amx_bf16 cpu flag (torch cpu capability {capability})"


def bf16_native(device: torch.device) -> bool:
    """True when ``device`` runs bf16 matmuls in hardware (so bf16 is faster, not emulated)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_bf16_support()[0]
    return False


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``; a disabled one (plain fp32) when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def resolve_precision(precision: str, device: torch.device) -> Literal["fp32", "bf16", "int8"]:
    """``auto`` -> ``bf16`` where the device has native bf16, else ``fp32``; others pass through.

    ``int8`` is never chosen by ``auto``: it changes the scores slightly (see docs/speed.md), so
    it is the user's call.

    Raises:
        ValueError: ``precision`` is not auto, fp32, bf16 or int8, or int8 on a non-CPU device.
    """
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"precision='int8' runs on the CPU only, not on {device.type}; use bf16.")
    if precision in PRECISIONS:
        return precision  # type: ignore[return-value]
    raise ValueError(f"precision={precision!r}; expected 'auto' or one of {list(PRECISIONS)}.")


# glibc ``mallopt`` parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
#: Environment variables with which a user has configured glibc's malloc already (theirs wins).
MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
#: Set to ``0`` to leave malloc as it is.
OPT_OUT_VARIABLE = "ESCI_KEEP_FREED_MEMORY"
_DEFAULT_TRIM_THRESHOLD = 1 << 30
_kept = False
#: The trim threshold ``cap_freed_memory`` asked for (None: no cap).
_trim_cap: int | None = None


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux (for ``mallopt``, ``malloc_trim``); None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def malloc_trim() -> bool:
    """Give the free memory of every glibc malloc arena back to the OS (``malloc_trim(0)``).

    Returns True when memory was released; False when there was none, or off glibc.
    """
    libc = glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def keep_freed_memory(trim_threshold: int = _DEFAULT_TRIM_THRESHOLD) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    Why: a forward pass allocates activation tensors of several MB per layer. By default glibc
    serves them from fresh ``mmap`` pages, or trims the heap they came from as soon as they are
    freed, so every forward page-faults its activations in again. Keeping up to 32 MB blocks on
    the heap (``M_MMAP_THRESHOLD``) and not trimming below ``trim_threshold`` bytes of free heap
    (``M_TRIM_THRESHOLD``) took the int8 model from ~230 to ~325 pairs/s on the 2-core dev
    machine; jemalloc or tcmalloc (``LD_PRELOAD``) do the same. The price: the process keeps up
    to ``trim_threshold`` of freed memory mapped (at most ``cap_freed_memory``'s bound, when one is
    set). Process-wide, and set once.

    Returns True when the setting is in effect (also when an earlier call made it); False off
    Linux/glibc, when ``ESCI_KEEP_FREED_MEMORY=0``, or when the user configured malloc through
    ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES`` (theirs wins).
    """
    global _kept
    if _kept:
        return True
    if os.environ.get(OPT_OUT_VARIABLE, "").strip() == "0" or any(v in os.environ for v in MALLOC_VARIABLES):
        return False
    libc = glibc()
    if libc is None:
        return False
    # Both or neither: either one set alone turns off glibc's adaptive thresholds and is slower.
    if libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) != 1:
        return False
    if _trim_cap is not None:
        trim_threshold = min(trim_threshold, _trim_cap)
    if libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) != 1:
        logger.warning("mallopt(M_TRIM_THRESHOLD) failed; freed memory may still be trimmed")
        return False
    _kept = True
    return True


def cap_freed_memory(max_bytes: int) -> bool:
    """Bound the free memory at the top of malloc's heaps that ``keep_freed_memory`` lets it keep:
    its trim threshold becomes at most ``max_bytes``, now if it is in effect, else when it takes
    effect (a server sets the bound at start-up, before the model loads and keeps freed memory).

    Blocks below the mmap threshold still come from the heap and are reused while the free memory
    stays under the bound, so a forward's activations are not page-faulted in again on each pass.
    Returns True when the bound is in effect now; False when ``keep_freed_memory`` has not run (it
    will apply the bound), was turned off, or off glibc (whose defaults already trim eagerly).
    """
    global _trim_cap
    if max_bytes < 1:
        raise ValueError(f"cap_freed_memory(max_bytes={max_bytes}): expected > 0.")
    _trim_cap = int(max_bytes) if _trim_cap is None else min(_trim_cap, int(max_bytes))
    if not _kept:
        return False
    libc = glibc()
    return libc is not None and libc.mallopt(_M_TRIM_THRESHOLD, _trim_cap) == 1


def freed_memory_kept() -> bool:
    """Whether ``keep_freed_memory`` is in effect in this process."""
    return _kept


def select_device(device: str | None = None) -> torch.device:
    """``device`` if given (``auto`` or None picks cuda > mps > cpu).

    Raises:
        ValueError: ``device`` is not a torch device name, or names CUDA on a machine without it
            (which would otherwise fail deep inside the first forward pass).
    """
    if device not in (None, "auto"):
        try:
            chosen = torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"device {device!r}: {err}; expected cpu, cuda, cuda:N, mps or auto.") from None
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this machine has no CUDA GPU; expected cpu, mps or auto.")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
