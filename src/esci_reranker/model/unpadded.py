"""Padding-free inference for BERT-style encoders: several padded batches, one pass, no pad tokens.

A reranking request is one query with ~40 candidates of very different lengths. Padded to its
longest candidate, the pair batch and the product-tower batch cost ~1.5x the useful tokens (the
bundled test split, 40 candidates per query). Most of an encoder's work is in its linear layers,
and those treat every token alike, so they can run on the real tokens only, packed into one
(N, H) matrix; only attention, which mixes tokens of one sequence, needs them laid out per
sequence again. ``UnpaddedEncoder`` does that, and runs the pair and both towers of a
``prior: cosine`` model together, so each layer is one set of matrix products instead of three.

It reuses the encoder's own modules (so oneDNN-packed linears from ``model.cpu`` stay in use) and
applies only to inference: dropout is skipped. ``UnpaddedEncoder.attach`` refuses an encoder whose
layers are not the BERT layout (query/key/value, output dense + LayerNorm, intermediate, output
dense + LayerNorm, absolute positions, no cross-attention) and checks its output against the
encoder's own forward on probe batches before it is used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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


class UnpaddedEncoder:
    """Runs a BERT-style encoder over several padded batches at once, on their real tokens only.

    Call it with a list of ``Sequences``; it returns each batch's last hidden state (B, T, H)
    with zeros at padded positions, as the encoder's own forward would give at the real ones.
    """

    def __init__(self, encoder: nn.Module) -> None:
        reason = unsupported_reason(encoder)
        if reason is not None:
            raise ValueError(f"cannot run {type(encoder).__name__} unpadded: {reason}.")
        self.encoder = encoder
        self.heads = int(encoder.config.num_attention_heads)

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
                extra = {"token_type_ids": seqs.token_type_ids} if seqs.token_type_ids is not None else {}
                ref = encoder(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, **extra)
                real = seqs.attention_mask.bool()
                diff = float((ref.last_hidden_state[real] - hidden[real]).abs().max())
                if not diff <= CHECK_TOLERANCE:
                    logger.warning("unpadded inference off: differs from the encoder by %.2e", diff)
                    return None
        return fast

    def __call__(self, batches: Sequence[Sequences]) -> list[torch.Tensor]:
        """Last hidden states (B_i, T_i, H) of each batch, zeros at padding."""
        enc = self.encoder
        masks = [b.attention_mask.bool() for b in batches]
        packed = []
        for seqs, real in zip(batches, masks, strict=True):
            extra = {"token_type_ids": seqs.token_type_ids} if seqs.token_type_ids is not None else {}
            packed.append(enc.embeddings(input_ids=seqs.input_ids, **extra)[real])  # (N_i, H)
        x = torch.cat(packed)  # (N, H): every real token of every batch
        sizes = [len(p) for p in packed]
        for layer in enc.encoder.layer:
            x = self._layer(layer, x, masks, sizes)
        out = []
        for real, part in zip(masks, x.split(sizes), strict=True):
            hidden = part.new_zeros((*real.shape, part.shape[-1]))
            hidden[real] = part
            out.append(hidden)
        return out

    def _layer(
        self, layer: nn.Module, x: torch.Tensor, masks: list[torch.Tensor], sizes: list[int]
    ) -> torch.Tensor:
        attn = layer.attention
        q, k, v = attn.self.query(x), attn.self.key(x), attn.self.value(x)  # (N, H) each
        context = []
        for real, qp, kp, vp in zip(masks, q.split(sizes), k.split(sizes), v.split(sizes), strict=True):
            context.append(self._attend(real, qp, kp, vp))
        ctx = torch.cat(context)  # (N, H)
        hidden = attn.output.LayerNorm(attn.output.dense(ctx) + x)
        inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
        return layer.output.LayerNorm(layer.output.dense(inner) + hidden)

    def _attend(self, real: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-attention of one batch: packed (N_i, H) in, packed (N_i, H) out."""
        b, t = real.shape
        h = q.shape[-1]
        d = h // self.heads

        def heads(packed: torch.Tensor) -> torch.Tensor:
            padded = packed.new_zeros((b, t, h))
            padded[real] = packed
            return padded.view(b, t, self.heads, d).transpose(1, 2)  # (B, heads, T, d)

        out = F.scaled_dot_product_attention(
            heads(q), heads(k), heads(v), attn_mask=real[:, None, None, :]
        )  # (B, heads, T, d); pad keys masked out, pad queries dropped below
        return out.transpose(1, 2).reshape(b, t, h)[real]
