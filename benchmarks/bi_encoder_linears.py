"""Zero-shot bi-encoder embedding on a CPU with oneDNN-packed linear layers against ``nn.Linear``.

``eval.baselines.encode`` (the bi-encoder baseline, and every catalogue index build of 256 texts
or more) swaps the encoder's fp32 linear layers for ``model.cpu.PackedLinear`` on a CPU. This
measures what that buys, in one process, interleaved round by round: the bi-encoder baseline over
a prepared split (each distinct query and product text embedded once, no cache) with the swap and
with it turned off, and the largest difference between their cosine scores.

    python benchmarks/bi_encoder_linears.py --data runs/default/data/test.parquet \
        --out runs/bench/bi_encoder_linears.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/default/data/test.parquet"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bi_encoder_linears.json"))
    args = parser.parse_args()

    import torch

    import esci_reranker.model.cpu as cpu
    from esci_reranker.eval.baselines import bi_encoder_run

    frame = pd.read_parquet(args.data)
    packing = cpu.pack_linears
    seconds: dict[str, list[float]] = {"nn_linear": [], "onednn_packed": []}
    scores: dict[str, np.ndarray] = {}
    try:
        for _ in range(args.rounds):
            for variant in seconds:
                # the swap turned off: encode's call finds nothing to pack
                cpu.pack_linears = packing if variant == "onednn_packed" else (lambda module: 0)
                start = time.perf_counter()
                run = bi_encoder_run(frame, shared_cache=False)
                seconds[variant].append(time.perf_counter() - start)
                scores[variant] = run["score"].to_numpy()
                print(f"{variant:14s} {seconds[variant][-1]:6.2f} s", flush=True)
    finally:
        cpu.pack_linears = packing
    best = {k: min(v) for k, v in seconds.items()}
    result = {
        "data": str(args.data),
        "pairs": len(frame),
        "distinct_texts": int(frame["query"].nunique() + frame["product_id"].nunique()),
        "threads": torch.get_num_threads(),
        "onednn_available": cpu.onednn_available(),
        "seconds": seconds,
        "best_seconds": best,
        "speedup": best["nn_linear"] / best["onednn_packed"],
        "max_score_difference": float(np.abs(scores["nn_linear"] - scores["onednn_packed"]).max()),
        "rate": "each variant's fastest round (noise only slows rounds)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"bi-encoder over {len(frame)} pairs: nn.Linear {best['nn_linear']:.2f} s, oneDNN-packed "
        f"{best['onednn_packed']:.2f} s ({result['speedup']:.2f}x); scores differ by at most "
        f"{result['max_score_difference']:.1e} -> {args.out}"
    )


if __name__ == "__main__":
    main()
