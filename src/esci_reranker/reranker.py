"""The public object: ``Reranker.from_pretrained(path_or_repo) -> predict(pairs), rerank(query, candidates)``.

``eval/``, ``serve/`` and the CLI talk to models only through this class.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch
from cachetools import LRUCache
from transformers import PreTrainedTokenizerBase

from esci_reranker.data.text import FIELD_COLUMNS, clean_text, product_text, product_texts
from esci_reranker.hardware import PRECISIONS, autocast, freed_memory_kept
from esci_reranker.hardware import select_device as select_device  # its home before hardware.py
from esci_reranker.labels import ESCI_LABELS
from esci_reranker.model.config import CheckpointError, ModelConfig
from esci_reranker.model.features import (
    PROBE_PAIRS,
    EncodedPairs,
    PairEncoder,
    length_sorted_batches,
    pair_encoder_for,
)
from esci_reranker.model.modeling import RerankerModel
from esci_reranker.model.tower_cache import TowerCache
from esci_reranker.model.unpadded import Sequences
from esci_reranker.progress import progress_bar
from esci_reranker.version import __version__

if TYPE_CHECKING:
    from esci_reranker.stack.features import CandidateLists
    from esci_reranker.stack.stacker import Stacker

#: The pair outputs kept inside ``reuse_pair_outputs`` (None outside it).
_PAIR_MEMO: ContextVar[LRUCache[tuple[str, bytes], dict[str, np.ndarray]] | None] = ContextVar(
    "pair_outputs", default=None
)


@contextmanager
def reuse_pair_outputs(max_pairs: int = 50_000) -> Iterator[None]:
    """Within the block, a model scores each distinct pair once (``Reranker.run_encoded``).

    The main job scores the test split's judged lists, then the search flow retrieves lists for
    the same queries, a third of them products judged for them: their cross-encoder outputs are
    the same, only the stacker's list features differ. Entries are keyed by the model's weights
    (``weights_fingerprint``, taken again after any in-place change), precision and device and by
    the pair's inputs (token ids and lexical feature); at most ``max_pairs`` are kept, least
    recently used dropped first (~1 KB each: ~50 MB at the default bound, which the sample's job
    stays far below; on the full data later pairs simply find fewer earlier ones). Outside the
    block (a service) nothing is kept.
    """
    token = _PAIR_MEMO.set(LRUCache(maxsize=max_pairs))
    try:
        yield
    finally:
        _PAIR_MEMO.reset(token)


def _pair_keys(encoded: EncodedPairs, weights: str) -> list[tuple[str, bytes]]:
    """One memo key per pair: ``weights`` and a digest of every input the model reads of it."""
    columns = [c for c in (encoded.pair_ids, encoded.query_ids, encoded.product_ids) if c is not None]
    lexical = encoded.lexical
    keys = []
    for i in range(len(encoded)):
        digest = hashlib.blake2b(digest_size=16)
        for column in columns:
            digest.update(np.asarray(column[i], dtype=np.int32).tobytes())
            digest.update(b"|")
        if lexical is not None:
            digest.update(np.float64(lexical[i]).tobytes())
        keys.append((weights, digest.digest()))
    return keys


#: A product given to ``predict``/``rerank``: its text, or a mapping of its fields.
Product = str | Mapping[str, Any]
#: A ``rerank`` candidate: ``(product_id, text)`` or a dict with ``product_id`` and fields/text.
Candidate = tuple[str, str] | Mapping[str, Any]


@dataclass(frozen=True)
class Predictions:
    """Model outputs for N pairs, every array in the caller's input order.

    Attributes:
        scores: (N,) the ranking score chosen by the model config (regression head by default).
        regression_scores: (N,) the Task 1 regression head.
        expected_gains: (N,) ``P(E)·1 + P(S)·0.1 + P(C)·0.01`` (NaN for a single-task model).
        esci_classes: (N,) predicted class 'E'/'S'/'C'/'I' ('' for a single-task model).
        esci_probs: (N, 4) class probabilities in E, S, C, I order (NaN for a single-task model).
        substitute_probs: (N,) Task 3 probability that the product is a substitute (NaN likewise).
        truncated: (N,) True where the pair was longer than the model's max length and was cut.
        substitute_threshold: the Task 3 decision threshold (the checkpoint's decision rule;
            0.5 for a model without one): ``is_substitute`` is ``substitute_probs >= it``.
    """

    scores: np.ndarray
    regression_scores: np.ndarray
    expected_gains: np.ndarray
    esci_classes: np.ndarray
    esci_probs: np.ndarray
    substitute_probs: np.ndarray
    truncated: np.ndarray
    substitute_threshold: float = 0.5

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def is_substitute(self) -> np.ndarray:
        """(N,) the Task 3 decision: ``substitute_probs >= substitute_threshold`` (False where NaN)."""
        return np.asarray(self.substitute_probs) >= self.substitute_threshold

    @classmethod
    def empty(cls) -> Predictions:
        """Predictions for zero pairs."""
        z = np.zeros(0, dtype=np.float32)
        return cls(z, z, z, np.zeros(0, dtype="<U1"), np.zeros((0, 4), np.float32), z, np.zeros(0, bool))


@dataclass(frozen=True)
class RankedCandidate:
    """One reranked candidate. ``rank`` is 1-based; classes/probabilities are None for a single-task model."""

    product_id: str
    score: float
    esci_class: str | None
    esci_probs: tuple[float, float, float, float] | None
    substitute_prob: float | None
    rank: int
    truncated: bool = False
    #: The Task 3 decision (the checkpoint's threshold); None for a single-task model.
    is_substitute: bool | None = None


class BatchRunner(Protocol):
    """Runs the model on one padded batch and returns numpy outputs (a backend: torch, ONNX)."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]: ...


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike[str], revision: str | None = None, token: str | None = None
) -> Path:
    """A local checkpoint folder for ``path_or_repo_id``: the path itself, or a Hub snapshot of it.

    Raises:
        CheckpointError: neither a local folder nor a downloadable Hub repo; names both places.
    """
    local = Path(path_or_repo_id).expanduser()
    if local.exists():
        return local
    repo_id = str(path_or_repo_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, token=token))
    except HFValidationError:
        raise CheckpointError(
            f"no checkpoint at local path {local.resolve()} and {repo_id!r} is not a valid Hugging Face "
            "Hub repo id (expected 'user/name')."
        ) from None
    except Exception as err:  # network, auth, missing repo: all mean "not found there"
        raise CheckpointError(
            f"no checkpoint at local path {local.resolve()}, and the Hugging Face Hub repo {repo_id!r} "
            f"could not be downloaded ({type(err).__name__}: {err})."
        ) from None


