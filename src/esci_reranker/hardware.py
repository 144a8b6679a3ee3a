"""What the machine can do: CPU model and flags, native bf16, and the precision to use by default."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Literal

import torch

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
