"""Faster CPU inference and training: oneDNN fp32 linear layers, or dynamic int8 ones.

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

``quantize_linears`` / ``int8_linear`` are the int8 option (``precision="int8"``): each linear
layer keeps an int8 copy of its weight (one scale per output channel), and every call quantises
its fp32 input on the fly (one scale per call) and runs an int8 matrix product with int32
accumulation (FBGEMM, AVX-512 VNNI where the CPU has it). On the 2-core EPYC used for
development a 3000x384x1152 product runs at ~1300 GFLOP/s this way, ~800 in bf16 and ~190 in
fp32. Inputs, outputs and everything between the linear layers stay fp32. The operators are
PyTorch's eager dynamic quantisation (``torch.ao.nn.quantized.dynamic.Linear``), which PyTorch
marks deprecated in favour of torchao; torchao's CPU int8 path quantises activations with
separate elementwise ops and measured slower than bf16 here, so these are used while the pinned
torch range has them, and their absence is reported as a clear error. ``Bf16Linear`` computes
one layer in bf16 with fp32 input and output, for layers int8 rounds too coarsely
(``model.unpadded`` uses it for the MLP's output layer).

``OnednnLinear`` / ``use_onednn_linears`` take the same route for fp32 *training*: forward, input
gradient and weight gradient on oneDNN, the weight reordered on every call (it changes every
step), rows in pieces of a few fixed shapes so that oneDNN's per-shape kernels stay few. Under
bf16 autocast and on other devices they call ``F.linear``.

``cpu_dropout`` / ``CpuDropout`` are for training: PyTorch's CPU dropout draws one Bernoulli
number per element (~170M elements/s on the development host), which made dropout about a
fifth of a training step of the default model. Here each 64-bit random draw gives three 16-bit
uniforms, compared with ``round(p * 65536)``: the same kind of mask, at ~2x the speed forward and
backward together (``esci-reranker bench-train`` measures the training step with it).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

#: Largest allowed difference from ``F.linear`` in the self-check (fp32 rounding is ~1e-6).
_CHECK_TOLERANCE = 1e-4


def _child_slots(
    module: nn.Module, wanted: Callable[[nn.Module], bool]
) -> list[tuple[nn.Module, str, nn.Module]]:
    """Every ``(parent, attribute name, child)`` inside ``module`` whose child is ``wanted``: the
    places the rewrites below put a replacement with ``setattr``."""
    return [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if wanted(child)
    ]


def onednn_available() -> bool:
    """True when this torch build has the oneDNN linear operators used here."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight")


def tensor_version(weight: torch.Tensor) -> int:
    """The tensor's version counter, which every in-place change moves (-1 for an inference
    tensor, which keeps none: it cannot change outside inference mode)."""
    try:
        return int(weight._version)
    except RuntimeError:
        return -1


