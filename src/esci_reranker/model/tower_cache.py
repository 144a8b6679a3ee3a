"""An LRU cache of tower embeddings: a product seen before skips its tower pass.

The cosine prior encodes every query and product text alone. A shop reranks the same catalogue
again and again, and a text's tower embedding depends on nothing but its tokens, so it can be
kept: with the cache warm, a request costs the pair pass alone (~55 % of the work for the
default model). Keys are the real token ids (padding stripped), so a query and a product with
the same tokens share an entry, as they share the computation. Values are the normalised,
mean-pooled embeddings in float32 on the model's device.

The cache belongs to one model in inference: ``RerankerModel.train()`` clears it, so weights
that change never meet embeddings of the old ones. It is thread-safe.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from cachetools import LRUCache


@dataclass
class TowerPlan:
    """Which distinct tower rows of a batch are cached (``found``) and which must be encoded."""

    keys: list[bytes]
    found: dict[int, torch.Tensor]
    missing: torch.Tensor  # (M,) row indices to encode
    cache: TowerCache = field(repr=False)

    def fill(self, computed: torch.Tensor | None) -> torch.Tensor:
        """All rows' embeddings (U, H): ``computed`` (M, H) for the missing rows, stored too."""
        rows: dict[int, torch.Tensor] = dict(self.found)
        if computed is not None:
            computed = computed.float()
            new = {int(r): computed[i] for i, r in enumerate(self.missing.tolist())}
            self.cache.put({self.keys[r]: v for r, v in new.items()})
            rows |= new
        return torch.stack([rows[r] for r in range(len(self.keys))])


class TowerCache:
    """LRU map from a tower input's real token ids to its normalised embedding (float32).

    Args:
        size: most entries kept (least recently used are dropped first); at least 1.
    """

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"tower cache size={size!r}; expected a positive integer.")
        self.size = size
        self._lru: LRUCache[bytes, torch.Tensor] = LRUCache(maxsize=size)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[bytes]:
        """One key per row: the row's unpadded token ids as bytes."""
        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        real = attention_mask.detach().cpu().numpy().astype(bool)
        return [row[keep].tobytes() for row, keep in zip(ids, real, strict=True)]

    def plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerPlan:
        """Look up every row of one tower batch (U, T); the plan says which rows to encode."""
        keys = self.keys(input_ids, attention_mask)
        found: dict[int, torch.Tensor] = {}
        with self._lock:
            for row, key in enumerate(keys):
                value = self._lru.get(key)
                if value is not None:
                    found[row] = value
            self.hits += len(found)
            self.misses += len(keys) - len(found)
        missing = [r for r in range(len(keys)) if r not in found]
        index = torch.tensor(missing, dtype=torch.long, device=input_ids.device)
        return TowerPlan(keys=keys, found=found, missing=index, cache=self)

    def put(self, entries: dict[bytes, torch.Tensor]) -> None:
        """Store embeddings by key (detached float32 copies)."""
        with self._lock:
            for key, value in entries.items():
                self._lru[key] = value.detach().float().clone()

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        with self._lock:
            self._lru.clear()

    def stats(self) -> dict[str, int]:
        """``size`` (capacity), ``entries``, ``hits`` and ``misses`` so far."""
        with self._lock:
            return {"size": self.size, "entries": len(self._lru), "hits": self.hits, "misses": self.misses}


#: Shared caches by the identity of the weights that filled them (``shared_tower_cache``).
_SHARED: LRUCache[str, TowerCache] = LRUCache(maxsize=4)
_SHARED_LOCK = threading.Lock()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, shapes, dtypes and values).

    What a cache of a model's outputs is keyed by: equal only for the same weights. Hashing the
    22M parameters of MiniLM takes ~0.1 s.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().reshape(-1).contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def shared_tower_cache(key: str, size: int = 100_000) -> TowerCache:
    """The process-wide tower cache for ``key`` (made on first use), for outputs of fixed weights
    that several jobs of one process compute again: the zero-shot tower embeddings that every fold's
    prior fit reads (``train.prior_init``). ``key`` must name the weights
    (``weights_fingerprint``) and whatever else changes the embeddings (the autocast dtype).
    Up to four keys are kept, least recently used dropped first; each holds ``size`` embeddings
    (~150 MB at 384 dimensions for the default).
    """
    with _SHARED_LOCK:
        cache = _SHARED.get(key)
        if cache is None:
            cache = _SHARED[key] = TowerCache(size)
        return cache


def weights_cache(module: torch.nn.Module, dtype: torch.dtype | None = None) -> TowerCache:
    """The process-wide tower cache of ``module``'s current weights run in ``dtype`` (None: fp32).

    One key for every caller that embeds texts with the same encoder weights and arithmetic:
    the prior fit of each fold (``train.prior_init``) and the zero-shot bi-encoder baseline
    (``eval.baselines``) share entries when their token ids agree.
    """
    return shared_tower_cache(f"{weights_fingerprint(module)}:{dtype or torch.float32}")
