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
