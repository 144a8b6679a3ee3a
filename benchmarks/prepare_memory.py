"""Peak memory and wall time of ``esci-reranker prepare`` on full-size synthetic ESCI files.

Builds a raw pair of parquets shaped like Amazon's (same file names, columns and types) in a
temporary folder: by default the US locale at full size (1,818,825 example rows over 97,345
queries, 1,215,854 products), or with ``--all-locales`` all three (2,621,288 rows, about 1.8M
products). Product text has ESCI-like lengths (title ~100 chars; description in half of the
products, median ~770; bullets in 95%, median ~670) with some HTML to strip, and Japanese
products get Japanese characters. Then it runs ``python -m esci_reranker.cli prepare`` in a
subprocess and reports its peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``), wall time and
CPU time.

    python benchmarks/prepare_memory.py --out runs/bench/prepare_memory.json
    python benchmarks/prepare_memory.py --all-locales --out runs/bench/prepare_memory_all.json
    python benchmarks/prepare_memory.py --scale 0.05   # a quick smoke run
    python benchmarks/prepare_memory.py --keep /tmp/esci-synthetic   # keep (and reuse) the files

The synthetic data only serves to size the run: its text is random words, not real products.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Published ESCI sizes per locale: (queries, example rows, products).
FULL_SIZE = {
    "us": (97_345, 1_818_825, 1_215_854),
    "es": (15_180, 356_410, 259_973),
    "jp": (18_127, 446_053, 339_059),
}
LABEL_SHARES = {"E": 0.65, "S": 0.22, "C": 0.03, "I": 0.10}  # roughly ESCI's US mix
TEST_SHARE = 0.3
BLOB_CHARS = 8_000_000


def _blob(rng: np.random.Generator, alphabet: str, markup: bool) -> str:
    """A long string of random words (ASCII or Japanese), with occasional HTML to clean."""
    letters = np.array(list(alphabet))
    lengths = rng.integers(2, 10, size=6_000)
    words = ["".join(rng.choice(letters, size=n)) for n in lengths]
    if markup:
        words += ["<br>", "<p>", "</p>", "&amp;", "<b>", "</b>", "  ", "\n"]
    picks = rng.integers(0, len(words), size=BLOB_CHARS // 5)
    return " ".join(words[i] for i in picks)


def _slices(rng: np.random.Generator, blob: str, median: float, cap: int, n: int) -> list[str]:
    lengths = np.clip(rng.lognormal(np.log(median), 0.6, size=n), 5, cap).astype(np.int64)
    starts = rng.integers(0, len(blob) - cap - 1, size=n)
    return [blob[s : s + m] for s, m in zip(starts.tolist(), lengths.tolist(), strict=True)]


def _maybe(rng: np.random.Generator, values: list[str], share: float) -> list[str | None]:
    present = rng.random(len(values)) < share
    return [v if p else None for v, p in zip(values, present.tolist(), strict=True)]


def build(folder: Path, locales: list[str], scale: float, seed: int = 0) -> dict[str, int]:
    """Write Amazon-shaped examples and products parquets into ``folder``; return their sizes."""
    rng = np.random.default_rng(seed)
    ascii_blob = _blob(rng, "abcdefghijklmnopqrstuvwxyz", markup=True)
    japanese_blob = _blob(rng, "あいうえおかきくけこさしすせそたちつてとなにぬねの製品電池充電器", True)
    brands = [f"brand{i}" for i in range(50_000)]
    colors = [f"color{i}" for i in range(2_000)]
    example_parts, product_parts = [], []
    next_query, next_product, next_example = 0, 0, 0
    for locale in locales:
        n_queries, n_rows, n_products = (max(2, round(x * scale)) for x in FULL_SIZE[locale])
        blob = japanese_blob if locale == "jp" else ascii_blob
        ids = [f"B{i:09d}" for i in range(next_product, next_product + n_products)]
        next_product += n_products
        product_parts.append(
            pa.table(
                {
                    "product_id": ids,
                    "product_locale": [locale] * n_products,
                    "product_title": _slices(rng, blob, 100, 400, n_products),
                    "product_description": _maybe(rng, _slices(rng, blob, 770, 8_000, n_products), 0.5),
                    "product_bullet_point": _maybe(rng, _slices(rng, blob, 670, 4_000, n_products), 0.95),
                    "product_brand": _maybe(
                        rng, [brands[i] for i in rng.integers(0, len(brands), n_products)], 0.98
                    ),
                    "product_color": _maybe(
                        rng, [colors[i] for i in rng.integers(0, len(colors), n_products)], 0.8
                    ),
                }
            )
        )
        # Every product is a candidate at least once; the rest are drawn at random.
        product_of_row = np.concatenate(
            [rng.permutation(n_products), rng.integers(0, n_products, n_rows - n_products)]
        )
        rng.shuffle(product_of_row)
        sizes = rng.multinomial(n_rows - n_queries, np.full(n_queries, 1 / n_queries)) + 1
        query_ids = np.arange(next_query, next_query + n_queries)
        next_query += n_queries
        query_text = [" ".join(_slices(rng, blob, 25, 60, 1)[0].split()[:5]) for _ in query_ids]
        is_test = rng.random(n_queries) < TEST_SHARE
        is_small = rng.random(n_queries) < 0.5
        labels = rng.choice(list(LABEL_SHARES), size=n_rows, p=list(LABEL_SHARES.values()))
        row_query = np.repeat(np.arange(n_queries), sizes)
        example_parts.append(
            pa.table(
                {
                    "example_id": np.arange(next_example, next_example + n_rows),
                    "query": pa.array(np.array(query_text, dtype=object)[row_query]),
                    "query_id": query_ids[row_query],
                    "product_id": pa.array(np.array(ids, dtype=object)[product_of_row]),
                    "product_locale": [locale] * n_rows,
                    "esci_label": labels,
                    "small_version": is_small[row_query].astype(np.int64),
                    "large_version": np.ones(n_rows, dtype=np.int64),
                    "split": np.where(is_test[row_query], "test", "train"),
                }
            )
        )
        next_example += n_rows
    examples = pa.concat_tables(example_parts)
    products = pa.concat_tables(product_parts)
    pq.write_table(examples, folder / "shopping_queries_dataset_examples.parquet")
    pq.write_table(products, folder / "shopping_queries_dataset_products.parquet")
    return {"example_rows": examples.num_rows, "products": products.num_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all-locales", action="store_true", help="us+es+jp, 2.6M rows")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of full size")
    parser.add_argument("--out", type=Path, help="write the numbers here as JSON")
    parser.add_argument(
        "--keep", type=Path, help="build the files in this folder and keep them (reused next time)"
    )
    args = parser.parse_args()
    locales = ["us", "es", "jp"] if args.all_locales else ["us"]

    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        examples = folder / "shopping_queries_dataset_examples.parquet"
        products = folder / "shopping_queries_dataset_products.parquet"
        if args.keep and examples.is_file() and products.is_file():
            # A kept folder from an earlier run (same options assumed): skip the slow build.
            sizes = {
                "example_rows": pq.read_metadata(examples).num_rows,
                "products": pq.read_metadata(products).num_rows,
            }
        else:
            start = time.perf_counter()
            sizes = build(folder, locales, args.scale)
            print(f"built {sizes} in {time.perf_counter() - start:.0f} s", flush=True)
        input_bytes = {p.name: p.stat().st_size for p in (examples, products)}

        out_dir = folder / "prepared"
        command = [
            sys.executable,
            "-m",
            "esci_reranker.cli",
            "prepare",
            "--examples",
            str(examples),
            "--products",
            str(products),
            "--locale",
            "all" if args.all_locales else "us",
            "--out",
            str(out_dir),
        ]
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if completed.returncode != 0:
            sys.exit(f"prepare failed ({completed.returncode}):\n{completed.stderr}")
        # ru_maxrss is in KiB on Linux; it is the largest of the children waited for (one here).
        # CPU time is reported too: on a busy machine it is steadier than the wall time.
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_mib = usage.ru_maxrss / 1024
        cpu_seconds = usage.ru_utime + usage.ru_stime
        output_bytes = {p.name: p.stat().st_size for p in out_dir.iterdir()}

    result = {
        "locales": locales,
        "scale": args.scale,
        **sizes,
        "input_bytes": input_bytes,
        "output_bytes": output_bytes,
        "prepare_seconds": round(seconds, 1),
        "prepare_cpu_seconds": round(cpu_seconds, 1),
        "prepare_peak_rss_mib": round(peak_mib),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "prepare_stdout": completed.stdout.strip().splitlines(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