class PackedLinear(nn.Module):
    """An inference-only ``nn.Linear`` whose fp32 weight is prepacked for oneDNN.

    Keeps the original ``weight``/``bias`` parameters so ``state_dict`` is unchanged (the model
    can still be saved or exported); the packed copy is a non-persistent buffer. A weight changed
    in place after packing (an optimiser step, ``load_state_dict``) is packed again before the
    next forward that uses the packed copy, so the layer never computes with stale weights.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("packed_weight", self._pack(), persistent=False)

    def _pack(self) -> torch.Tensor:
        self._packed_version = tensor_version(self.weight)
        with torch.no_grad():
            return torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            torch.is_grad_enabled()
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or torch.is_autocast_enabled("cpu")
        ):
            return F.linear(x, self.weight, self.bias)  # training, autocast or another device
        if tensor_version(self.weight) != self._packed_version:
            self.packed_weight = self._pack()
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
    targets = _child_slots(
        module,
        lambda child: (
            type(child) is nn.Linear
            and child.weight.dtype == torch.float32
            and child.weight.device.type == "cpu"
        ),
    )
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


def int8_available() -> bool:
    """True when this torch build can run dynamic int8 linear layers on the CPU."""
    try:
        from torch.ao.nn.quantized.dynamic import Linear  # noqa: F401
    except ImportError:
        return False
    engines = torch.backends.quantized.supported_engines
    return any(engine in engines for engine in ("x86", "fbgemm", "onednn"))


def int8_linear(linear: nn.Module) -> nn.Module:
    """An inference-only dynamic int8 copy of an fp32 ``nn.Linear`` (or ``PackedLinear``).

    Raises:
        RuntimeError: this torch build has no dynamic int8 linear for the CPU.
    """
    if not int8_available():
        raise RuntimeError(
            "precision='int8' needs PyTorch's dynamic int8 linear layers (torch.ao.nn.quantized."
            f"dynamic with the x86/fbgemm engine), which torch {torch.__version__} lacks; use "
            "precision='bf16' or an ONNX int8 export (`esci-reranker export --format onnx --quantize int8`)."
        )
    plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        plain.weight.copy_(linear.weight.detach().float())
        if linear.bias is not None:
            plain.bias.copy_(linear.bias.detach().float())
    with warnings.catch_warnings():
        # PyTorch flags quantised tensors as deprecated; the module docstring says why they are used.
        warnings.filterwarnings("ignore", category=UserWarning, message=".*quantiz.*deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.ao.quantization")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        plain.qconfig = per_channel_dynamic_qconfig  # type: ignore[assignment]
        return DynamicInt8Linear.from_float(plain)


class Bf16Linear(nn.Module):
    """An inference-only linear layer that computes in bf16 and answers in fp32: its input is
    cast once, its weight was cast once at construction."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_bf16", linear.weight.detach().to(torch.bfloat16), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias_bf16", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight_bf16, self.bias_bf16).float()


def quantize_linears(module: nn.Module) -> int:
    """Replace every fp32 CPU ``nn.Linear`` / ``PackedLinear`` inside ``module`` by ``int8_linear``
    of it, in place; returns how many. For a model in ``eval()`` mode that will only run inference.

    Raises:
        RuntimeError: this torch build has no dynamic int8 linear for the CPU.
    """
    targets = _child_slots(
        module, lambda child: type(child) in (nn.Linear, PackedLinear) and child.weight.device.type == "cpu"
    )
    for parent, name, child in targets:
        setattr(parent, name, int8_linear(child))
    return len(targets)


def onednn_training_available() -> bool:
    """True when this torch build also has oneDNN's weight-gradient operator (``OnednnLinear``)."""
    return onednn_available() and hasattr(torch.ops.aten, "mkldnn_linear_backward_weights")


#: ``OnednnLinear`` runs its rows (tokens) through oneDNN in pieces of this many rows, the last
#: piece padded with zero rows to a multiple of ``ROW_ALIGN``. oneDNN (and ideep above it) build
#: and keep a kernel per input shape, and a padding-free batch has a new token count at every
#: step: kept kernels, and the memory behind them, grew by ~1 GB over 150 steps of the default
#: with whole batches. In pieces, a layer meets at most ``ROW_PIECE / ROW_ALIGN`` shapes, and
#: pieces of 512 rows run at the speed of whole batches (~500 GFLOP/s forward on the 2-core EPYC).
ROW_PIECE = 512
#: See ``ROW_PIECE``: the zero rows of the last piece cost under 64 rows of products per call.
ROW_ALIGN = 64


def _pieces(rows: torch.Tensor) -> list[torch.Tensor]:
    """``rows`` (N, K) as contiguous pieces of ``ROW_PIECE`` rows, the last one zero-padded to a
    multiple of ``ROW_ALIGN`` rows."""
    rows = rows.contiguous()
    pieces = list(rows.split(ROW_PIECE))
    extra = -pieces[-1].shape[0] % ROW_ALIGN
    if extra:
        pieces[-1] = torch.cat([pieces[-1], rows.new_zeros((extra, rows.shape[1]))])
    return pieces


def _onednn_rows(
    pieces: list[torch.Tensor], packed: torch.Tensor, bias: torch.Tensor | None, n: int
) -> torch.Tensor:
    """``F.linear`` of the first ``n`` rows of ``pieces`` with a oneDNN-packed weight: (n, out)."""
    outs = [torch.ops.mkldnn._linear_pointwise(p, packed, bias, "none", [], "") for p in pieces]
    return torch.cat(outs)[:n] if len(outs) > 1 else outs[0][:n]


