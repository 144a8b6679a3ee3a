"""Faster fp32 CPU inference: run the encoder's linear layers through oneDNN with prepacked weights.

Why: PyTorch's CPU wheels send ``nn.Linear`` (fp32) to MKL's sgemm, which on some CPUs (AMD EPYC
among them) takes a slow code path; on the 2-core EPYC used for development a 2048x384x1536
matmul runs at ~65 GFLOP/s per core through MKL and ~160 GFLOP/s through oneDNN. oneDNN also
wants its weights in a blocked layout; packing them once at load time, rather than on every
call, is what ``torch.compile(..., freezing=True)`` does on CPU. This module does only that one
rewrite, without a compile step, so loading stays instant and every input shape is served.

The rewrite is numerically equivalent (oneDNN and MKL differ only in summation order, ~1e-6)
and is checked on a random input before it is kept; when the oneDNN operators are missing from
the installed torch, or the check fails, the model is left as it was. It is for fp32 only: bf16
autocast already reaches oneDNN, and packing bf16 weights measured no faster end to end here.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

#: Largest allowed difference from ``F.linear`` in the self-check (fp32 rounding is ~1e-6).
_CHECK_TOLERANCE = 1e-4


def onednn_available() -> bool:
    """True when this torch build has the oneDNN linear operators used here."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose fp32 weight is prepacked for oneDNN.

    Keeps the original ``weight``/``bias`` parameters so ``state_dict`` is unchanged (the model
    can still be saved or exported); the packed copy is a non-persistent buffer.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.register_buffer("packed_weight", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            torch.is_grad_enabled()
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or torch.is_autocast_enabled("cpu")
        ):
            return F.linear(x, self.weight, self.bias)  # training, autocast or another device
        bias = self.bias.detach() if self.bias is not None else None
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn=True"


def _check(layer: PackedLinear) -> bool:
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fast = layer(x)
        reference = F.linear(x, layer.weight, layer.bias)
    return bool(torch.allclose(fast, reference, atol=_CHECK_TOLERANCE, rtol=_CHECK_TOLERANCE))


def pack_linears(module: nn.Module) -> int:
    """Replace every fp32 CPU ``nn.Linear`` inside ``module`` by a ``PackedLinear``, in place.

    Returns how many were replaced: 0 when oneDNN is unavailable, the module is not an fp32
    CPU module, or the first packed layer disagrees with ``F.linear`` (then nothing is changed).
    Call it on a model in ``eval()`` mode that will only run inference.
    """
    if not onednn_available():
        return 0
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
        and child.weight.dtype == torch.float32
        and child.weight.device.type == "cpu"
    ]
    if not targets:
        return 0
    try:
        first = PackedLinear(targets[0][2])
        ok = _check(first)
    except RuntimeError as err:  # an operator present but unsupported on this CPU
        logger.info("oneDNN linear unavailable (%s); keeping nn.Linear", err)
        return 0
    if not ok:
        logger.warning("oneDNN linear disagrees with F.linear; keeping nn.Linear")
        return 0
    for parent, name, child in targets:
        setattr(parent, name, first if child is targets[0][2] else PackedLinear(child))
    return len(targets)
