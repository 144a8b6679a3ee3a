"""Lexical retrieval over a catalogue with ``bm25s`` (Lucene BM25), built from stored token ids.

Texts are tokenised once with ``model.lexical.word_tokens`` (lowercase words, English stopwords
dropped: the same tokens as the BM25 baseline) into ids of a growing ``Vocabulary``. The index
keeps those ids, so after products are added, replaced or deleted the BM25 matrix is rebuilt from
the ids alone: no product is read, cleaned or tokenised again (``CatalogueIndex.update``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from esci_reranker.model.lexical import word_tokens

#: BM25 parameters (bm25s / Lucene defaults, as in the BM25 baseline).
DEFAULT_K1: Final[float] = 1.5
DEFAULT_B: Final[float] = 0.75


class Vocabulary:
    """Word <-> id; ids are positions in ``words`` and never change once given."""

    def __init__(self, words: Iterable[str] = ()) -> None:
        self.words: list[str] = list(words)
        self.ids: dict[str, int] = {w: i for i, w in enumerate(self.words)}
        if len(self.ids) != len(self.words):
            raise ValueError("Vocabulary: a word appears twice in the stored word list.")

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, grow: bool = True) -> list[int]:
        """Token ids of ``text``; new words get new ids when ``grow``, else are dropped."""
        out = []
        for token in word_tokens(text):
            index = self.ids.get(token)
            if index is None:
                if not grow:
                    continue
                index = self.ids[token] = len(self.words)
                self.words.append(token)
            out.append(index)
        return out

    def encode_many(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids as one flat int32 array and (len(texts) + 1,) int64 offsets into it."""
        lists = [self.encode(t) for t in texts]
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in lists], out=offsets[1:])
        flat = np.fromiter((i for x in lists for i in x), dtype=np.int32, count=int(offsets[-1]))
        return flat, offsets

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.words, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        return cls(json.loads(path.read_text(encoding="utf-8")))


def split_ids(flat: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    """The per-text id lists of a flat array and its offsets."""
    return [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


class Bm25:
    """A bm25s index over documents given as token-id lists, with an int64 key per document."""

    def __init__(self, model: Any, keys: np.ndarray) -> None:
        self.model = model
        self.keys = keys

    @classmethod
    def build(
        cls,
        docs: Sequence[Sequence[int]],
        keys: np.ndarray,
        vocab: Vocabulary,
        k1: float = DEFAULT_K1,
        b: float = DEFAULT_B,
    ) -> Bm25:
        """Index ``docs`` (token ids of ``vocab``); ``keys[i]`` names document ``i``."""
        import bm25s

        if len(docs) != len(keys):
            raise ValueError(f"Bm25.build: {len(docs)} documents but {len(keys)} keys.")
        model = bm25s.BM25(k1=k1, b=b)
        if len(docs):
            # bm25s takes (ids per document, token -> id); ids are our vocabulary's positions.
            model.index(([list(d) for d in docs], dict(vocab.ids)), show_progress=False)
        return cls(model, np.asarray(keys, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.keys)

    def search(self, query: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` keys for ``query`` with a positive score, and the scores, best first."""
        if len(self.keys) == 0 or k < 1:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        ids = [self.model.vocab_dict[t] for t in word_tokens(query) if t in self.model.vocab_dict]
        if not ids:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        scores = np.asarray(self.model.get_scores(ids), dtype=np.float32)
        return top_k(self.keys, scores, k)

    def scores(self, query: str) -> np.ndarray:
        """The BM25 score of every document for ``query`` (zeros when no query word is indexed)."""
        ids = [self.model.vocab_dict[t] for t in word_tokens(query) if t in self.model.vocab_dict]
        if not ids or len(self.keys) == 0:
            return np.zeros(len(self.keys), np.float32)
        return np.asarray(self.model.get_scores(ids), dtype=np.float32)

    def save(self, folder: Path) -> None:
        """bm25s's own files (numpy arrays and JSON, no pickle) plus ``keys.npy``."""
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "keys.npy", self.keys)
        if len(self.keys):
            self.model.save(str(folder), show_progress=False)

    @classmethod
    def load(cls, folder: Path, mmap: bool = True) -> Bm25:
        import bm25s

        keys = np.load(folder / "keys.npy")
        if len(keys) == 0:
            return cls(bm25s.BM25(), keys)
        model = bm25s.BM25.load(str(folder), mmap=mmap, show_progress=False)
        return cls(model, keys)


def top_k(keys: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` keys of highest positive score, best first (ties: lower position first)."""
    positive = np.flatnonzero(scores > 0)
    if len(positive) > k:
        part = np.argpartition(-scores[positive], k - 1)[:k]
        positive = positive[part]
    order = positive[np.lexsort((positive, -scores[positive]))]
    return keys[order], scores[order]
