"""Tokenisation of (query, product text) pairs into model inputs, with dynamic padding."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, overload

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

#: Pairs handed to the tokenizer at once by ``PairEncoder.encode``: its Python lists of ids live
#: for one chunk only, before they are packed into ``TokenRows``.
ENCODE_CHUNK: Final = 8192


class TokenRows(Sequence[list[int]]):
    """Rows of token ids (one per pair or text) held in one flat array with row offsets.

    A Python list of token ids costs ~36 bytes a token (an 8-byte pointer and a 28-byte int for
    every id above 256); here a token costs 4 bytes (1 for token types), so the ~1.4M training
    pairs of the full ESCI data are ~1 GB tokenised instead of ~25. A row reads back as a list of
    ints, as the tokenizer gave it.
    """

    __slots__ = ("_flat", "_offsets")

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(flat):
            raise ValueError("TokenRows: offsets must run from 0 to len(flat).")
        self._flat = flat
        self._offsets = offsets.astype(np.int64, copy=False)

    @staticmethod
    def _offsets_of(lengths: np.ndarray) -> np.ndarray:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return offsets

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[int]], dtype: type = np.int32) -> TokenRows:
        """Pack rows of ids (lists, or arrays) into one array of ``dtype``."""
        rows = rows if isinstance(rows, list | tuple) else list(rows)
        if rows and isinstance(rows[0], np.ndarray):
            arrays = [np.asarray(r, dtype=dtype) for r in rows]
            lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
            return cls(np.concatenate(arrays), cls._offsets_of(lengths))
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = cls._offsets_of(lengths)
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=int(offsets[-1]))
        return cls(flat, offsets)

    @classmethod
    def concat(cls, parts: Sequence[TokenRows]) -> TokenRows:
        """The rows of ``parts``, one after another."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls(np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int64))
        lengths = np.concatenate([p.lengths() for p in parts])
        return cls(np.concatenate([p._flat for p in parts]), cls._offsets_of(lengths))

    def lengths(self) -> np.ndarray:
        """(N,) ids per row."""
        return np.diff(self._offsets)

    def row_array(self, i: int) -> np.ndarray:
        """Row ``i`` as an array (a view of the packed ids)."""
        return self._flat[self._offsets[i] : self._offsets[i + 1]]

    def take(self, index: Sequence[int] | np.ndarray) -> TokenRows:
        """The rows at ``index``, in that order, packed anew."""
        index = np.asarray(index, dtype=np.int64)
        starts = self._offsets[:-1][index]
        lengths = self._offsets[1:][index] - starts
        offsets = self._offsets_of(lengths)
        # each output position reads its row's start plus its place within the row
        positions = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return TokenRows(self._flat[positions], offsets)

    @property
    def nbytes(self) -> int:
        return int(self._flat.nbytes + self._offsets.nbytes)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> list[int]: ...
    @overload
    def __getitem__(self, i: slice) -> TokenRows: ...
    def __getitem__(self, i: int | slice) -> list[int] | TokenRows:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} of {n}")
        return self._flat[self._offsets[i] : self._offsets[i + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for start, stop in itertools.pairwise(self._offsets.tolist()):
            yield self._flat[start:stop].tolist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TokenRows):
            return bool(
                np.array_equal(self._offsets, other._offsets) and np.array_equal(self._flat, other._flat)
            )
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and all(a == list(b) for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TokenRows({len(self)} rows, {len(self._flat)} ids, {self._flat.dtype})"


def _packed(rows: Sequence[Sequence[int]] | None, dtype: type = np.int32) -> TokenRows | None:
    if rows is None or isinstance(rows, TokenRows):
        return rows
    return TokenRows.from_rows(rows, dtype)


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids (unpadded rows) of a set of pairs, ready to be cut into padded batches.

    ``PairEncoder`` packs the id columns as ``TokenRows``; other builders may pass lists of lists.
    Either way ``column[i]`` is pair i's ids as a list.
    """

    pair_ids: Sequence[list[int]]
    pair_type_ids: Sequence[list[int]] | None
    query_ids: Sequence[list[int]] | None
    product_ids: Sequence[list[int]] | None
    truncated: list[bool]
    lexical: list[float] | None = None
    #: List-level families only: which candidate list (query) each pair belongs to, as 0..L-1.
    groups: list[int] | None = None

    def __len__(self) -> int:
        return len(self.pair_ids)

    def lengths(self) -> list[int]:
        """Tokens per example over every input the model reads (pair plus towers)."""
        columns = [self.pair_ids]
        if self.query_ids is not None and self.product_ids is not None:
            columns += [self.query_ids, self.product_ids]
        total = np.zeros(len(self), dtype=np.int64)
        for seqs in columns:
            total += seqs.lengths() if isinstance(seqs, TokenRows) else np.fromiter(map(len, seqs), np.int64)
        return total.tolist()

    @classmethod
    def concat(cls, parts: Sequence[EncodedPairs]) -> EncodedPairs:
        """The pairs of ``parts`` (``PairEncoder`` outputs), one after another."""
        if len(parts) == 1:
            return parts[0]

        def rows(column: str) -> TokenRows | None:
            values = [getattr(p, column) for p in parts]
            if values[0] is None:
                return None
            return TokenRows.concat([_packed(v) for v in values])  # type: ignore[misc]

        lexical = [p.lexical for p in parts]
        return cls(
            pair_ids=rows("pair_ids") or TokenRows.concat([]),
            pair_type_ids=rows("pair_type_ids"),
            query_ids=rows("query_ids"),
            product_ids=rows("product_ids"),
            truncated=[t for p in parts for t in p.truncated],
            lexical=None if lexical[0] is None else [x for part in lexical for x in part],  # type: ignore[union-attr]
        )


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
        """Tokenise without padding. ``truncated[i]`` is True when pair i lost tokens.

        The ids come packed (``TokenRows``); the tokenizer sees ``ENCODE_CHUNK`` pairs at a time,
        so its lists of Python ints never hold more than one chunk.
        """
        if len(queries) != len(texts):
            raise ValueError(f"got {len(queries)} queries but {len(texts)} product texts.")
        queries, texts = list(queries), list(texts)
        parts = [
            self._encode_chunk(queries[start : start + ENCODE_CHUNK], texts[start : start + ENCODE_CHUNK])
            for start in range(0, len(queries), ENCODE_CHUNK)
        ]
        return EncodedPairs.concat(parts) if parts else self._empty()

    def _empty(self) -> EncodedPairs:
        """No pairs, with the columns a non-empty encoding would have (tokenizers refuse [])."""
        none = TokenRows.concat([])
        cosine = self.config.prior == "cosine"
        return EncodedPairs(
            pair_ids=none,
            pair_type_ids=none if "token_type_ids" in self.tokenizer.model_input_names else None,
            query_ids=none if cosine else None,
            product_ids=none if cosine else None,
            truncated=[],
            lexical=[] if self.config.lexical else None,
        )

    def _encode_chunk(self, queries: list[str], texts: list[str]) -> EncodedPairs:
        cfg = self.config
        pair = self.tokenizer(
            list(queries),
            list(texts),
            truncation="longest_first",
            max_length=cfg.max_length,
            return_attention_mask=False,
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
            pair_ids=TokenRows.from_rows(ids),
            pair_type_ids=_packed(pair.get("token_type_ids"), np.int8),
            query_ids=_packed(query_ids),
            product_ids=_packed(product_ids),
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