class _OnednnLinearFunction(torch.autograd.Function):
    """``F.linear`` in fp32 on the CPU with oneDNN's kernels for the forward and both gradients.

    The weight changes every step, so it is reordered into oneDNN's layout on every call; that
    is a pass over the weight, small beside a product over a batch's thousands of tokens. Rows
    go through in pieces (``ROW_PIECE``), so oneDNN sees few distinct shapes."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        out = _onednn_rows(_pieces(rows), packed, bias, rows.shape[0])
        ctx.save_for_backward(rows, weight)
        ctx.input_shape = x.shape  # type: ignore[attr-defined]
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        rows, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        need_x, need_w, need_b = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_pieces = _pieces(grad.reshape(-1, grad.shape[-1]))
        grad_x = grad_w = grad_b = None
        if need_x:  # dX = dY W: a linear layer whose weight is W transposed
            packed_t = torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(), None)
            grad_x = _onednn_rows(grad_pieces, packed_t, None, rows.shape[0])
            grad_x = grad_x.view(ctx.input_shape)  # type: ignore[attr-defined]
        if need_w or need_b:  # dW = dY^T X and db = the column sums of dY, summed over the pieces
            has_bias = ctx.has_bias  # type: ignore[attr-defined]
            # the zero rows padding the last pieces of both add nothing to either sum
            for g, x in zip(grad_pieces, _pieces(rows), strict=True):
                piece_w, piece_b = torch.ops.aten.mkldnn_linear_backward_weights(
                    g.to_mkldnn(), x.to_mkldnn(), weight, has_bias
                )
                grad_w = piece_w if grad_w is None else grad_w.add_(piece_w)
                if has_bias:
                    grad_b = piece_b if grad_b is None else grad_b.add_(piece_b)
            grad_w = grad_w if need_w else None
            grad_b = grad_b if need_b and has_bias else None
        return grad_x, grad_w, grad_b


def _onednn_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() >= 1
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that runs on oneDNN for fp32 CPU tensors outside autocast (else ``F.linear``),
    differentiable in every argument. Checked once against ``F.linear`` (``onednn_training_ok``)."""
    if _onednn_fits(x, weight) and onednn_training_ok():
        return _OnednnLinearFunction.apply(x, weight, bias)
    return F.linear(x, weight, bias)


@functools.cache
def onednn_training_ok() -> bool:
    """Whether ``linear``'s oneDNN path is present and gives ``F.linear``'s output and gradients
    (to 1e-4) on a random input; checked once per process, False keeps ``F.linear``."""
    if not onednn_training_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=gen) for shape in ((2, 7, 24), (40, 24), (40,)))
    grad = torch.randn(2, 7, 40, generator=gen)
    results = []
    try:
        for fn in (_OnednnLinearFunction.apply, F.linear):
            leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
            out = fn(*leaves)
            out.backward(grad)
            results.append([out.detach(), *(t.grad for t in leaves)])
    except RuntimeError as err:  # an operator present but unsupported on this CPU
        logger.info("oneDNN training linear unavailable (%s); keeping F.linear", err)
        return False
    ok = all(
        torch.allclose(a, b, atol=_CHECK_TOLERANCE, rtol=_CHECK_TOLERANCE)
        for a, b in zip(*results, strict=True)
    )
    if not ok:
        logger.warning("oneDNN training linear disagrees with F.linear; keeping F.linear")
    return ok


class OnednnLinear(nn.Linear):
    """An ``nn.Linear`` (the same parameters and state dict) that trains through ``linear``:
    oneDNN for fp32 on the CPU, ``F.linear`` under autocast and on other devices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_onednn_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` inside ``module`` by an ``OnednnLinear`` holding the same
    parameter objects, in place; returns how many (0 when the oneDNN path is unavailable or
    fails its check). Optimisers built before or after see the same parameters."""
    if not onednn_training_ok():
        return 0
    targets = _child_slots(module, lambda child: type(child) is nn.Linear)
    for parent, name, child in targets:
        setattr(parent, name, _as_class(child, OnednnLinear))
    return len(targets)


