"""Training speed of a config's model on real batches of the bundled sample: ``bench-train``.

``run_train_bench(config, out_json)`` times the training step (forward, backward, gradient
clipping and the AdamW update, as ``train.loop`` runs it) of the config's model in each of

- **padded**: the encoder's own forward over the pair and both tower batches, each padded to
  its longest row, with PyTorch's dropout, ``nn.Linear`` and AdamW's per-parameter loop
  (``padding_free: false``: the step before padding-free training);
- **packed_torch_dropout**: the padding-free step (``model.unpadded.packed_states``) with
  PyTorch's dropout kernel;
- **packed_torch_linear** (fp32 only): the padding-free step with PyTorch's ``nn.Linear`` (MKL's
  sgemm on a CPU) instead of the oneDNN linear layers training uses in fp32
  (``model.cpu.OnednnLinear``); under bf16 autocast both reach oneDNN, so it is not run;
- **packed**: the padding-free step with the faster CPU dropout masks (``model.cpu.cpu_dropout``)
  and oneDNN's linear layers in fp32, as training runs it (the packed variants update with the
  fused AdamW of ``train.loop.build_optimizer``);

in fp32 and, on CPUs with native bf16 (AVX-512 BF16 or AMX), under bf16 autocast as the loop's
``mixed_precision: auto`` runs it. All variants start from the same weights and train on the same
batches: the config's own batching (query slices for the default) of the sample's ``train``
split, tokenised once, outside the timing.

**Fair timing**, as ``bench``: an untimed warm-up step per variant, then ``repeats`` rounds in
which every variant runs all batches, round-robin with the start shifted each round, and the
roofline matmul inside every round. Rates use each variant's fastest round; medians are kept.

**FLOPs** are those of the step as the model runs it: the encoder forward over the real tokens
of the pair and of each distinct query and product text of a batch (``bench.backends.
encoder_flops``), times 3 for forward plus backward (the backward pass computes a gradient for
the activations and one for the weights, each a forward's worth of matrix products). Both variants
are credited the same useful work, so the padded variant's share of the roofline shows what its
pad tokens cost. The roofline is the best fp32 ``torch.mm`` (or ONNX Runtime ``MatMul``) rate in
the same run.

**Peak RSS** of each variant is measured in a fresh process (a spawned child that builds the
model and runs the warm-up and two steps), so one variant's memory never counts for another's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pandas as pd
import torch

from esci_reranker.bench.backends import (
    _encoder_shape,
    encoder_flops,
    interleaved_rounds,
    machine_record,
    text_table,
)
from esci_reranker.data.sample import sample_path
from esci_reranker.data.text import product_texts
from esci_reranker.fsutil import write_json
from esci_reranker.hardware import autocast, cpu_bf16_support, keep_freed_memory
from esci_reranker.labels import LABEL_TO_INDEX
from esci_reranker.model.features import unique_rows

#: The steps compared: the encoder's padded forward and the padding-free one, the latter with
#: PyTorch's dropout kernel, with PyTorch's linear layers, and as training runs it
#: (``model.cpu.cpu_dropout`` and ``model.cpu.OnednnLinear``).
LAYOUTS: Final[tuple[str, ...]] = ("padded", "packed_torch_dropout", "packed_torch_linear", "packed")
#: Layouts run in fp32 only, and why (what they change does not exist under bf16 autocast).
FP32_ONLY: Final[dict[str, str]] = {
    "packed_torch_linear": "under bf16 autocast the linear layers reach oneDNN either way",
}
#: Precisions measured (bf16 only where the CPU has it natively).
TRAIN_PRECISIONS: Final[tuple[str, ...]] = ("fp32", "bf16")
#: Split of the bundled sample whose rows make the batches.
TRAIN_SPLIT: Final[str] = "train"
#: Forward + backward FLOPs per forward FLOP (every layer trainable).
TRAINING_FLOPS_FACTOR: Final[float] = 3.0


def training_flops_factor(layers: int, frozen: int) -> float:
    """Forward + backward FLOPs per forward FLOP when the lowest ``frozen`` of ``layers`` layers are
    fixed (``model.freeze_layers``): those run forward only, the others forward and a backward
    twice its size."""
    return 1.0 + (TRAINING_FLOPS_FACTOR - 1.0) * (layers - frozen) / layers


@dataclass
class _Work:
    """The batches of the benchmark and what they cost."""

    batches: list[dict[str, torch.Tensor]]
    pairs: int
    real_tokens: int
    padded_tokens: int
    forward_flops: float


@dataclass
class _Variant:
    name: str
    layout: str
    precision: str
    model: Any
    optimizer: torch.optim.Optimizer
    seconds: list[float] = field(default_factory=list)


def _load_cfg(config: str | Path, overrides: Sequence[str]) -> Any:
    from esci_reranker.train.config import load_config

    return load_config(config, list(overrides))


def _build(cfg: Any) -> tuple[Any, Any]:
    from esci_reranker.train.loop import build_model

    model, tokenizer = build_model(cfg)
    if not hasattr(model, "enable_packed_training"):
        raise ValueError(f"model.type {cfg.model.type}: bench-train measures the encoder families only.")
    return model, tokenizer


def training_work(cfg: Any, model: Any, tokenizer: Any, n_batches: int) -> _Work:
    """The first ``n_batches`` training batches of the sample's train split, collated, and their cost."""
    from esci_reranker.model.features import pair_encoder_for
    from esci_reranker.train.batching import bucketed_batches, query_batches

    frame = pd.read_parquet(sample_path())
    frame = frame[frame["split"] == TRAIN_SPLIT].reset_index(drop=True)
    texts = product_texts(frame, cfg.model.text_fields, cfg.model.long_field_chars).astype(str).tolist()
    encoder = pair_encoder_for(tokenizer, model.config)
    encoded = encoder.encode(frame["query"].astype(str).tolist(), texts)
    labels = torch.tensor([LABEL_TO_INDEX[x] for x in frame["esci_label"]], dtype=torch.long)
    groups = torch.as_tensor(pd.factorize(frame["query_id"])[0], dtype=torch.long)
    optim = cfg.optim
    if optim.batching == "query":
        order = query_batches(groups.numpy(), optim.batch_size, optim.group_size, cfg.seed, 0)
    else:
        order = bucketed_batches(encoded.lengths(), optim.batch_size, cfg.seed, 0, optim.bucket_size)
    order = order[:n_batches]
    layers, hidden, intermediate = _encoder_shape(model.config)
    batches, lens, real, padded = [], [], 0, 0
    for index in order:
        batch = encoder.collate(encoded, index) | {"labels": labels[index]}
        if cfg.loss.rank_weight > 0 or model.config.list_level:
            batch["groups"] = groups[index]
        batches.append(batch)
        lens += [len(encoded.pair_ids[i]) for i in index]
        for seqs in (encoded.query_ids, encoded.product_ids):
            if seqs is not None:
                lens += [len(s) for s in unique_rows([seqs[i] for i in index])[0]]
        for key in ("attention_mask", "query_attention_mask", "product_attention_mask"):
            if key in batch:
                real += int(batch[key].sum())
                padded += int(batch[key].numel())
    return _Work(
        batches=batches,
        pairs=sum(len(i) for i in order),
        real_tokens=real,
        padded_tokens=padded,
        forward_flops=encoder_flops(lens, layers, hidden, intermediate),
    )


