"""Where the service's resident memory goes: a part-by-part account, measured in one fresh process.

``memory_breakdown(model_dir)`` builds what ``esci-reranker serve`` builds, one part at a time, and
reads the process's RSS (``/proc/self/statm``) and glibc malloc's own account after each step:

- **libraries**: importing torch, transformers, LightGBM and the service (code and import-time data),
  with the caller's split by import when it gives one (``by_import``);
- **tokenizer**: the checkpoint's tokenizer, loaded alone first;
- **model weights**: the parameters and buffers (their exact bytes) and the rest of the model load
  (oneDNN's prepacked copies of the linear layers, the unpadded path's check);
- **stacker**: the gradient-boosted trees and rules (``stacker/``);
- **first forward**: oneDNN's JIT kernels and the OpenMP pool's threads and buffers;
- **activations of one forward**: the peak RSS over a forward of ``MAX_BATCH_TOKENS`` padded tokens
  (one per budget, smallest first, since the peak only grows);
- **oneDNN kernels for new shapes**: what forwards of shapes not seen before add and a trim does
  not return (the primitive cache);
- **feature caches**: the stacker's per-product and per-query tokenisations, per entry;
- **tower cache** and **response cache**: per entry, and full at the service's sizes;
- **allocator arenas**: the requests run from several threads (as the service's worker threads
  tokenise and build features), then what ``malloc_trim`` gives back: free memory the arenas kept.

The settings (``MEMORY_LIMIT_MB``, ``MALLOC_ARENA_MAX``, ``MAX_BATCH_TOKENS``, ...) are read from the
environment as the service reads them, and the start-up policy is applied the same way, so the
account describes the configuration the process runs with. ``benchmarks/serve_memory.py
--breakdown`` is the command around it.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

MIB: Final[float] = 1024.0 * 1024.0


def _rss() -> int:
    with open("/proc/self/statm", "rb") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def deep_size(root: object, seen: set[int] | None = None) -> int:
    """Bytes of ``root`` and every object it refers to (``sys.getsizeof`` over ``gc.get_referents``),
    each object counted once; a torch tensor or numpy array counts its data too."""
    seen = set() if seen is None else seen
    total, stack = 0, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        nbytes = getattr(obj, "nbytes", None)
        if isinstance(nbytes, int) and not isinstance(obj, (bytes, bytearray, memoryview)):
            total += nbytes
        stack.extend(gc.get_referents(obj))
    return total


class PeakSampler:
    """The highest RSS seen while it runs (sampled every ``interval`` seconds in a thread)."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def memory_breakdown(
    model_dir: str | Path,
    make_bodies: Callable[[], Sequence[Mapping[str, Any]]],
    *,
    baseline_rss: int | None = None,
    budgets: Sequence[int] = (2048, 4096),
    threads: int = 8,
    by_import: Sequence[Mapping[str, Any]] = (),
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The account described in the module docstring, JSON-ready (MB are MiB).

    Args:
        model_dir: the checkpoint the service would load.
        make_bodies: builds the /rerank bodies used as the requests (``bench.server.build_requests``),
            after the libraries are counted; what it allocates is counted apart, as the benchmark's.
        baseline_rss: the RSS of the bare interpreter (read first thing by the command); None: now.
        budgets: ``MAX_BATCH_TOKENS`` values whose forward's activations are measured.
        threads: worker threads that run the requests for the arena step.
        by_import: the libraries' part split by import (``{"module", "rss_delta_mb"}`` each), as
            the command measured it before anything else imported them; kept in the report.
        echo: progress lines (None: silent).
    """
    say = echo or (lambda _line: None)
    parts: list[dict[str, Any]] = []
    last = [baseline_rss if baseline_rss is not None else _rss()]
    start_rss = last[0]

    def step(name: str, note: str, **extra: Any) -> float:
        now = _rss()
        delta = (now - last[0]) / MIB
        last[0] = now
        parts.append(
            {
                "part": name,
                "rss_delta_mb": round(delta, 1),
                "rss_mb": round(now / MIB, 1),
                "note": note,
                **extra,
            }
        )
        say(f"{name:<34} {delta:+8.1f} MiB  (RSS {now / MIB:.0f})  {note}")
        return delta

    import lightgbm  # noqa: F401 (the stacker's trees)
    import torch
    import transformers  # noqa: F401

    from esci_reranker.reranker import Reranker, _load_stacker, select_device
    from esci_reranker.serve import create_app  # noqa: F401 (fastapi, pydantic, prometheus, ...)
    from esci_reranker.serve.memory import (
        apply_startup_policy,
        container_memory_limit,
        malloc_stats,
        malloc_trim,
    )
    from esci_reranker.serve.settings import load_settings

    step(
        "libraries",
        "torch, transformers, LightGBM, pandas, the service's imports (code, import-time data)",
        **({"by_import": list(by_import)} if by_import else {}),
    )
    bodies = make_bodies()
    step(
        "the benchmark's request data",
        "not the service's: the sample's queries and products",
        bench_only=True,
    )
    settings = load_settings()
    limit_mb, limit_source = settings.memory_limit(container_memory_limit())
    policy = apply_startup_policy(limit_mb, settings.malloc_arena_max)
    device = select_device(settings.inference_device)
    budget = settings.batch_token_budget(device)

    from esci_reranker.reranker import resolve_checkpoint

    folder = resolve_checkpoint(str(model_dir))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    step("tokenizer", "the checkpoint's tokenizer, loaded alone")

    from esci_reranker.hardware import resolve_precision

    precision = resolve_precision(settings.precision, device)
    reranker = Reranker.from_pretrained(
        folder,
        device=settings.inference_device,
        precision=precision,
        tower_cache=settings.tower_cache_size,
        stacked=False,
    )
    model = getattr(reranker.runner, "model", None)  # the torch backend's module (None for ONNX)
    weights = 0
    if isinstance(model, torch.nn.Module):
        weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    delta = step(
        "model (weights + load)",
        f"precision {precision}; parameters and buffers hold {weights / MIB:.1f} MiB; the rest: the model's "
        "second tokenizer, building the module, the unpadded path's check (in fp32 also oneDNN's "
        "prepacked copies of the linear layers)",
        weights_mb=round(weights / MIB, 1),
    )
    del delta
    stacker = _load_stacker(folder, "torch", reranker.config)
    reranker.stacker = stacker
    step("stacker (trees, rules)", "gradient-boosted trees and decision rules" if stacker else "no stacker")

    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="esci-model")

    def predict(body: Mapping[str, Any]) -> Any:
        texts = [reranker.text_of(c) for c in body["candidates"]]
        records = body["candidates"] if reranker.stacker is not None else None
        return reranker.predict_texts([body["query"]] * len(texts), texts, records=records)

    model_thread.submit(predict, bodies[0]).result()
    step("first request", "oneDNN JIT kernels, the OpenMP pool, feature code paths")

    from esci_reranker.serve.batching import padded_tokens, pair_widths

    encoder = reranker.pair_encoder
    all_pairs = [(b["query"], reranker.text_of(c)) for b in bodies for c in b["candidates"]]
    encoded = encoder.encode([q for q, _ in all_pairs], [t for _, t in all_pairs])
    widths = pair_widths(encoded)
    activations: list[dict[str, Any]] = []
    for tokens in sorted(budgets):
        rows: list[int] = []
        for index in range(len(encoded)):
            if padded_tokens(widths[[*rows, index]]) <= tokens:
                rows.append(index)
        batch = encoder.collate(encoded, rows)
        malloc_trim()
        with PeakSampler() as peak:
            before = _rss()
            model_thread.submit(reranker.runner, batch).result()
        activations.append(
            {
                "max_batch_tokens": tokens,
                "pairs": len(rows),
                "padded_tokens": padded_tokens(widths[rows]),
                "peak_over_before_mb": round((peak.peak - before) / MIB, 1),
            }
        )
        say(
            f"  activations of one forward, {tokens} tokens ({len(rows)} pairs): +{(peak.peak - before) / MIB:.1f} MiB peak"
        )
    last[0] = _rss()
    parts.append(
        {
            "part": "activations of one forward",
            "rss_delta_mb": max(a["peak_over_before_mb"] for a in activations),
            "note": "peak over the RSS before the forward (transient)",
            "by_budget": activations,
            "transient": True,
        }
    )

    # Shapes not seen before: every forward of the unpadded encoder has its own real-token count.
    malloc_trim()
    last[0] = _rss()
    for cut in range(8, 48):
        model_thread.submit(reranker.runner, encoder.collate(encoded, list(range(cut)))).result()
    malloc_trim()
    step(
        "oneDNN kernels, 40 new shapes",
        f"in use after a trim (primitive cache: {policy.onednn_cache_capacity or 'oneDNN default 1024'})",
    )

    # Feature caches (stacker): one entry per distinct product / query seen.
    feature: dict[str, Any] = {}
    if reranker.stacker is not None:
        from esci_reranker.stack import features as stack_features

        product_cache = stack_features.product_cache_stats()
        products = product_cache["entries"]
        queries = stack_features.query_side.cache_info().currsize
        sides = [stack_features._product_side(c) for b in bodies for c in b["candidates"]]
        seen: set[int] = set()
        product_bytes = sum(deep_size(s, seen) for s in sides) / max(1, len({id(s) for s in sides}))
        feature = {
            "product_entries": products,
            "query_entries": queries,
            "bytes_per_product": round(product_bytes),
            "estimated_bytes": product_cache["bytes"],
            "max_bytes": product_cache["max_bytes"],
        }
        say(f"  feature cache: {products} products, ~{product_bytes / 1024:.1f} KiB each (deep size)")

    # Tower cache: per entry, projected to its size.
    tower: dict[str, Any] = {"entries": 0}
    cache = getattr(model, "tower_cache", None) if model is not None else None
    if cache is not None:
        entries = list(cache._lru.items())
        if entries:
            seen = set()
            per = sum(deep_size(k, seen) + deep_size(v, seen) for k, v in entries) / len(entries)
            tower = {"entries": len(entries), "capacity": cache.size, "bytes_per_entry": round(per)}
            say(
                f"  tower cache: {len(entries)} entries, ~{per:.0f} B each; full at {cache.size}: {per * cache.size / MIB:.0f} MiB"
            )

    # Response cache: one 40-candidate request's predictions.
    predictions = model_thread.submit(predict, bodies[0]).result()
    response_bytes = deep_size(predictions)
    response = {"bytes_per_40_candidates": response_bytes, "cache_size": settings.cache_size}

    # Arenas: the same requests from several threads at once (as tokenising and feature building
    # run on the service's worker threads), then what a trim gives back.
    last[0] = _rss()
    lock = threading.Lock()

    def from_worker(body: Mapping[str, Any]) -> None:
        texts = [reranker.text_of(c) for c in body["candidates"]]
        with lock:
            enc = encoder.encode([body["query"]] * len(texts), texts)
        model_thread.submit(reranker.run_encoded, enc).result()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(from_worker, [bodies[i % len(bodies)] for i in range(threads * 6)]))
    stats = malloc_stats()
    step(
        f"requests from {threads} threads",
        f"arenas {stats.arenas if stats else '?'} ({policy.malloc_arena_source}), malloc free "
        f"{(stats.free_bytes / MIB) if stats else 0:.0f} MiB",
        malloc_arenas=stats.arenas if stats else None,
        malloc_free_mb=round(stats.free_bytes / MIB, 1) if stats else None,
    )
    before_trim = _rss()
    malloc_trim()
    time.sleep(0.1)
    after_trim = _rss()
    say(f"  malloc_trim gives back {(before_trim - after_trim) / MIB:.0f} MiB (free memory the arenas kept)")
    model_thread.shutdown()
    return {
        "status": "ok",
        "model": str(model_dir),
        "settings": {
            "memory_limit_mb": limit_mb,
            "memory_limit_source": limit_source,
            "malloc_arena_max": policy.malloc_arena_max,
            "malloc_arena_source": policy.malloc_arena_source,
            "onednn_cache_capacity": policy.onednn_cache_capacity,
            "max_batch_tokens": budget,
            "tower_cache_size": settings.tower_cache_size,
            "cache_size": settings.cache_size,
            "threads": torch.get_num_threads(),
        },
        "start_rss_mb": round(start_rss / MIB, 1),
        "end_rss_mb": round(after_trim / MIB, 1),
        "parts": parts,
        "arenas_trim_returns_mb": round((before_trim - after_trim) / MIB, 1),
        "feature_cache": feature,
        "tower_cache": tower,
        "response_cache": response,
        "tokenizer_kept": tokenizer is not None,
    }


def format_breakdown(block: Mapping[str, Any]) -> str:
    """The account as a Markdown table (part, RSS it adds, what it is), then the per-entry caches."""
    lines = ["| part | RSS added | note |", "|:---|---:|:---|"]
    for part in block["parts"]:
        sign = "peak +" if part.get("transient") else ""
        lines.append(f"| {part['part']} | {sign}{part['rss_delta_mb']:.0f} MiB | {part['note']} |")
    lines.append(
        f"| malloc_trim after the threaded requests | -{block['arenas_trim_returns_mb']:.0f} MiB | free memory the arenas kept |"
    )
    settings = block["settings"]
    tower, feature, response = block["tower_cache"], block["feature_cache"], block["response_cache"]
    if tower.get("bytes_per_entry"):
        full = tower["bytes_per_entry"] * tower["capacity"] / MIB
        lines.append(
            f"| tower cache, full | {full:.0f} MiB | {tower['capacity']} entries x {tower['bytes_per_entry']} B "
            f"(measured on {tower['entries']}) |"
        )
    if feature.get("bytes_per_product"):
        lines.append(
            f"| feature cache, per product | {feature['bytes_per_product'] / 1024:.1f} KiB | "
            f"{feature['product_entries']} products held now |"
        )
    if settings["cache_size"]:
        full = response["bytes_per_40_candidates"] * settings["cache_size"] / MIB
        lines.append(
            f"| response cache, full of 40-candidate answers | {full:.1f} MiB | {settings['cache_size']} x "
            f"{response['bytes_per_40_candidates']} B |"
        )
    lines.append(
        f"RSS {block['start_rss_mb']:.0f} MiB at start, {block['end_rss_mb']:.0f} MiB at the end; settings: "
        + ", ".join(f"{k}={v}" for k, v in settings.items())
    )
    by_import = next((p["by_import"] for p in block["parts"] if p.get("by_import")), None)
    if by_import:
        lines.append(
            "libraries by import, one at a time: "
            + ", ".join(f"{m['module']} {m['rss_delta_mb']:.0f}" for m in by_import)
            + " MiB"
        )
    return "\n".join(lines)