def use_torch_linears(module: nn.Module) -> int:
    """The inverse of ``use_onednn_linears``: every ``OnednnLinear`` back to ``nn.Linear``; how many."""
    targets = _child_slots(module, lambda child: isinstance(child, OnednnLinear))
    for parent, name, child in targets:
        setattr(parent, name, _as_class(child, nn.Linear))
    return len(targets)


def _as_class(linear: nn.Linear, cls: type[nn.Linear]) -> nn.Linear:
    """A ``cls`` module with ``linear``'s parameter objects (not copies) and training flag."""
    swapped = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    swapped.weight = linear.weight
    swapped.bias = linear.bias
    swapped.train(linear.training)
    return swapped


#: Resolution of ``cpu_dropout``'s drop probability: it drops with ``round(p * 2**16) / 2**16``.
DROPOUT_LEVELS = 1 << 16


class _MaskedScale(torch.autograd.Function):
    """``x * keep * scale`` that keeps the boolean mask (1 byte an element) for the backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, keep: torch.Tensor, scale: float):  # type: ignore[override]
        ctx.save_for_backward(keep)
        ctx.scale = scale  # type: ignore[attr-defined]
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):  # type: ignore[override]
        (keep,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad.mul(keep).mul_(ctx.scale), None, None  # type: ignore[attr-defined]


def dropout_keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> tuple[torch.Tensor, float]:
    """A boolean keep mask of ``shape`` on the CPU (each element kept with probability
    ``1 - q``, ``q = round(p * 2**16) / 2**16``) and ``1 / (1 - q)``, the scale that keeps the
    expectation; drawn from PyTorch's default CPU generator, so ``torch.manual_seed`` fixes it."""
    n = math.prod(shape)
    draws = (n + 2) // 3
    bits = torch.empty(draws, dtype=torch.int64).random_()  # uniform on [0, 2**63): 63 random bits
    # the three low 16-bit words of each draw are uniform; the top word has its sign bit fixed
    words = bits.view(torch.int16).view(draws, 4)[:, :3].reshape(-1)[:n]
    level = round(p * DROPOUT_LEVELS)
    keep = (words >= level - DROPOUT_LEVELS // 2).view(shape)  # int16 words: -32768 .. 32767
    return keep, DROPOUT_LEVELS / (DROPOUT_LEVELS - level)


def cpu_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the faster mask on CPU tensors (``F.dropout`` elsewhere).

    The drop probability is ``p`` rounded to a multiple of 2**-16 (0.1 -> 0.100006).
    """
    if not training or p <= 0.0 or x.device.type != "cpu" or not x.is_floating_point():
        return F.dropout(x, p, training)
    if p >= 1.0:
        return x * 0.0
    keep, scale = dropout_keep_mask(x.shape, p)
    return _MaskedScale.apply(x, keep, scale)


class CpuDropout(nn.Dropout):
    """``nn.Dropout`` that uses ``cpu_dropout`` (same ``p``, no parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # rare; the in-place form keeps PyTorch's kernel
            return super().forward(x)
        return cpu_dropout(x, self.p, self.training)


def use_cpu_dropout(module: nn.Module) -> int:
    """Replace every ``nn.Dropout`` inside ``module`` by a ``CpuDropout`` of the same ``p``, in
    place; returns how many. On other devices the replacement calls ``F.dropout`` as before."""
    targets = _child_slots(module, lambda child: type(child) is nn.Dropout)
    for parent, name, child in targets:
        setattr(parent, name, CpuDropout(child.p, child.inplace))
    return len(targets)


def use_torch_dropout(module: nn.Module) -> int:
    """The inverse of ``use_cpu_dropout``: every ``CpuDropout`` back to ``nn.Dropout``; how many."""
    targets = _child_slots(module, lambda child: isinstance(child, CpuDropout))
    for parent, name, child in targets:
        setattr(parent, name, nn.Dropout(child.p, child.inplace))
    return len(targets)
