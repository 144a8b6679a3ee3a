"""Speed command: ``bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from esci_reranker.cli.app import app
from esci_reranker.cli.common import SetOption, fail, parse_int_list, require_positive


@app.command("bench")
def bench_command(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint folder (PyTorch weights).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the JSON result.")] = Path("bench.json"),
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass of every backend.")] = 32,
    pairs: Annotated[int, typer.Option(help="Pairs scored per timed round (bundled sample).")] = 512,
    repeats: Annotated[int, typer.Option(help="Timed rounds per backend, interleaved.")] = 3,
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads of every backend and of the server (default: torch's count)."),
    ] = None,
    server: Annotated[
        bool,
        typer.Option(
            "--server/--no-server",
            help="Also measure /rerank p50/p99 through the real server (40 candidates, concurrency "
            "1 and 8, dynamic batching off and on, cache off), each setting next to the in-process "
            "time of sentence-transformers CrossEncoder.predict on the same 40 pairs (anchor_p50_ms, "
            "p50_vs_anchor).",
        ),
    ] = True,
    backends: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated subset of torch_fp32, torch_bf16, torch_int8, onnx_fp32, onnx_int8, "
            "st_cross_encoder (default: all)."
        ),
    ] = None,
    test_queries: Annotated[
        int | None, typer.Option(help="Score only the first N holdout queries for nDCG (default: all).")
    ] = None,
    roofline_size: Annotated[
        int, typer.Option(help="Side of the fp32 matmul that measures the roofline.")
    ] = 2048,
    server_requests: Annotated[int, typer.Option(help="Timed /rerank requests per server setting.")] = 60,
    server_concurrency: Annotated[
        str, typer.Option(help="Comma-separated client concurrency levels.")
    ] = "1,8",
    server_seconds: Annotated[float, typer.Option(help="Time limit per server setting, in seconds.")] = 120.0,
    server_precision: Annotated[
        str,
        typer.Option(help="PRECISION of the server: auto, fp32, bf16 or int8 (int8: lowest CPU latency)."),
    ] = "auto",
) -> None:
    """Benchmark inference speed: pairs/s of each backend vs sentence-transformers, share of the fp32
    roofline, nDCG, and (--server) /rerank latency through the HTTP service. Prints a table, writes JSON.

    Run it on an otherwise idle machine; see docs/speed.md for what each number means.
    """
    require_positive(batch_size=batch_size, pairs=pairs, repeats=repeats, threads=threads)
    if not model.is_dir():
        fail(f"--model {model}: no such checkpoint folder.")
    from esci_reranker.bench import BACKENDS, format_server_table, run_backend_bench

    chosen = [b.strip() for b in backends.split(",") if b.strip()] if backends is not None else list(BACKENDS)
    unknown = [b for b in chosen if b not in BACKENDS]
    if unknown or not chosen:
        fail(f"--backends {backends!r}: unknown {unknown}; expected names from {', '.join(BACKENDS)}.")
    hook = None
    if server:
        from esci_reranker.bench.server import ServerLatency

        levels = parse_int_list("--server-concurrency", server_concurrency, minimum=1)
        require_positive(server_requests=server_requests)
        if not server_seconds > 0:
            fail(f"--server-seconds {server_seconds}: expected a positive number of seconds.")
        try:
            hook = ServerLatency(
                concurrency=levels,
                requests=server_requests,
                max_seconds=server_seconds,
                threads=threads,
                precision=server_precision,
                echo=typer.echo,
            )
        except ValueError as err:
            fail(f"--server-precision: {err}")
    try:
        run_backend_bench(
            model,
            out,
            batch_size=batch_size,
            n_pairs=pairs,
            repeats=repeats,
            threads=threads,
            backends=chosen,
            test_queries=test_queries,
            roofline_size=roofline_size,
            server_latency=hook,
            echo=typer.echo,
            server_table=format_server_table,
        )
    except (OSError, ValueError) as error:  # CheckpointError is a ValueError
        fail(f"--model {model}: {error}")
    typer.echo(f"wrote {out}")


@app.command("bench-families")
def bench_families_command(
    model: Annotated[
        list[Path], typer.Option("--model", help="Checkpoint folder; repeat for each model (any family).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Where to write the JSON result.")] = Path(
        "bench_families.json"
    ),
    pairs: Annotated[
        int, typer.Option(help="Pairs scored per throughput round (whole candidate lists).")
    ] = 256,
    repeats: Annotated[int, typer.Option(help="Rounds per model, interleaved over the models.")] = 3,
    requests: Annotated[int, typer.Option(help="40-candidate rerank requests per round.")] = 10,
    request_size: Annotated[int, typer.Option(help="Candidates per request.")] = 40,
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass (list models: whole lists).")] = 32,
    precision: Annotated[str, typer.Option(help="auto (bf16 where native), fp32 or bf16.")] = "auto",
) -> None:
    """Compare model families (multi-task, single-task, listwise, llm) on the same pairs: pairs/s and
    ms per 40-candidate rerank request, each through Reranker's one scoring path. Prints a table,
    writes JSON. Run it on an otherwise idle machine."""
    from esci_reranker.fsutil import write_json

    require_positive(pairs=pairs, repeats=repeats, requests=requests)
    missing = [str(m) for m in model if not m.is_dir()]
    if missing:
        fail(f"--model {', '.join(missing)}: no such checkpoint folder.")
    from esci_reranker.bench.families import format_family_table, run_family_bench

    try:
        result = run_family_bench(
            model, pairs, repeats, request_size, requests, batch_size=batch_size, precision=precision
        )
    except (OSError, ValueError) as error:
        fail(str(error))
        return
    write_json(out, result)
    typer.echo(format_family_table(result))
    typer.echo(f"wrote {out}")


@app.command("bench-train")
def bench_train_command(
    config: Annotated[Path, typer.Option("--config", help="Training config (YAML).")] = Path(
        "configs/multi_task.yaml"
    ),
    overrides: SetOption = None,
    out: Annotated[Path, typer.Option("--out", help="Where to write the JSON result.")] = Path(
        "bench_train.json"
    ),
    batches: Annotated[int, typer.Option(help="Training batches per timed round (bundled sample).")] = 6,
    repeats: Annotated[int, typer.Option(help="Timed rounds per variant, interleaved.")] = 3,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: torch's count).")] = None,
    precisions: Annotated[
        str, typer.Option(help="Comma-separated subset of fp32, bf16 (bf16 only where native).")
    ] = "fp32,bf16",
    roofline_size: Annotated[
        int, typer.Option(help="Side of the fp32 matmul that measures the roofline.")
    ] = 2048,
    memory: Annotated[
        bool, typer.Option("--memory/--no-memory", help="Measure each variant's peak RSS in a fresh process.")
    ] = True,
) -> None:
    """Benchmark training speed: pairs/s and tokens/s of the training step (forward, backward, AdamW)
    of the config's model on real batches of the bundled sample, padded and padding-free, in fp32 and
    bf16, with the share of the fp32 matmul roofline and peak RSS. Prints a table, writes JSON.

    Run it on an otherwise idle machine; see docs/speed.md ("Training speed").
    """
    require_positive(batches=batches, repeats=repeats, roofline_size=roofline_size, threads=threads)
    if not config.is_file():
        fail(f"--config {config}: no such file.")
    from esci_reranker.bench.training import run_train_bench
    from esci_reranker.train.config import ConfigError

    chosen = [p.strip() for p in precisions.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in ("fp32", "bf16")]
    if unknown or not chosen:
        fail(f"--precisions {precisions!r}: unknown {unknown}; expected fp32 and/or bf16.")
    try:
        run_train_bench(
            config,
            out,
            overrides=overrides or [],
            n_batches=batches,
            repeats=repeats,
            threads=threads,
            precisions=chosen,
            roofline_size=roofline_size,
            memory=memory,
            echo=typer.echo,
        )
    except ConfigError as error:
        fail(str(error))
    except ValueError as error:  # a model the benchmark cannot train padding-free
        fail(f"--config {config}: {error}")
    typer.echo(f"wrote {out}")