def _variant(name: str, model: Any, cfg: Any, layout: str, precision: str) -> _Variant:
    from esci_reranker.model.cpu import use_torch_dropout, use_torch_linears
    from esci_reranker.train.loop import build_optimizer

    model = copy.deepcopy(model).train()
    if layout in ("padded", "packed_torch_dropout"):  # the steps before: PyTorch's dropout kernel
        use_torch_dropout(model)
    if layout in ("padded", "packed_torch_linear"):  # PyTorch's linear layers (MKL on a CPU)
        use_torch_linears(model)
    model.enable_packed_training(layout != "padded")
    if layout != "padded" and not model.packed_training:
        raise ValueError(f"{cfg.model.backbone}: the encoder cannot train padding-free (see the log).")
    # the padded step is the one before: AdamW's per-parameter loop, not the fused update
    optimizer = _loop_adamw(model, cfg) if layout == "padded" else build_optimizer(model, cfg.optim)
    return _Variant(name, layout, precision, model, optimizer)


def _train_steps(variant: _Variant, batches: Sequence[dict[str, torch.Tensor]], max_norm: float) -> None:
    """One training step per batch, as ``train.loop`` runs it (autocast around the forward only)."""
    dtype = torch.bfloat16 if variant.precision == "bf16" else None
    model, optimizer = variant.model, variant.optimizer
    for batch in batches:
        with autocast(torch.device("cpu"), dtype):
            out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _memory_probe(
    config: str, overrides: list[str], layout: str, precision: str, n_batches: int, threads: int
) -> float:
    """In a fresh process: peak RSS (MB) of building the model and running warm-up + 2 steps."""
    # A forked and exec'd child starts with its parent's high-water mark (Linux keeps it across
    # exec), so it is reset first; without /proc (not Linux) the number is the process peak.
    _reset_peak_rss()
    torch.set_num_threads(threads)
    keep_freed_memory()
    cfg = _load_cfg(config, overrides)
    model, tokenizer = _build(cfg)
    work = training_work(cfg, model, tokenizer, min(n_batches, 3))
    variant = _variant(f"{layout}_{precision}", model, cfg, layout, precision)
    del model
    _train_steps(variant, work.batches, cfg.optim.max_grad_norm)
    return _peak_rss_mb()


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _peak_rss(
    config: str | Path, overrides: Sequence[str], layout: str, precision: str, n_batches: int, threads: int
) -> float | None:
    context = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            future = pool.submit(
                _memory_probe, str(config), list(overrides), layout, precision, n_batches, threads
            )
            return float(future.result())
    except (OSError, concurrent.futures.process.BrokenProcessPool):
        return None


