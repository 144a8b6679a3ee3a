"""Padding-free inference for BERT-style encoders: several padded batches, one pass, no pad tokens.

A reranking request is one query with ~40 candidates of very different lengths. Padded to its
longest candidate, the pair batch and the product-tower batch cost ~1.5x the useful tokens (the
bundled test split, 40 candidates per query). Most of an encoder's work is in its linear layers,
and those treat every token alike, so they can run on the real tokens only, packed into one
(N, H) matrix; only attention, which mixes tokens of one sequence, needs them laid out per
sequence again. ``UnpaddedEncoder`` does that, and runs the pair and both towers of a
``prior: cosine`` model together, so each layer is one set of matrix products instead of three.
Attention runs over chunks of ``ATTENTION_CHUNK`` sequences sorted by length, each padded only
to its own longest sequence.

It reuses the encoder's own modules (so oneDNN-packed linears from ``model.cpu`` stay in use),
with query, key and value fused into one matrix product, and applies only to inference: dropout
is skipped. Under autocast (bf16) it keeps autocast's arithmetic (matrix products, GELU and
attention in bf16; softmax, residual stream and layer norms in fp32) but casts each weight once,
not on every forward, and each activation once per matrix product it feeds, not once per
product. ``UnpaddedEncoder.attach`` refuses an encoder whose layers are not the BERT layout
(query/key/value, output dense + LayerNorm, intermediate, output dense + LayerNorm, absolute
positions, no cross-attention) and checks its output against the encoder's own forward on probe
batches before it is used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esci_reranker.hardware import cpu_bf16_support
from esci_reranker.model.cpu import (
    Bf16Linear,
    CpuDropout,
    OnednnLinear,
    PackedLinear,
    cpu_dropout,
    int8_linear,
    linear,
)

logger = logging.getLogger(__name__)

#: Largest difference to the encoder's own forward (fp32) that ``attach`` accepts.
CHECK_TOLERANCE = 1e-4

_LAYER_PARTS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "intermediate.intermediate_act_fn",
    "output.dense",
    "output.LayerNorm",
)


@dataclass(frozen=True)
class Sequences:
    """One padded batch for the encoder: ids and mask (B, T), token types (B, T) or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None = None


def encoder_states(encoder: nn.Module, seqs: Sequences) -> torch.Tensor:
    """The encoder's own forward on one padded batch: its last hidden state (B, T, H)."""
    extra = {"token_type_ids": seqs.token_type_ids} if seqs.token_type_ids is not None else {}
    return encoder(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, **extra).last_hidden_state


def _get(module: nn.Module, dotted: str) -> object:
    for name in dotted.split("."):
        module = getattr(module, name)
    return module


