"""Machine capabilities and the default precision."""

from __future__ import annotations

import pytest
import torch

from esci_reranker import hardware


def test_auto_precision_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: (True, "flags"))
    assert hardware.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: (False, "none"))
    assert hardware.resolve_precision("auto", cpu) == "fp32"
    assert hardware.resolve_precision("bf16", cpu) == "bf16"
    assert not hardware.bf16_native(torch.device("meta"))


def test_unknown_precision_is_named():
    with pytest.raises(
        ValueError, match=r"precision='fp8'; expected 'auto' or one of \['fp32', 'bf16', 'int8'\]"
    ):
        hardware.resolve_precision("fp8", torch.device("cpu"))


def test_int8_is_asked_for_and_cpu_only(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_support", lambda: (False, "none"))
    assert hardware.resolve_precision("auto", torch.device("cpu")) == "fp32"  # auto never picks int8
    assert hardware.resolve_precision("int8", torch.device("cpu")) == "int8"
    with pytest.raises(ValueError, match="int8' runs on the CPU only, not on cuda"):
        hardware.resolve_precision("int8", torch.device("cuda"))


def test_cpu_bf16_support_reads_the_flags(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert hardware.cpu_bf16_support() == (True, "cpu flags ['avx512_bf16']")
    monkeypatch.setattr(hardware, "cpu_flags", set)
    supported, why = hardware.cpu_bf16_support()
    assert supported == ("AMX" in torch.backends.cpu.get_cpu_capability().upper())
    assert why


class _FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


@pytest.fixture
def fresh_malloc_state(monkeypatch):
    """keep_freed_memory with no earlier call in effect, no malloc variables, a fake libc."""
    monkeypatch.setattr(hardware, "_kept", False)
    monkeypatch.setattr(hardware, "_trim_cap", None)
    for name in (*hardware.MALLOC_VARIABLES, hardware.OPT_OUT_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    libc = _FakeLibc()
    monkeypatch.setattr(hardware, "glibc", lambda: libc)
    return libc


def test_keep_freed_memory_sets_both_thresholds_once(fresh_malloc_state):
    libc = fresh_malloc_state
    assert not hardware.freed_memory_kept()
    assert hardware.keep_freed_memory(trim_threshold=1234) is True
    # M_MMAP_THRESHOLD (-3) to glibc's 64-bit maximum, then M_TRIM_THRESHOLD (-1)
    assert libc.calls == [(-3, 32 * 1024 * 1024), (-1, 1234)]
    assert hardware.freed_memory_kept()
    assert hardware.keep_freed_memory() is True
    assert len(libc.calls) == 2  # set once per process


def test_a_cap_set_before_keep_freed_memory_lowers_its_trim_threshold(fresh_malloc_state):
    libc = fresh_malloc_state
    assert hardware.cap_freed_memory(64 * 1024 * 1024) is False  # not in effect yet: applied later
    assert libc.calls == []
    assert hardware.keep_freed_memory() is True
    assert libc.calls == [(-3, 32 * 1024 * 1024), (-1, 64 * 1024 * 1024)]  # not 1 GB


def test_a_cap_set_after_keep_freed_memory_applies_at_once_and_only_lowers(fresh_malloc_state):
    libc = fresh_malloc_state
    assert hardware.keep_freed_memory() is True
    assert libc.calls[-1] == (-1, 1 << 30)
    assert hardware.cap_freed_memory(128 * 1024 * 1024) is True
    assert libc.calls[-1] == (-1, 128 * 1024 * 1024)
    assert hardware.cap_freed_memory(512 * 1024 * 1024) is True  # a looser cap keeps the tighter
    assert libc.calls[-1] == (-1, 128 * 1024 * 1024)
    with pytest.raises(ValueError, match="expected > 0"):
        hardware.cap_freed_memory(0)


def test_a_cap_leaves_a_users_malloc_settings_alone(fresh_malloc_state, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert hardware.cap_freed_memory(64 * 1024 * 1024) is False
    assert hardware.keep_freed_memory() is False
    assert fresh_malloc_state.calls == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MALLOC_TRIM_THRESHOLD_", "1000"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1"),
        ("ESCI_KEEP_FREED_MEMORY", "0"),
    ],
)
def test_keep_freed_memory_leaves_a_users_malloc_settings_alone(
    fresh_malloc_state, monkeypatch, variable, value
):
    monkeypatch.setenv(variable, value)
    assert hardware.keep_freed_memory() is False
    assert fresh_malloc_state.calls == []
    assert not hardware.freed_memory_kept()


def test_keep_freed_memory_reports_failure_and_non_glibc(fresh_malloc_state, monkeypatch):
    fresh_malloc_state.answer = 0  # mallopt refused
    assert hardware.keep_freed_memory() is False
    assert not hardware.freed_memory_kept()
    monkeypatch.setattr(hardware, "glibc", lambda: None)  # macOS, musl, Windows
    assert hardware.keep_freed_memory() is False


def test_reranker_keeps_freed_memory_on_cpu_unless_told_not_to(fresh_malloc_state, tiny_checkpoint):
    from esci_reranker.reranker import Reranker

    untouched = Reranker.from_pretrained(tiny_checkpoint, device="cpu", keep_freed_memory=False)
    assert fresh_malloc_state.calls == []
    assert untouched.info()["keeps_freed_memory"] is False
    tuned = Reranker.from_pretrained(tiny_checkpoint, device="cpu")
    assert len(fresh_malloc_state.calls) == 2
    assert tuned.info()["keeps_freed_memory"] is True