def run_train_bench(
    config: str | Path = "configs/multi_task.yaml",
    out_json: str | Path | None = None,
    overrides: Sequence[str] = (),
    n_batches: int = 6,
    repeats: int = 3,
    threads: int | None = None,
    precisions: Sequence[str] = TRAIN_PRECISIONS,
    roofline_size: int = 2048,
    memory: bool = True,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Benchmark the training step of ``config``'s model, padded and padding-free, per precision.

    Args:
        config: a training config (YAML); ``overrides`` are ``--set`` assignments.
        out_json: where to write the JSON (None: do not write).
        n_batches: training batches per timed round (the config's batch size and batching).
        repeats: timed rounds, interleaved over the variants.
        threads: intra-op threads (default ``torch.get_num_threads()``).
        precisions: a subset of ``TRAIN_PRECISIONS``; bf16 is skipped (with the reason) on a CPU
            without native bf16.
        roofline_size: side of the fp32 matmul that measures the roofline.
        memory: also measure each variant's peak RSS in a fresh process.
        echo: where progress lines and the table go (None: silent).

    Returns:
        The JSON-ready result: ``machine``, ``settings``, ``model``, ``work``,
        ``roofline_fp32_gflops``, ``variants`` (per variant ``pairs_per_second``,
        ``tokens_per_second``, ``step_ms``, ``gflops``, ``roofline_share``, ``peak_rss_mb``) and
        ``speedup`` (packed over padded, per precision), ``dropout_speedup`` (packed over
        packed_torch_dropout), ``linear_speedup`` (packed over packed_torch_linear, fp32) and
        ``optimizer_step_ms`` (the AdamW update alone, per-parameter loop and fused, and their
        ratio).

    Raises:
        ValueError: a bad count or precision, or a config whose model cannot be measured.
    """
    for name, value in (("n_batches", n_batches), ("repeats", repeats), ("roofline_size", roofline_size)):
        if value < 1:
            raise ValueError(f"{name}={value}; expected a positive integer.")
    unknown = [p for p in precisions if p not in TRAIN_PRECISIONS]
    if unknown or not precisions:
        raise ValueError(f"precisions: unknown {unknown}; expected a subset of {list(TRAIN_PRECISIONS)}.")
    say = echo or (lambda _line: None)
    previous = torch.get_num_threads()
    threads = threads or previous
    torch.set_num_threads(threads)
    keep_freed_memory()  # as train.loop does on the CPU
    load_before = os.getloadavg()
    try:
        result = _measure(
            config, overrides, n_batches, repeats, threads, precisions, roofline_size, memory, say
        )
    finally:
        torch.set_num_threads(previous)
    result["machine"]["load_average_before"] = load_before
    result["machine"]["load_average_after"] = os.getloadavg()
    if out_json is not None:
        write_json(out_json, result)
    say(format_train_table(result))
    return result


def _measure(
    config: str | Path,
    overrides: Sequence[str],
    n_batches: int,
    repeats: int,
    threads: int,
    precisions: Sequence[str],
    roofline_size: int,
    memory: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    cfg = _load_cfg(config, overrides)
    torch.manual_seed(cfg.seed)
    model, tokenizer = _build(cfg)
    work = training_work(cfg, model, tokenizer, n_batches)
    bf16_ok, bf16_why = cpu_bf16_support()
    skipped: dict[str, dict[str, Any]] = {}
    variants: dict[str, _Variant] = {}
    for precision in precisions:
        for layout in LAYOUTS:
            name = f"{layout}_{precision}"
            if precision == "bf16" and not bf16_ok:
                skipped[name] = {"status": "skipped", "reason": bf16_why}
                continue
            if precision != "fp32" and layout in FP32_ONLY:
                skipped[name] = {"status": "skipped", "reason": FP32_ONLY[layout]}
                continue
            variants[name] = _variant(name, model, cfg, layout, precision)
    max_norm = cfg.optim.max_grad_norm
    for variant in variants.values():  # warm-up: thread pool, allocator, autocast's casts
        _train_steps(variant, work.batches[:1], max_norm)
    roofline = interleaved_rounds(
        variants,
        lambda v: _train_steps(v, work.batches, max_norm),
        repeats,
        roofline_size,
        threads,
        say,
        lambda n, seconds: f"{work.pairs / seconds:.1f} pairs/s",
    )
    factor = training_flops_factor(_encoder_shape(model.config)[0], cfg.model.freeze_layers)
    flops = factor * work.forward_flops
    entries: dict[str, dict[str, Any]] = {}
    for name, v in variants.items():
        best, median = min(v.seconds), statistics.median(v.seconds)
        entries[name] = {
            "status": "ok",
            "layout": v.layout,
            "precision": v.precision,
            "pairs_per_second": work.pairs / best,
            "pairs_per_second_median": work.pairs / median,
            "tokens_per_second": work.real_tokens / best,
            "step_ms": 1000 * best / len(work.batches),
            "seconds": v.seconds,
            "gflops": flops / best / 1e9,
            "roofline_share": flops / best / 1e9 / roofline.peak,
            "peak_rss_mb": None,
        }
    if memory:
        for name, entry in entries.items():
            say(f"peak RSS of {name} (fresh process) ...")
            entry["peak_rss_mb"] = _peak_rss(
                config, overrides, entry["layout"], entry["precision"], n_batches, threads
            )
    entries |= skipped
    speedup = _speedups(entries, precisions, "packed", "padded")
    dropout_speedup = _speedups(entries, precisions, "packed", "packed_torch_dropout")
    linear_speedup = _speedups(entries, precisions, "packed", "packed_torch_linear")
    optimizer = _optimizer_steps(model, cfg, repeats)
    layers, hidden, intermediate = _encoder_shape(model.config)
    return {
        "config": str(config),
        "overrides": list(overrides),
        "model": {
            "model_type": model.config.model_type,
            "backbone": model.config.backbone_name,
            "layers": layers,
            "hidden": hidden,
            "intermediate": intermediate,
            "prior": model.config.prior,
            "lexical": model.config.lexical,
            "heads": list(model.heads),
            "max_length": model.config.max_length,
        },
        "machine": machine_record((bf16_ok, bf16_why)),
        "settings": {
            "threads": threads,
            "batches_per_round": len(work.batches),
            "batch_size": cfg.optim.batch_size,
            "batching": cfg.optim.batching,
            "repeats": repeats,
            "step": "forward + backward + clip_grad_norm + AdamW step (dropout on)",
            "pairs_source": f"bundled sample ({sample_path().name}), split {TRAIN_SPLIT!r}",
            "rate": "each variant's fastest round (noise only slows rounds)",
        },
        "work": {
            "pairs_per_round": work.pairs,
            "real_tokens_per_round": work.real_tokens,
            "padded_tokens_per_round": work.padded_tokens,
            "padding_share": 1 - work.real_tokens / work.padded_tokens if work.padded_tokens else 0.0,
            "forward_flops_per_pair": work.forward_flops / work.pairs,
            "training_flops_per_pair": flops / work.pairs,
            "training_flops_factor": factor,
        },
        **roofline.record(),
        "variants": entries,
        "speedup": speedup,
        "dropout_speedup": dropout_speedup,
        "linear_speedup": linear_speedup,
        "optimizer_step_ms": optimizer,
    }


def _optimizer_steps(model: Any, cfg: Any, repeats: int, steps: int = 10) -> dict[str, float]:
    """Milliseconds of one AdamW update of the model's trainable weights: AdamW's per-parameter
    loop against the fused update training uses (``train.loop.build_optimizer``), each the
    fastest of ``repeats`` interleaved rounds of ``steps`` updates on the same gradients."""
    from esci_reranker.train.loop import build_optimizer

    timed: dict[str, list[float]] = {"per_parameter": [], "fused": []}
    copies = {name: copy.deepcopy(model) for name in timed}
    generator = torch.Generator().manual_seed(0)
    optimizers = {
        "per_parameter": _loop_adamw(copies["per_parameter"], cfg),
        "fused": build_optimizer(copies["fused"], cfg.optim),
    }
    for name, copied in copies.items():
        for param in copied.parameters():
            if param.requires_grad:
                param.grad = torch.randn(param.shape, generator=generator)
        optimizers[name].step()  # warm-up: the state is allocated at the first step
    for _ in range(repeats):
        for name, optimizer in optimizers.items():
            started = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            timed[name].append((time.perf_counter() - started) / steps * 1000)
    best = {name: min(values) for name, values in timed.items()}
    return best | {"speedup": best["per_parameter"] / best["fused"]}


def _loop_adamw(model: Any, cfg: Any) -> torch.optim.AdamW:
    """AdamW's per-parameter loop over training's parameter groups: the update before the fused one."""
    from esci_reranker.train.loop import param_groups

    return torch.optim.AdamW(param_groups(model, cfg.optim), foreach=False)


def _speedups(
    entries: Mapping[str, Mapping[str, Any]], precisions: Sequence[str], faster: str, slower: str
) -> dict[str, float]:
    """Per precision where both layouts ran: ``faster``'s pairs per second over ``slower``'s."""
    ok = {name for name, e in entries.items() if e.get("status") == "ok"}
    return {
        p: entries[f"{faster}_{p}"]["pairs_per_second"] / entries[f"{slower}_{p}"]["pairs_per_second"]
        for p in precisions
        if {f"{faster}_{p}", f"{slower}_{p}"} <= ok
    }


def _variant_row(name: str, e: Mapping[str, Any]) -> tuple[str, ...]:
    rss = e.get("peak_rss_mb")
    return (
        name,
        f"{e['pairs_per_second']:.1f}",
        f"{e['tokens_per_second']:.0f}",
        f"{e['step_ms']:.0f}",
        f"{e['gflops']:.1f}",
        f"{100 * e['roofline_share']:.1f}",
        f"{rss:.0f}" if rss is not None else "-",
    )


def format_train_table(result: dict[str, Any]) -> str:
    """The training benchmark result as a fixed-width text table."""
    header = ("variant", "pairs/s", "tokens/s", "ms/step", "GFLOP/s", "% fp32 peak", "peak RSS MB")
    s, w = result["settings"], result["work"]
    footer = [
        f"fp32 roofline {result['roofline_fp32_gflops']:.1f} GFLOP/s ({s['threads']} threads); "
        f"{s['batches_per_round']} batches of {s['batch_size']} ({s['batching']} batching) x "
        f"{s['repeats']} rounds; {w['padding_share']:.0%} of the padded batches' tokens are padding",
        "speed-up of the padding-free step over the padded one: "
        + (", ".join(f"{p} {x:.2f}x" for p, x in result["speedup"].items()) or "-"),
        "of which the faster dropout masks: "
        + (", ".join(f"{p} {x:.2f}x" for p, x in result.get("dropout_speedup", {}).items()) or "-"),
    ]
    if result.get("linear_speedup"):
        footer.append(
            "of which oneDNN's linear layers: "
            + ", ".join(f"{p} {x:.2f}x" for p, x in result["linear_speedup"].items())
        )
    if "optimizer_step_ms" in result:
        o = result["optimizer_step_ms"]
        footer.append(
            f"AdamW update: {o['per_parameter']:.1f} ms per-parameter, {o['fused']:.1f} ms fused "
            f"({o['speedup']:.1f}x)"
        )
    return text_table(header, result["variants"], _variant_row, footer)
