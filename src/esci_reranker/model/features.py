"""Tokenisation of (query, product text) pairs into model inputs, with dynamic padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from esci_reranker.model.config import ModelConfig
from esci_reranker.model.lexical import query_coverages
from esci_reranker.model.registry import family

#: Fixed pairs of varied lengths (one a single character) for checking fast paths against the
#: model's own forward: ONNX export, unpadded inference.
PROBE_PAIRS: Final[tuple[tuple[str, str], ...]] = (
    (
        "mens trail running shoes waterproof",
        "Salomon Speedcross 5 GTX Trail Running Shoes for Men | Salomon | Black/Phantom",
    ),
    ("usb c cable", "Anker USB-C cable 6 ft | Anker"),
    ("!", "x"),
    ("coffee grinder burr electric", "Ground coffee, 1 lb bag | Peet's | Brown"),
)


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids (unpadded lists) of a set of pairs, ready to be cut into padded batches."""

    pair_ids: list[list[int]]
    pair_type_ids: list[list[int]] | None
    query_ids: list[list[int]] | None
    product_ids: list[list[int]] | None
    truncated: list[bool]
    lexical: list[float] | None = None
    #: List-level families only: which candidate list (query) each pair belongs to, as 0..L-1.
    groups: list[int] | None = None

    def __len__(self) -> int:
        return len(self.pair_ids)

    def lengths(self) -> list[int]:
        """Tokens per example over every input the model reads (pair plus towers)."""
        lens = [len(x) for x in self.pair_ids]
        if self.query_ids is not None and self.product_ids is not None:
            lens = [
                a + len(q) + len(p) for a, q, p in zip(lens, self.query_ids, self.product_ids, strict=True)
            ]
        return lens


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Index arrays of the inference passes over pairs of these token ``lengths``: longest first
    (ties keep input order), ``batch_size`` each; only the last pass may be shorter."""
    # Longest first, so the first pass shows the worst-case memory and padding is minimal.
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


class PairEncoder:
    """Turns queries and product texts into the inputs ``RerankerModel.forward`` takes.

    The pair is "[CLS] query [SEP] product [SEP]" cut to ``config.max_length`` (longest side
    first); with the cosine prior, query and product are also encoded alone for the two towers;
    with ``lexical``, the query-word coverage of each pair is computed too.
    """

    #: Whether the model needs whole candidate lists per forward pass (see ``list_batches``).
    list_level: bool = False

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: ModelConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, queries: Sequence[str], texts: Sequence[str]) -> EncodedPairs:
        """Tokenise without padding. ``truncated[i]`` is True when pair i lost tokens."""
        if len(queries) != len(texts):
            raise ValueError(f"got {len(queries)} queries but {len(texts)} product texts.")
        cfg = self.config
        pair = self.tokenizer(
            list(queries), list(texts), truncation="longest_first", max_length=cfg.max_length
        )
        ids = pair["input_ids"]
        truncated = [len(x) >= cfg.max_length for x in ids]
        maybe = [i for i, t in enumerate(truncated) if t]
        if maybe:
            # A pair exactly max_length long may not have been cut: re-check only those few (in
            # full, so quietly: a tokenizer saved with the trained length would warn about each).
            full = self.tokenizer([queries[i] for i in maybe], [texts[i] for i in maybe], verbose=False)[
                "input_ids"
            ]
            for i, f in zip(maybe, full, strict=True):
                truncated[i] = len(f) > cfg.max_length
        query_ids = product_ids = None
        if cfg.prior == "cosine":
            query_ids = self.tokenizer(list(queries), truncation=True, max_length=cfg.query_max_length)[
                "input_ids"
            ]
            product_ids = self.tokenizer(list(texts), truncation=True, max_length=cfg.product_max_length)[
                "input_ids"
            ]
        return EncodedPairs(
            pair_ids=ids,
            pair_type_ids=pair.get("token_type_ids"),
            query_ids=query_ids,
            product_ids=product_ids,
            truncated=truncated,
            lexical=query_coverages(queries, texts) if cfg.lexical else None,
        )

    def _pad(self, seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max((len(s) for s in seqs), default=1)
        ids = torch.full((len(seqs), width), value, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return ids, mask

    def collate(self, encoded: EncodedPairs, index: Sequence[int]) -> dict[str, Any]:
        """Padded tensors for the examples at ``index`` (dynamic padding to the batch maximum)."""
        batch: dict[str, Any] = {}
        batch["input_ids"], batch["attention_mask"] = self._pad(
            [encoded.pair_ids[i] for i in index], self.pad_id
        )
        if encoded.pair_type_ids is not None:
            batch["token_type_ids"], _ = self._pad([encoded.pair_type_ids[i] for i in index], 0)
        if encoded.query_ids is not None and encoded.product_ids is not None:
            # Each distinct query (product) goes through its tower once per batch: a reranking
            # request is one query with many candidates, so this drops the query tower's cost
            # to a single row; ``*_index`` maps every pair back to its row.
            for side, seqs in (("query", encoded.query_ids), ("product", encoded.product_ids)):
                unique, rows = unique_rows([seqs[i] for i in index])
                batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"] = self._pad(unique, self.pad_id)
                batch[f"{side}_index"] = torch.tensor(rows, dtype=torch.long)  # (B,)
        if encoded.lexical is not None:
            batch["lexical"] = torch.tensor([encoded.lexical[i] for i in index], dtype=torch.float32)  # (B,)
        return batch


def pair_encoder_for(tokenizer: PreTrainedTokenizerBase, config: ModelConfig) -> PairEncoder:
    """The input builder of ``config``'s model family (``model.registry``): e.g. the chat prompt
    of the LLM family, the pair encoder with candidate-list ids of the listwise family, else
    ``PairEncoder``."""
    encoder = family(config.model_type).pair_encoder or PairEncoder
    return encoder(tokenizer, config)


def unique_rows(seqs: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Distinct sequences in first-seen order, and for each input the row of its sequence."""
    row_of: dict[tuple[int, ...], int] = {}
    rows = [row_of.setdefault(tuple(seq), len(row_of)) for seq in seqs]
    unique = [list(key) for key in row_of]
    return unique, rows