class _TorchRunner:
    def __init__(
        self, model: torch.nn.Module, device: torch.device, autocast_dtype: torch.dtype | None
    ) -> None:
        self.model, self.device, self.autocast_dtype = model, device, autocast_dtype

    @torch.inference_mode()
    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        with autocast(self.device, self.autocast_dtype):
            out = self.model(**inputs)
        result = {"score": out.score.float().cpu().numpy()}
        if out.esci_logits is not None and out.substitute_logit is not None:
            result["esci_logits"] = out.esci_logits.float().cpu().numpy()
            result["substitute_logit"] = out.substitute_logit.float().cpu().numpy()
        if out.prior is not None:
            result["prior"] = out.prior.float().cpu().numpy()  # (B, F): config.prior_features
        return result


def _enable_unpadded(model: RerankerModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Switch ``model`` to padding-free inference if its encoder passes the check on probe pairs."""
    encoder = pair_encoder_for(tokenizer, model.config)
    encoded = encoder.encode([q for q, _ in PROBE_PAIRS], [t for _, t in PROBE_PAIRS])
    batch = {
        k: v.to(model.gain_vector.device) for k, v in encoder.collate(encoded, range(len(encoded))).items()
    }
    probes = [Sequences(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))]
    if "query_input_ids" in batch:
        probes.append(Sequences(batch["query_input_ids"], batch["query_attention_mask"]))
    return model.enable_unpadded(probes)


def _load_stacker(folder: Path, backend: str, config: ModelConfig) -> Stacker | None:
    """The checkpoint's stacker, or None when it has no ``stacker/`` folder.

    Raises:
        CheckpointError: the folder is unreadable, or the model cannot feed it (the stacker reads
            the cross-encoder's class heads and prior features, which the ONNX graph does not
            output).
    """
    from esci_reranker.stack.stacker import MANIFEST_NAME, STACKER_DIR

    path = folder / STACKER_DIR
    if not (path / MANIFEST_NAME).is_file():
        return None
    if backend != "torch":
        raise CheckpointError(
            f"{path}: a stacked checkpoint runs on the torch backend (backend={backend!r} was asked): "
            "the stacker reads the cross-encoder's prior features, which the ONNX graph does not "
            "output. Load it with backend='torch', or pass stacked=False for the cross-encoder alone."
        )
    if not config.multi_task or config.prior != "cosine":
        raise CheckpointError(
            f"{path}: the stacker needs a multi-task cross-encoder with the cosine prior; this "
            f"checkpoint's model is {config.model_type} with prior={config.prior!r}."
        )
    from esci_reranker.stack.stacker import Stacker

    try:
        return Stacker.load(path)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def list_column(columns: Iterable[str]) -> str:
    """The column whose equal values make one candidate list: ``query_id`` when the table has one,
    else ``query`` (as ``Reranker.predict_frame`` groups a table's pairs)."""
    return "query_id" if "query_id" in columns else "query"


class Reranker:
    """Loads a trained checkpoint and scores (query, product) pairs with all of its heads.

    Use ``Reranker.from_pretrained(...)``; the constructor takes already-built parts.
    """

    def __init__(
        self,
        config: ModelConfig,
        encoder: PairEncoder,
        runner: BatchRunner,
        device: torch.device,
        batch_size: int = 64,
        name: str = "esci-reranker",
        backend: str = "torch",
        model: torch.nn.Module | None = None,
        precision: str = "fp32",
        stacker: Stacker | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected a positive integer.")
        self.config = config
        self.pair_encoder = encoder
        self.runner = runner
        self.device = device
        self.batch_size = batch_size
        self.name = name
        self.backend = backend
        self.model = model
        #: The arithmetic of the forward pass: ``fp32``, ``bf16`` or ``int8`` (torch dynamic int8
        #: linear layers, or an ONNX int8 export).
        self.precision = precision
        #: The trees and decision rules over the cross-encoder's outputs and the stack features
        #: (``stack/``), when the checkpoint has a ``stacker/`` folder and it was not turned off.
        self.stacker = stacker
        # the weights' version counters and fingerprint ``_memo_weights`` last saw
        self._memo_state: tuple[int, ...] | None = None
        self._memo_id = ""

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike[str],
        device: str | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
        backend: str = "torch",
        revision: str | None = None,
        token: str | None = None,
        precision: str = "fp32",
        onednn: bool = True,
        unpad: bool = True,
        tower_cache: int = 0,
        keep_freed_memory: bool = True,
        stacked: bool = True,
    ) -> Reranker:
        """Load a checkpoint folder, or download it from the Hugging Face Hub if no such folder exists.

        Args:
            path_or_repo_id: a local checkpoint folder or a Hub repo id (``user/name``).
            device: ``cpu``, ``cuda``, ``mps`` or ``auto``/None (cuda > mps > cpu).
            batch_size: pairs per forward pass.
            max_length: cut pairs to fewer tokens than the model was trained with (faster).
            backend: ``torch`` (default) or ``onnx`` (a folder written by ``export --format onnx``);
                a folder holding only ONNX weights is detected and loaded with ``onnx`` either way.
            revision, token: passed to ``huggingface_hub.snapshot_download`` (token defaults to
                ``HF_TOKEN`` / the saved login).
            precision: arithmetic of the torch backend: ``fp32``; ``bf16`` autocast (CPUs with
                AVX-512 BF16 or AMX, GPUs); ``int8``, dynamic int8 linear layers with everything
                else in fp32 (CPU only; fastest on CPUs with AVX-512 VNNI; ``model.cpu``); or
                ``auto``, bf16 where the device computes it natively and fp32 elsewhere (what
                ``serve`` uses by default). An ONNX folder carries its own precision (fp32 or int8
                from ``export``) and ignores this.
            onednn: in fp32 on CPU, run the linear layers through oneDNN with weights prepacked
                once (``model.cpu.pack_linears``: same scores to ~1e-6, ~2x faster where MKL's
                sgemm is slow); False keeps plain ``nn.Linear``.
            unpad: run the torch backend's encoder on real tokens only, the pair and both towers
                in one pass (``model.unpadded``; BERT-layout encoders, checked against the
                encoder's own forward at load); False runs the encoder as transformers does.
            tower_cache: keep the tower embeddings of up to this many distinct texts (LRU), so
                products (and queries) seen before skip their tower pass; 0 = off. Only for
                torch-backend models with the cosine prior; ignored otherwise (``info()`` says).
            keep_freed_memory: on the CPU, have glibc's malloc keep freed memory for reuse
                (``hardware.keep_freed_memory``: process-wide; ~1.4x faster forwards here, since
                activations are no longer page-faulted in on every pass); False leaves malloc
                as it is. ``info()["keeps_freed_memory"]`` says whether it is in effect.
            stacked: use the checkpoint's stacker (``stacker/``: gradient-boosted trees over the
                cross-encoder's outputs and hand-made features, with decision rules) when it has
                one; False scores with the cross-encoder's own heads.

        Raises:
            CheckpointError: nothing loadable at either place; the message names both.
            ValueError: an unknown ``precision``, or ``int8`` on a device other than the CPU.
        """
        if precision != "auto" and precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; expected 'auto' or one of {list(PRECISIONS)}.")
        if isinstance(tower_cache, bool) or not isinstance(tower_cache, int) or tower_cache < 0:
            raise ValueError(f"tower_cache={tower_cache!r}; expected a number of entries >= 0 (0 = off).")
        folder = resolve_checkpoint(path_or_repo_id, revision=revision, token=token)
        dev = select_device(device)
        if precision == "auto":
            from esci_reranker.hardware import resolve_precision

            precision = resolve_precision(precision, dev)
        if keep_freed_memory and dev.type == "cpu":
            from esci_reranker.hardware import keep_freed_memory as keep

            keep()
        from esci_reranker.model.onnx import resolve_backend

        backend = resolve_backend(folder, backend)  # a folder with only ONNX weights loads as ONNX
        runner: BatchRunner
        if backend == "onnx":
            from esci_reranker.model.onnx import load_onnx_runner  # optional extra

            config, tokenizer, onnx_runner = load_onnx_runner(folder, dev)
            runner, model = onnx_runner, None
            precision = "int8" if "int8" in onnx_runner.path.name else "fp32"
        elif backend == "torch":
            from esci_reranker.model.io import load_checkpoint

            model, tokenizer = load_checkpoint(folder, device=dev)
            config = model.config
            if precision == "int8" and dev.type != "cpu":
                raise ValueError(f"precision='int8' runs on the CPU only, not on {dev.type}; use bf16.")
            if onednn and dev.type == "cpu" and precision == "fp32":
                from esci_reranker.model.cpu import pack_linears

                pack_linears(model)
            if unpad:
                _enable_unpadded(model, tokenizer)  # checked in fp32, before any quantisation
            if precision == "int8":
                model.quantize_int8()
            if tower_cache and config.prior == "cosine":
                model.tower_cache = TowerCache(tower_cache)
            runner = _TorchRunner(model, dev, torch.bfloat16 if precision == "bf16" else None)
        else:
            raise ValueError(f"backend={backend!r}; expected 'torch' or 'onnx'.")
        if max_length is not None:
            if not 8 <= max_length <= config.max_length:
                raise ValueError(
                    f"max_length={max_length}; expected 8..{config.max_length} (the trained length)."
                )
            config.max_length = max_length
        stacker = _load_stacker(folder, backend, config) if stacked else None
        return cls(
            config,
            pair_encoder_for(tokenizer, config),  # the model family's input builder
            runner,
            dev,
            batch_size=batch_size,
            name=str(path_or_repo_id),
            backend=backend,
            model=model,
            precision=precision,
            stacker=stacker,
        )

    @property
    def reads_lists(self) -> bool:
        """Whether a pair's outputs depend on the other candidates of its list (the stacker's list
        features, a list-level family): batch scoring must then give each query's list whole."""
        return self.stacker is not None or self.pair_encoder.list_level

    @property
    def substitute_threshold(self) -> float:
        """The Task 3 decision threshold: the stacker's decision rule, else the model's own
        (``ModelConfig.substitute_threshold``: a distilled student's), else 0.5."""
        if self.stacker is not None:
            return self.stacker.rules.substitute_threshold
        own = self.config.substitute_threshold
        return 0.5 if own is None else float(own)

    # ------------------------------------------------------------------------------------------
    def text_of(self, product: Product) -> str:
        """The text the model reads for ``product``: a string cleaned as a dict's ``text`` is (HTML
        and spacing folded, as in training), or a dict's fields built into text as in training.

        A string is cleaned too so that a product given as text reads the same everywhere
        (``rerank``'s ``(id, text)`` and ``{"text": ...}``, the service's ``text`` candidates
        and Cohere documents).
        """
        if isinstance(product, str):
            return clean_text(product)
        if isinstance(product, Mapping):
            return product_text(product, self.config.text_fields, self.config.long_field_chars)
        raise TypeError(f"product must be a str or a mapping of fields, got {type(product).__name__}.")

    def predict(self, pairs: Sequence[tuple[str, Product]], progress: bool = False) -> Predictions:
        """Score ``(query, product)`` pairs; ``product`` is its text or a dict of its fields."""
        if len(pairs) == 0:
            return Predictions.empty()
        queries = [q for q, _ in pairs]
        texts = [self.text_of(p) for _, p in pairs]
        records = [p if isinstance(p, Mapping) else {"text": p} for _, p in pairs] if self.stacker else None
        return self.predict_texts(queries, texts, progress=progress, records=records)

    def predict_frame(self, frame: pd.DataFrame, progress: bool = True) -> Predictions:
        """Score every row of a prepared split (columns ``query`` and product fields or ``product_text``).

        Product text is rebuilt from the ``product_*`` columns with the model's own text fields
        when they are present, so a model trained on bullets reads bullets here too.
        """
        columns = self.input_columns(frame.columns)
        if "product_text" in columns:
            texts = frame["product_text"]
        else:
            texts = product_texts(frame, self.config.text_fields, self.config.long_field_chars)
        queries = frame["query"].astype(str).tolist()
        if self.stacker is None:
            return self.predict_texts(queries, texts.astype(str).tolist(), progress)
        from esci_reranker.stack.cv import split_fields
        from esci_reranker.stack.features import CandidateLists

        encoded = self.pair_encoder.encode(queries, texts.astype(str).tolist())
        out = self.run_encoded(encoded, progress=progress)
        # a split's candidate lists are its queries (by id when there is one)
        groups = frame["query_id"].tolist() if "query_id" in frame.columns else queries
        fields = split_fields(frame) if any(c.startswith("product_") for c in frame.columns) else None
        if fields is None:
            fields = {"title": texts.astype(str).tolist()}
        truncated = np.asarray(encoded.truncated, dtype=bool)
        return self.finish_lists(out, truncated, queries, fields, CandidateLists.of(groups))

    def input_columns(self, columns: Iterable[str]) -> list[str]:
        """The columns ``predict_frame`` reads from a table with ``columns``.

        ``query`` plus the model's ``product_*`` field columns when any is present (text rebuilt
        as in training), else ``product_text``. A stacked model also reads the other product
        columns and ``query_id`` when present (its list features group pairs by query:
        ``score_parquet`` wants a query's candidates in consecutive rows).

        Raises:
            ValueError: no ``query`` column, or neither product columns nor ``product_text``.
        """
        columns = list(columns)
        if "query" not in columns:
            raise ValueError(f"input has no 'query' column (columns: {columns}).")
        fields = [FIELD_COLUMNS[f] for f in self.config.text_fields]
        present = [c for c in fields if c in columns]
        if present and self.stacker is not None:
            # the stacker's features read every product field, and list features need the query id
            extra = [c for c in (*FIELD_COLUMNS.values(), "query_id") if c in columns and c not in present]
            return ["query", *present, *extra]
        if present:
            return ["query", *present]
        if "product_text" in columns:
            return ["query", "product_text"]
        raise ValueError(
            f"input has neither product columns {fields} (the model's text fields) nor 'product_text' "
            f"(columns: {columns})."
        )

    def batches(self, encoded: EncodedPairs) -> Iterator[np.ndarray]:
        """Index arrays of the forward passes that score ``encoded`` (length-sorted, ``batch_size`` each;
        for a list-level family, whole candidate lists per pass: ``pair_encoder.list_batches``)."""
        if self.pair_encoder.list_level:
            yield from self.pair_encoder.list_batches(encoded, self.batch_size)  # type: ignore[attr-defined]
            return
        yield from length_sorted_batches(encoded.lengths(), self.batch_size)

    def predict_texts(
        self,
        queries: Sequence[str],
        texts: Sequence[str],
        progress: bool = False,
        records: Sequence[Mapping[str, Any]] | None = None,
    ) -> Predictions:
        """Score pairs given as parallel lists of query strings and product texts.

        ``records`` (optional, parallel) are the products' field mappings: a stacked model
        reads its features from them (brand, colour, bullets, ...); without them each text
        counts as a title with no other field. Pairs with the same query form one candidate
        list for the stacker's list features.
        """
        n = len(queries)
        if n == 0:
            return Predictions.empty()
        encoded = self.pair_encoder.encode(queries, texts)
        out = self.run_encoded(encoded, progress=progress)
        return self.finish(out, np.asarray(encoded.truncated, dtype=bool), queries, texts, records)

    def finish(
        self,
        out: Mapping[str, np.ndarray],
        truncated: np.ndarray,
        queries: Sequence[str],
        texts: Sequence[str],
        records: Sequence[Mapping[str, Any]] | None = None,
        groups: Sequence[object] | None = None,
    ) -> Predictions:
        """``Predictions`` from raw head outputs: the cross-encoder's own (``to_predictions``), or
        the stacker's when the model has one (its features read ``records``, else ``texts``).

        ``groups`` (parallel, optional) names the candidate list of each pair for the stacker's
        list features; by default the pairs of one query form one list.
        """
        if self.stacker is None:
            return self.to_predictions(out, truncated)
        from esci_reranker.stack.features import PRODUCT_FIELDS, CandidateLists, record_fields

        per_pair = (
            [record_fields(r) for r in records] if records is not None else [record_fields(t) for t in texts]
        )
        fields = {name: [f.get(name, "") for f in per_pair] for name in PRODUCT_FIELDS}
        lists = list(queries) if groups is None else list(groups)
        return self.finish_lists(out, truncated, queries, fields, CandidateLists.of(lists))

    def finish_lists(
        self,
        out: Mapping[str, np.ndarray],
        truncated: np.ndarray,
        queries: Sequence[str],
        fields: Mapping[str, Sequence[str]],
        lists: CandidateLists,
    ) -> Predictions:
        """``Predictions`` of the entries ``lists.keep`` of candidate lists in which a pair may
        stand several times (each beside other candidates), in ``lists.keep`` order.

        ``out`` and ``truncated`` (the pairs' raw outputs), ``queries`` and ``fields``
        (``PRODUCT_FIELDS`` name -> text) are given once per pair, N of each; ``lists`` places
        the pairs in lists. The cross-encoder's columns and each pair's own features are
        computed once per pair, the list-relative ones per list, the trees only on the kept
        entries; without a stacker an entry's output is its pair's.
        """
        kept = lists.kept_rows  # (K,)
        truncated = np.asarray(truncated, dtype=bool)
        stacker = self.stacker
        if stacker is None:
            return self.to_predictions({k: np.asarray(v)[kept] for k, v in out.items()}, truncated[kept])
        from esci_reranker.stack.features import list_entry_features
        from esci_reranker.stack.outputs import cross_encoder_columns

        columns = cross_encoder_columns(out, self.config.prior_features, self.config.gains)
        stacked = stacker.predict(list_entry_features(queries, fields, lists, columns))
        probs = stacked["probs"].astype(np.float32)
        gains = probs @ np.array([self.config.gains[c] for c in ESCI_LABELS], dtype=np.float32)
        return Predictions(
            scores=stacked["score"].astype(np.float32),
            regression_scores=np.asarray(out["score"], dtype=np.float32)[kept],
            expected_gains=gains.astype(np.float32),
            esci_classes=np.asarray(ESCI_LABELS)[stacked["classes"]],
            esci_probs=probs,
            substitute_probs=stacked["substitute_prob"].astype(np.float32),
            truncated=truncated[kept],
            substitute_threshold=self.substitute_threshold,
        )

    def input_key(
        self, texts: Sequence[str], records: Sequence[Mapping[str, Any]] | None = None
    ) -> list[str]:
        """Strings that identify what the model reads of the products (for cache keys): the texts,
        plus, for a stacked model given ``records``, every field its features read."""
        if self.stacker is None or records is None:
            return list(texts)
        from esci_reranker.stack.features import PRODUCT_FIELDS, record_fields

        fields = ["\x1f".join(record_fields(r).get(n, "") for n in PRODUCT_FIELDS) for r in records]
        return [*texts, *fields]

    def run_encoded(self, encoded: EncodedPairs, progress: bool = False) -> dict[str, np.ndarray]:
        """Raw head outputs for encoded pairs, in their order (length-sorted batches inside).

        Inside ``reuse_pair_outputs``, a pair this model's current weights scored before in the
        block (the same token ids and lexical input) is not run again: its outputs are taken
        from the block's memo.
        """
        memo = _PAIR_MEMO.get()
        weights = self._memo_weights() if memo is not None else None
        if memo is None or weights is None:
            return self._run_rows(encoded, list(self.batches(encoded)), progress)
        keys = _pair_keys(encoded, weights)
        found = [memo.get(k) for k in keys]
        todo = np.flatnonzero([f is None for f in found])
        lengths = np.asarray(encoded.lengths(), dtype=np.int64)[todo]
        batches = [todo[b] for b in length_sorted_batches(lengths.tolist(), self.batch_size)]
        result = self._run_rows(encoded, batches, progress)
        fresh = set(todo.tolist())
        for i, key in enumerate(keys):
            if i in fresh:
                memo[key] = {name: values[i].copy() for name, values in result.items()}
                continue
            for name, value in found[i].items():  # type: ignore[union-attr]
                if name not in result:  # no pair of this call was run: shape it from the memo
                    result[name] = np.zeros((len(encoded), *np.shape(value)), dtype=np.float32)
                result[name][i] = value
        return result

    def _run_rows(
        self, encoded: EncodedPairs, batches: Sequence[np.ndarray], progress: bool
    ) -> dict[str, np.ndarray]:
        """Raw head outputs of every pair, filled in for the rows of ``batches`` (zeros elsewhere)."""
        n = len(encoded)
        score = np.zeros(n, dtype=np.float32)
        logits = np.zeros((n, 4), dtype=np.float32)
        sub = np.zeros(n, dtype=np.float32)
        prior: np.ndarray | None = None
        has_classes = False
        for index in progress_bar(batches, desc="scoring", unit="batch", disable=not progress, leave=False):
            out = self.runner(self.pair_encoder.collate(encoded, index))
            score[index] = out["score"]
            if "esci_logits" in out:
                has_classes = True
                logits[index] = out["esci_logits"]
                sub[index] = out["substitute_logit"]
            if "prior" in out:
                if prior is None:
                    prior = np.zeros((n, out["prior"].shape[1]), dtype=np.float32)
                prior[index] = out["prior"]
        result: dict[str, np.ndarray] = {"score": score}
        if has_classes:
            result["esci_logits"], result["substitute_logit"] = logits, sub
        if prior is not None:
            result["prior"] = prior  # (N, F) in config.prior_features order (torch backend only)
        return result

    def _memo_weights(self) -> str | None:
        """What names this model's outputs in ``reuse_pair_outputs``' memo: a fingerprint of its
        current weights (taken again whenever a parameter changed in place), its precision and
        device; None where outputs are not kept (another backend, int8, a list-level family)."""
        if self.model is None or self.backend != "torch" or self.precision == "int8":
            return None
        if self.pair_encoder.list_level:  # a pair's outputs depend on its whole list
            return None
        from esci_reranker.model.cpu import tensor_version
        from esci_reranker.model.tower_cache import weights_fingerprint

        state = tuple(tensor_version(p) for p in self.model.parameters())
        if self._memo_state != state:
            self._memo_state = state
            self._memo_id = f"{weights_fingerprint(self.model)}:{self.precision}:{self.device}"
        return self._memo_id

    def to_predictions(self, out: Mapping[str, np.ndarray], truncated: np.ndarray) -> Predictions:
        """Turn raw head outputs into ``Predictions`` (probabilities, classes, the ranking score)."""
        score = np.asarray(out["score"], dtype=np.float32)
        n = len(score)
        if "esci_logits" in out:
            probs = _softmax(np.asarray(out["esci_logits"], dtype=np.float64)).astype(np.float32)
            gains = probs @ np.array([self.config.gains[c] for c in ESCI_LABELS], dtype=np.float32)
            classes = np.asarray(ESCI_LABELS)[probs.argmax(axis=1)]
            sub = (1.0 / (1.0 + np.exp(-np.asarray(out["substitute_logit"], dtype=np.float64)))).astype(
                np.float32
            )
        else:
            probs = np.full((n, 4), np.nan, dtype=np.float32)
            gains = np.full(n, np.nan, dtype=np.float32)
            classes = np.full(n, "", dtype="<U1")
            sub = np.full(n, np.nan, dtype=np.float32)
        ranking = gains if self.config.rank_score == "expected_gain" and "esci_logits" in out else score
        return Predictions(
            scores=ranking.astype(np.float32),
            regression_scores=score,
            expected_gains=gains.astype(np.float32),
            esci_classes=classes,
            esci_probs=probs,
            substitute_probs=sub,
            truncated=truncated,
            substitute_threshold=self.substitute_threshold,
        )

    # ------------------------------------------------------------------------------------------
    def rerank(
        self, query: str, candidates: Sequence[Candidate], top_k: int | None = None
    ) -> list[RankedCandidate]:
        """Order ``candidates`` for ``query`` by descending score (ties keep input order).

        Args:
            query: the search query (non-empty).
            candidates: ``(product_id, text)`` tuples, or dicts with ``product_id`` and either
                ``text`` or product fields (``title``, ``brand``, ``color``, ... or the ESCI
                ``product_*`` column names), turned into text exactly as in training.
            top_k: keep only the best ``top_k`` (None = all).

        Raises:
            ValueError: empty query, a candidate without id or text, duplicate product ids, top_k < 1.
        """
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query must be a non-empty string.")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k={top_k!r}; expected a positive integer or None.")
        ids, texts = self._candidates(candidates)
        if not ids:
            return []
        records = (
            [c if isinstance(c, Mapping) else {"text": c[1]} for c in candidates] if self.stacker else None
        )
        preds = self.predict_texts([query] * len(ids), texts, records=records)
        order = np.argsort(-preds.scores, kind="stable")[: top_k or len(ids)]
        multi = self.config.multi_task
        return [
            RankedCandidate(
                product_id=ids[i],
                score=float(preds.scores[i]),
                esci_class=str(preds.esci_classes[i]) if multi else None,
                esci_probs=tuple(float(p) for p in preds.esci_probs[i]) if multi else None,  # type: ignore[arg-type]
                substitute_prob=float(preds.substitute_probs[i]) if multi else None,
                rank=rank,
                truncated=bool(preds.truncated[i]),
                is_substitute=bool(preds.is_substitute[i]) if multi else None,
            )
            for rank, i in enumerate(order, start=1)
        ]

    def _candidates(self, candidates: Sequence[Candidate]) -> tuple[list[str], list[str]]:
        ids: list[str] = []
        texts: list[str] = []
        seen: set[str] = set()
        product: Product
        for pos, cand in enumerate(candidates):
            if isinstance(cand, Mapping):
                if "product_id" not in cand:
                    raise ValueError(f"candidate {pos}: missing 'product_id'.")
                raw_id, product = cand["product_id"], cand
            elif isinstance(cand, tuple | list) and len(cand) == 2:
                raw_id, product = cand
            else:
                raise ValueError(f"candidate {pos}: expected (product_id, text) or a dict, got {cand!r:.80}.")
            if not clean_text(raw_id):  # None, NaN, "" or blank
                raise ValueError(f"candidate {pos}: empty product_id {raw_id!r}.")
            pid = str(raw_id)
            try:
                text = self.text_of(product)
            except TypeError as err:
                raise ValueError(f"candidate {pos} (product_id {pid!r}): {err}") from None
            if pid in seen:
                raise ValueError(
                    f"candidate {pos}: duplicate product_id {pid!r}; product ids must be unique."
                )
            if not text.strip():
                raise ValueError(f"candidate {pos} (product_id {pid!r}): empty product text.")
            seen.add(pid)
            ids.append(pid)
            texts.append(text)
        return ids, texts

    def info(self) -> dict[str, Any]:
        """What is loaded: name, backbone, heads, max length, version, device, backend, precision,
        the fast paths (``unpadded``), the tower cache's counters and whether malloc keeps freed
        memory (``keep_freed_memory``)."""
        heads = ["score", "esci", "substitute"] if self.config.multi_task else ["score"]
        return {
            "name": self.name,
            "model_type": self.config.model_type,
            "backbone": self.config.backbone_name or self.config.backbone.get("model_type", ""),
            "heads": heads,
            "rank_score": self.config.rank_score,
            "prior": self.config.prior,
            "max_length": self.config.max_length,
            "text_fields": list(self.config.text_fields),
            "version": __version__,
            "device": str(self.device),
            "backend": self.backend,
            "precision": self.precision,
            "unpadded": getattr(self.model, "unpadded", None) is not None,
            "tower_cache": self.tower_cache_stats(),
            "keeps_freed_memory": freed_memory_kept(),
            "stacker": self._stacker_info(),
        }

    def _stacker_info(self) -> dict[str, Any] | None:
        """The stacker's features count, fits per tree model, boosting rounds (of each model's
        first fit) and decision rules; None without one."""
        if self.stacker is None:
            return None
        return {
            "features": len(self.stacker.feature_names),
            "bags": self.stacker.params.bags,
            "rounds": dict(self.stacker.rounds),
            "rules": self.stacker.rules.to_dict(),
        }

    def tower_cache_stats(self) -> dict[str, int] | None:
        """Capacity, entries, hits and misses of the tower-embedding cache; None when it is off."""
        cache = getattr(self.model, "tower_cache", None)
        return cache.stats() if cache is not None else None


# ----------------------------------------------------------------------------------------------
#: The columns ``score_parquet`` appends, in this order.
SCORE_COLUMNS: tuple[str, ...] = (
    "score",
    "expected_gain",
    "esci_pred",
    *(f"esci_prob_{label}" for label in ESCI_LABELS),
    "substitute_prob",
    "truncated",
)


def _prediction_arrays(preds: Predictions) -> list[Any]:
    import pyarrow as pa

    probs = [pa.array(preds.esci_probs[:, i], pa.float32()) for i in range(len(ESCI_LABELS))]
    return [
        pa.array(preds.scores, pa.float32()),
        pa.array(preds.expected_gains, pa.float32()),
        pa.array(preds.esci_classes.astype(object), pa.string()),
        *probs,
        pa.array(preds.substitute_probs, pa.float32()),
        pa.array(preds.truncated, pa.bool_()),
    ]


def _output_schema(schema: Any) -> Any:
    import pyarrow as pa

    types = [pa.float32(), pa.float32(), pa.string(), *[pa.float32()] * len(ESCI_LABELS)]
    types += [pa.float32(), pa.bool_()]
    fields = [pa.field(name, t) for name, t in zip(SCORE_COLUMNS, types, strict=True)]
    return pa.schema([*schema, *fields], metadata=schema.metadata)


def score_parquet(
    reranker: Reranker,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    chunk_rows: int = 50_000,
    progress: bool = True,
) -> int:
    """Score every row of a parquet file; write the rows with ``SCORE_COLUMNS`` appended.

    The input needs ``query`` and product columns or ``product_text`` (see
    ``Reranker.input_columns``); every other column (ids, labels) is passed through unchanged.
    The file is streamed ``chunk_rows`` rows at a time, so memory stays flat for millions of
    rows. A model that reads whole candidate lists (a stacker's list features, a list-level
    family) gets them whole: the rows of the query a chunk ends in are held over to the next
    chunk (a query's rows must be consecutive in the file, by ``query_id`` when there is one,
    else by ``query``). The output is written under a temporary name and renamed when complete.
    ``esci_pred`` is ``""`` and the probabilities NaN for a single-task model.

    Returns:
        The number of rows written.

    Raises:
        FileNotFoundError: no input file.
        ValueError: not a parquet file, missing input columns, the input already has one of
            ``SCORE_COLUMNS``, ``output_path`` is the input, or ``chunk_rows < 1``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, dst = Path(input_path), Path(output_path)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows}; expected a positive integer.")
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such input file.")
    if dst.resolve() == src.resolve():
        raise ValueError(f"output {dst} is the input file; write the scores to another file.")
    try:
        parquet = pq.ParquetFile(src)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{src}: not a readable parquet file ({err}).") from None
    names = parquet.schema_arrow.names
    read = reranker.input_columns(names)
    clash = [c for c in SCORE_COLUMNS if c in names]
    if clash:
        raise ValueError(
            f"{src}: already has column(s) {clash} that scoring writes; drop or rename them first."
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    writer = None
    rows = 0
    group = list_column(names)
    try:
        total = parquet.metadata.num_rows
        with progress_bar(total=total, desc="scoring", unit="row", disable=not progress) as bar:

            def write(chunk: pa.Table) -> None:
                nonlocal writer, rows
                preds = reranker.predict_frame(chunk.select(read).to_pandas(), progress=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, _output_schema(chunk.schema))
                writer.write_table(
                    pa.Table.from_arrays([*chunk.columns, *_prediction_arrays(preds)], schema=writer.schema)
                )
                rows += chunk.num_rows
                bar.update(chunk.num_rows)

            held: pa.Table | None = None
            for batch in parquet.iter_batches(batch_size=chunk_rows):
                chunk = pa.Table.from_batches([batch])
                if held is not None:
                    chunk = pa.concat_tables([held, chunk])
                    held = None
                if reranker.reads_lists:
                    keys = chunk.column(group).to_pandas()
                    # the rows of the last query may go on in the next chunk: hold them over
                    others = np.flatnonzero((keys != keys.iloc[-1]).to_numpy())
                    cut = int(others[-1]) + 1 if len(others) else 0
                    held, chunk = chunk.slice(cut), chunk.slice(0, cut)
                if chunk.num_rows:
                    write(chunk)
            if held is not None and held.num_rows:
                write(held)
        if writer is None:  # an empty input still gives an output with the full schema
            writer = pq.ParquetWriter(tmp, _output_schema(parquet.schema_arrow))
        writer.close()
        writer = None
        os.replace(tmp, dst)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return rows


#: File types ``read_candidates`` reads, by extension.
CANDIDATE_FILE_TYPES: tuple[str, ...] = (".jsonl", ".ndjson", ".csv", ".parquet")


def read_candidates(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``rerank`` candidates from a file: one record per product with ``product_id`` and a text
    (``text``) or product fields (``title``, ``brand``, ... or the ``product_*`` column names).

    ``.jsonl``/``.ndjson``: one JSON object per line; ``.csv`` (read as strings, empty cells are
    empty); ``.parquet``. Missing values become None; ``rerank`` then checks ids and texts.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown extension, unreadable file, a line that is not a JSON object, or no
            ``product_id`` (the message names the file and line).
    """
    import json

    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such candidates file.")
    suffix = src.suffix.lower()
    if suffix not in CANDIDATE_FILE_TYPES:
        raise ValueError(
            f"{src}: unknown extension {suffix!r}; expected one of {', '.join(CANDIDATE_FILE_TYPES)}."
        )
    if suffix in (".jsonl", ".ndjson"):
        records: list[dict[str, Any]] = []
        for lineno, line in enumerate(src.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{src}, line {lineno}: not valid JSON ({err}).") from None
            if not isinstance(row, dict):
                raise ValueError(f"{src}, line {lineno}: expected a JSON object, got {type(row).__name__}.")
            if "product_id" not in row:
                raise ValueError(f"{src}, line {lineno}: no 'product_id' (keys: {sorted(row)}).")
            records.append(row)
        return records
    try:
        if suffix == ".csv":
            frame = pd.read_csv(src, dtype=str, keep_default_na=False)
        else:
            frame = pd.read_parquet(src)
    except (OSError, ValueError) as err:  # pandas parser and arrow errors are ValueErrors
        raise ValueError(f"{src}: cannot read it as {suffix[1:]} ({err}).") from None
    if "product_id" not in frame.columns:
        raise ValueError(f"{src}: no 'product_id' column (columns: {list(frame.columns)}).")
    frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_dict(orient="records")  # type: ignore[return-value]