def unsupported_reason(encoder: nn.Module) -> str | None:
    """Why ``encoder`` cannot run unpadded, or None when its layout is the BERT one."""
    config = getattr(encoder, "config", None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if config is None or layers is None or not hasattr(encoder, "embeddings"):
        return f"{type(encoder).__name__} has no embeddings/encoder.layer"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "decoder or cross-attention encoder"
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position_embedding_type={config.position_embedding_type!r} (only absolute)"
    for layer in layers:
        missing = [part for part in _LAYER_PARTS if not _has(layer, part)]
        if missing:
            return f"{type(layer).__name__} lacks {missing}"
        if hasattr(layer, "crossattention"):
            return "layer with cross-attention"
    return None


def _has(module: nn.Module, dotted: str) -> bool:
    try:
        _get(module, dotted)
    except AttributeError:
        return False
    return True


#: ``_Layer``'s linear layers: fused query/key/value, attention output, MLP in and out.
_LINEARS = ("qkv", "attn_out", "inter", "out")


class _Layer:
    """One BERT layer's modules, with query/key/value fused and per-dtype weight copies."""

    def __init__(self, layer: nn.Module, heads: int) -> None:
        attn = layer.attention
        q, k, v = attn.self.query, attn.self.key, attn.self.value
        fused = nn.Linear(q.in_features, 3 * q.out_features, device=q.weight.device, dtype=q.weight.dtype)
        # Attention's 1/sqrt(head width) is folded into the query rows: one scaling at load
        # instead of one pass over every (T, T) score tensor of every forward.
        scale = (q.out_features // heads) ** -0.5
        with torch.no_grad():
            fused.weight.copy_(torch.cat([q.weight * scale, k.weight, v.weight]))
            fused.bias.copy_(torch.cat([q.bias * scale, k.bias, v.bias]))
        fused.requires_grad_(False)
        self.qkv: nn.Module = PackedLinear(fused) if isinstance(q, PackedLinear) else fused
        self.attn_out = attn.output.dense
        self.ln1 = attn.output.LayerNorm
        self.inter = layer.intermediate.dense
        self.act = layer.intermediate.intermediate_act_fn
        self.out = layer.output.dense
        self.ln2 = layer.output.LayerNorm
        self._cast: dict[torch.dtype, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = {}

    def quantize_int8(self, out_in_bf16: bool) -> None:
        """Swap the linear layers for dynamic int8 ones (``model.cpu.int8_linear``); with
        ``out_in_bf16`` the MLP's output layer computes in bf16 instead (``Bf16Linear``)."""
        for name in _LINEARS:
            module = getattr(self, name)
            setattr(self, name, Bf16Linear(module) if name == "out" and out_in_bf16 else int8_linear(module))
        self._cast.clear()

    def linear(self, name: str, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        module: Any = getattr(self, name)
        if dtype is None:
            return module(x)
        if dtype not in self._cast:
            self._cast[dtype] = {
                n: (m.weight.detach().to(dtype), None if m.bias is None else m.bias.detach().to(dtype))
                for n, m in ((n, getattr(self, n)) for n in _LINEARS)
            }
        weight, bias = self._cast[dtype][name]
        return F.linear(x, weight, bias)


class UnpaddedEncoder:
    """Runs a BERT-style encoder over several padded batches at once, on their real tokens only.

    Call it with a list of ``Sequences``; it returns each batch's last hidden state (B, T, H)
    with zeros at padded positions, as the encoder's own forward would give at the real ones.
    The layers' weights are read once, when it is built: rebuild it after the weights change.
    """

    def __init__(self, encoder: nn.Module) -> None:
        reason = unsupported_reason(encoder)
        if reason is not None:
            raise ValueError(f"cannot run {type(encoder).__name__} unpadded: {reason}.")
        self.encoder = encoder
        self.heads = int(encoder.config.num_attention_heads)
        self.layers = [_Layer(layer, self.heads) for layer in encoder.encoder.layer]
        #: Whether the linear layers run in int8 (``quantize_int8``); then all else runs in fp32.
        self.int8 = False

    @classmethod
    def attach(cls, encoder: nn.Module, probes: Sequence[Sequences]) -> UnpaddedEncoder | None:
        """An ``UnpaddedEncoder`` for ``encoder`` if it has the BERT layout and matches its forward.

        The check runs in fp32 on ``probes`` and compares every real token's hidden state with
        ``encoder(...)``; on a mismatch larger than ``CHECK_TOLERANCE`` it logs why and returns None.
        """
        reason = unsupported_reason(encoder)
        if reason is not None:
            logger.info("unpadded inference off: %s", reason)
            return None
        fast = cls(encoder)
        with torch.inference_mode():
            ours = fast(probes)
            for seqs, hidden in zip(probes, ours, strict=True):
                real = seqs.attention_mask.bool()
                diff = float((encoder_states(encoder, seqs)[real] - hidden[real]).abs().max())
                if not diff <= CHECK_TOLERANCE:
                    logger.warning("unpadded inference off: differs from the encoder by %.2e", diff)
                    return None
        return fast

    def quantize_int8(self, out_in_bf16: bool | None = None) -> None:
        """Run every layer's linear layers in dynamic int8 from now on (``model.cpu.int8_linear``).

        The MLP's output layer is the one int8 hurts most: its input, the GELU output, is
        long-tailed, and one scale per call for all of it rounds the many small values coarsely.
        With ``out_in_bf16`` (default: when the CPU has native bf16) that layer computes in bf16
        instead, which cut the score error against fp32 by ~30% (mean |diff| 0.0139 -> 0.0099 on
        the sample's train/val pairs) for ~1/3 of the GEMM work at ~0.8x int8's rate.

        Call it after ``attach`` (whose check is in fp32). Everything between the linear layers
        stays fp32, and autocast is ignored: these layers take and give fp32.
        """
        if out_in_bf16 is None:
            out_in_bf16 = cpu_bf16_support()[0]
        for layer in self.layers:
            layer.quantize_int8(out_in_bf16)
        self.int8 = True

    def __call__(self, batches: Sequence[Sequences]) -> list[torch.Tensor]:
        """Last hidden states (B_i, T_i, H) of each batch, zeros at padding."""
        device = batches[0].input_ids.device.type
        # Autocast's lower precision, applied by hand below (autocast itself would re-cast the
        # weights on every call and the shared input of query, key and value three times).
        autocasting = torch.is_autocast_enabled(device) and not self.int8
        dtype = torch.get_autocast_dtype(device) if autocasting else None
        with torch.autocast(device, enabled=False):
            shapes = [tuple(b.attention_mask.shape) for b in batches]
            # Flat positions of the real tokens of each batch in its (B*T) layout.
            where = [b.attention_mask.reshape(-1).nonzero().squeeze(1) for b in batches]
            packed = []
            for seqs, idx in zip(batches, where, strict=True):
                extra = {"token_type_ids": seqs.token_type_ids} if seqs.token_type_ids is not None else {}
                states = self.encoder.embeddings(input_ids=seqs.input_ids, **extra)  # (B, T, H)
                packed.append(states.reshape(-1, states.shape[-1]).index_select(0, idx))
            x = torch.cat(packed).float()  # (N, H): every real token of every batch
            # Tokens are reordered once so that each attention chunk is one contiguous run;
            # the per-token layers do not care about order, and the end puts it back.
            order, chunks = _attention_chunks([b.attention_mask for b in batches])
            x = x.index_select(0, order)
            for layer in self.layers:
                x = self._layer(layer, x, dtype, chunks)
            x = torch.empty_like(x).index_copy_(0, order, x)
            out = []
            sizes = [len(idx) for idx in where]
            for (b, t), idx, part in zip(shapes, where, x.split(sizes), strict=True):
                hidden = part.new_zeros((b * t, part.shape[-1]))
                hidden.index_copy_(0, idx, part)
                out.append(hidden.view(b, t, -1))
            return out

    def _layer(
        self, layer: _Layer, x: torch.Tensor, dtype: torch.dtype | None, chunks: list[_Chunk]
    ) -> torch.Tensor:
        qkv = layer.linear("qkv", x if dtype is None else x.to(dtype), dtype)  # (N, 3H)
        ctx = qkv.new_empty((qkv.shape[0], qkv.shape[1] // 3))  # (N, H)
        for chunk in chunks:
            self._attend(qkv[chunk.start : chunk.stop], chunk, out=ctx[chunk.start : chunk.stop])
        hidden = layer.ln1(layer.linear("attn_out", ctx, dtype).float() + x)
        inner = layer.act(layer.linear("inter", hidden if dtype is None else hidden.to(dtype), dtype))
        return layer.ln2(layer.linear("out", inner, dtype).float() + hidden)

    def _attend(self, qkv: torch.Tensor, chunk: _Chunk, out: torch.Tensor) -> None:
        """Self-attention of one chunk of sequences: packed (n, 3H) in, packed (n, H) into ``out``."""
        rows, t = chunk.bias.shape[0], chunk.bias.shape[-1]
        h = qkv.shape[-1] // 3
        d = h // self.heads
        if chunk.slots is None:  # all sequences of the chunk are equally long: no padding
            padded = qkv
        else:
            padded = qkv.new_zeros((rows * t, 3 * h)).index_copy_(0, chunk.slots, qkv)
        q, k, v = (
            part.reshape(rows, t, self.heads, d).transpose(1, 2)
            for part in padded.view(rows, t, 3 * h).split(h, -1)
        )  # (rows, heads, T, d) each
        # Written out rather than scaled_dot_product_attention: for these short sequences and
        # 32-wide heads, CPU's fused kernel ran ~3x slower than two matrix products and a softmax.
        # The queries are pre-scaled (``_Layer``); pad keys get -inf from the additive mask.
        scores = torch.matmul(q, k.transpose(-1, -2)).float().add_(chunk.bias)  # (rows, heads, T, T)
        ctx = torch.matmul(scores.softmax(-1).to(v.dtype), v).transpose(1, 2).reshape(rows * t, h)
        if chunk.slots is None:
            out.copy_(ctx)
        else:  # pad query rows are dropped
            torch.index_select(ctx, 0, chunk.slots, out=out)


#: Sequences per attention call. Sorted by length and cut this fine, each call pads only to its
#: own longest sequence and its score tensor stays in cache (~3x faster than one 40-row call).
ATTENTION_CHUNK = 8


@dataclass(frozen=True)
class _Chunk:
    """A few sequences attended together. Their tokens are rows ``start:stop`` of the reordered
    packed matrix; ``slots`` says where each goes in the chunk's padded (rows*T) layout (None when
    no sequence is shorter than T); ``bias`` is the additive key mask (rows, 1, 1, T): 0 for real
    keys, -inf for padding."""

    start: int
    stop: int
    slots: torch.Tensor | None
    bias: torch.Tensor


def _attention_chunks(masks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[_Chunk]]:
    """Chunks of ``ATTENTION_CHUNK`` sequences, longest first, over every batch's rows, and the
    token order that makes each chunk contiguous.

    Packed tokens are every batch's real tokens in row-major order, batch after batch (as
    ``UnpaddedEncoder.__call__`` builds them), so a row's tokens are one contiguous run. Returns
    ``order`` (packed positions, chunk after chunk: ``x.index_select(0, order)`` reorders) and the
    chunks, whose ``start:stop`` index the reordered tokens.
    """
    lengths = torch.cat([m.sum(-1) for m in masks]).tolist()  # one per sequence, in packed order
    device = masks[0].device
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    by_length = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    chunks, runs, stop = [], [], 0
    for first in range(0, len(by_length), ATTENTION_CHUNK):
        rows = by_length[first : first + ATTENTION_CHUNK]
        sizes = [lengths[r] for r in rows]
        t = sizes[0]
        runs += [torch.arange(starts[r], starts[r] + lengths[r]) for r in rows]
        slots = None
        if min(sizes) < t:
            slots = torch.cat([torch.arange(i * t, i * t + n) for i, n in enumerate(sizes)]).to(device)
        keys = torch.arange(t)[None, :] < torch.tensor(sizes)[:, None]  # (rows, T)
        bias = torch.zeros(keys.shape).masked_fill_(~keys, float("-inf"))[:, None, None, :]
        start, stop = stop, stop + sum(sizes)
        chunks.append(_Chunk(start, stop, slots, bias.to(device)))
    return torch.cat(runs).to(device), chunks


# ---------------------------------------------------------------------------------------------
# training: the same packing, differentiable, on the encoder's live weights
# ---------------------------------------------------------------------------------------------


def packed_states(encoder: nn.Module, batches: Sequence[Sequences]) -> list[torch.Tensor]:
    """Last hidden states (B_i, T_i, H) of each padded batch, zeros at padding, computed on the
    real tokens only and differentiable: the training counterpart of ``UnpaddedEncoder``.

    ``UnpaddedEncoder`` fuses and casts the weights once, which training cannot do (they change
    every step) and which autograd cannot see through. This runs the encoder's own modules at
    every call instead: query/key/value concatenated into one matrix product (the concatenation
    is part of the graph, so each weight gets its gradient), the embeddings, dropouts, dense
    layers and layer norms called as modules (their ``training`` flag, dropout rates and autocast
    behaviour are the encoder's). Attention runs per ``_attention_chunks`` chunk, as at inference.
    With dropout off it computes what ``encoder_states`` computes, to float rounding, and so do
    the gradients (``tests/model/test_unpadded.py``). The caller checks ``unsupported_reason``.
    """
    heads = int(encoder.config.num_attention_heads)
    masks = [b.attention_mask for b in batches]
    shapes = [tuple(m.shape) for m in masks]
    where = [m.reshape(-1).nonzero().squeeze(1) for m in masks]
    packed = []
    for seqs, idx in zip(batches, where, strict=True):
        extra = {"token_type_ids": seqs.token_type_ids} if seqs.token_type_ids is not None else {}
        states = encoder.embeddings(input_ids=seqs.input_ids, **extra)  # (B, T, H)
        packed.append(states.reshape(-1, states.shape[-1]).index_select(0, idx))
    x = torch.cat(packed)  # (N, H): every real token of every batch
    order, chunks = _attention_chunks(masks)
    x = x.index_select(0, order)
    for layer in encoder.encoder.layer:
        x = _train_layer(layer, x, chunks, heads)
    x = x.index_select(0, torch.argsort(order))  # back to batch-after-batch order
    out = []
    for (b, t), idx, part in zip(shapes, where, x.split([len(i) for i in where]), strict=True):
        out.append(part.new_zeros((b * t, part.shape[-1])).index_copy(0, idx, part).view(b, t, -1))
    return out


def _train_layer(layer: nn.Module, x: torch.Tensor, chunks: list[_Chunk], heads: int) -> torch.Tensor:
    """One BERT layer on packed tokens (N, H), as ``BertLayer`` computes it, with autograd."""
    attn = layer.attention
    q, k, v = attn.self.query, attn.self.key, attn.self.value
    # The 1/sqrt(head width) goes into the query rows, as at inference: an (H, H) product per
    # step instead of a pass over every (T, T) score tensor, forward and backward.
    scale = (q.out_features // heads) ** -0.5
    weight = torch.cat([q.weight * scale, k.weight, v.weight])  # (3H, H)
    bias = torch.cat([q.bias * scale, k.bias, v.bias])
    # the fused product takes the kernel of the layer's own linears (oneDNN in fp32 on a CPU
    # when they are ``OnednnLinear``)
    qkv = (linear if isinstance(q, OnednnLinear) else F.linear)(x, weight, bias)  # (N, 3H)
    drop = getattr(attn.self, "dropout", None)
    p = float(drop.p) if isinstance(drop, nn.Dropout) and attn.self.training else 0.0
    # the attention probabilities take the kernel of the layer's own dropout module
    kernel = cpu_dropout if isinstance(drop, CpuDropout) else F.dropout
    ctx = torch.cat([_train_attend(qkv[c.start : c.stop], c, heads, p, kernel) for c in chunks])  # (N, H)
    out = attn.output
    hidden = out.LayerNorm(_dropped(out, out.dense(ctx)) + x)
    inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
    mlp = layer.output
    return mlp.LayerNorm(_dropped(mlp, mlp.dense(inner)) + hidden)


def _dropped(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    drop = getattr(module, "dropout", None)
    return drop(x) if isinstance(drop, nn.Module) else x


def _train_attend(
    qkv: torch.Tensor,
    chunk: _Chunk,
    heads: int,
    dropout: float,
    kernel: Callable[[torch.Tensor, float, bool], torch.Tensor] = F.dropout,
) -> torch.Tensor:
    """Self-attention of one chunk: packed (n, 3H) in, packed (n, H) out, differentiable."""
    rows, t = chunk.bias.shape[0], chunk.bias.shape[-1]
    h = qkv.shape[-1] // 3
    d = h // heads
    padded = qkv if chunk.slots is None else qkv.new_zeros((rows * t, 3 * h)).index_copy(0, chunk.slots, qkv)
    q, k, v = (
        part.reshape(rows, t, heads, d).transpose(1, 2) for part in padded.view(rows, t, 3 * h).split(h, -1)
    )  # (rows, heads, T, d) each
    scores = torch.matmul(q, k.transpose(-1, -2)).float() + chunk.bias  # (rows, heads, T, T)
    probs = kernel(scores.softmax(-1), dropout, dropout > 0).to(v.dtype)
    ctx = torch.matmul(probs, v).transpose(1, 2).reshape(rows * t, h)
    return ctx if chunk.slots is None else ctx.index_select(0, chunk.slots)
