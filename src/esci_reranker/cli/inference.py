"""Inference commands: ``rerank``, ``score``, ``push`` and ``export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from esci_reranker.cli.app import app
from esci_reranker.cli.common import (
    DEVICE_HELP,
    MODEL_HELP,
    PRECISION_HELP,
    fail,
    fmt_prob,
    load_reranker,
    print_table,
    require_positive,
)

#: `export --format` name -> "module:function" with the signature (model_dir, out_dir, overwrite) -> Path.
#: Imported only when used, so `--help` stays fast and optional extras stay optional.
EXPORT_FORMATS: dict[str, str] = {
    "hf-classifier": "esci_reranker.model.export:export_hf_classifier",
    "st-cross-encoder": "esci_reranker.model.export:export_st_cross_encoder",
    "tei": "esci_reranker.model.export:export_tei",  # text-embeddings-inference reranker folder
    "onnx": "esci_reranker.model.onnx:export_onnx",  # also takes quantize= (--quantize int8)
    "merged": "esci_reranker.model.llm:merge_checkpoint",  # llm family: LoRA merged into the LM
}
#: Formats whose exporter takes ``quantize=``, and the values `--quantize` accepts for them.
QUANTIZE_FORMATS: dict[str, tuple[str, ...]] = {"onnx": ("int8",)}
#: Formats whose exporter takes ``cross_encoder_only=`` (a stacked checkpoint's first stage alone).
CROSS_ENCODER_ONLY_FORMATS: tuple[str, ...] = ("onnx",)


@app.command("rerank")
def rerank_command(
    model: Annotated[str, typer.Option("--model", help=MODEL_HELP)],
    query: Annotated[str, typer.Option("--query", help="The search query.")],
    candidates: Annotated[
        Path,
        typer.Option(
            "--candidates",
            help="A .jsonl, .csv or .parquet file: product_id plus text, or product fields "
            "(title, brand, color, description, bullets or the product_* column names).",
        ),
    ],
    top_k: Annotated[int | None, typer.Option(help="Keep only the best K.")] = None,
    output_format: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "fp32",
) -> None:
    """Rerank the candidates in a file for one query and print them best first."""
    import dataclasses
    import json

    if output_format not in ("table", "json"):
        fail(f"--format {output_format!r}: expected table or json.")
    require_positive(top_k=top_k)
    if not query.strip():
        fail("--query: expected a non-empty text.")
    from esci_reranker.reranker import read_candidates

    try:
        records = read_candidates(candidates)
    except (OSError, ValueError) as error:
        fail(f"--candidates {error}")
    reranker = load_reranker(model, device, precision=precision)
    try:
        ranked = reranker.rerank(query, records, top_k=top_k)
    except ValueError as error:
        fail(f"--candidates {candidates}: {error}")
    if output_format == "json":
        typer.echo(json.dumps([dataclasses.asdict(c) for c in ranked], indent=2))
        return
    texts = {str(r["product_id"]): reranker.text_of(r) for r in records}
    rows = [
        [
            str(c.rank),
            c.product_id,
            f"{c.score:.4f}",
            c.esci_class or "-",
            fmt_prob(c.substitute_prob),
            ("[truncated] " if c.truncated else "") + texts[c.product_id],
        ]
        for c in ranked
    ]
    print_table(
        f"{query!r}: {len(ranked)} of {len(records)} candidates",
        ["rank", "product_id", "score", "pred", "P(sub)", "text"],
        rows,
    )


ENGINES: tuple[str, ...] = ("single", "ray")


@app.command("score")
def score_command(
    model: Annotated[str, typer.Option("--model", help=MODEL_HELP)],
    input_path: Annotated[
        Path,
        typer.Option(
            "--input",
            help="Parquet with query and product_* columns or product_text; other columns pass through. "
            "With --engine ray also a folder, a glob or a URI.",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            help="Parquet to write (input + predictions); with --engine ray a new folder that gets "
            "scores/, rejects/ and summary.json.",
        ),
    ],
    batch_size: Annotated[int, typer.Option(help="Pairs per forward pass.")] = 64,
    chunk_rows: Annotated[
        int | None,
        typer.Option(
            help="Rows read, scored and written at a time (default 50000); with --engine ray the rows "
            "per actor call (default 4096)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "fp32",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    engine: Annotated[
        str,
        typer.Option(
            help="single: this process; ray: Ray Data actors, each holding one model (needs the 'ray' "
            "extra; see docs/scale.md)."
        ),
    ] = "single",
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to join (auto, ray://head:10001); default: $RAY_ADDRESS, else a local Ray."
        ),
    ] = None,
    num_actors: Annotated[int, typer.Option(help="Ray: scoring actors (model copies).")] = 1,
    num_cpus_per_actor: Annotated[
        float, typer.Option(help="Ray: CPUs reserved per actor; also its torch thread count.")
    ] = 1.0,
    num_gpus_per_actor: Annotated[
        float, typer.Option(help="Ray: GPUs reserved per actor (0.5 = two actors per GPU).")
    ] = 0.0,
) -> None:
    """Score every pair of a parquet file and write it with the model's predictions added.

    Adds score, expected_gain, esci_pred, esci_prob_E/S/C/I, substitute_prob and truncated.
    Streams in chunks, so files of millions of rows fit in memory. --engine ray spreads the
    work over Ray Data actors and writes rows without a query or product text to rejects/.
    """
    if engine not in ENGINES:
        fail(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}.")
    require_positive(chunk_rows=chunk_rows)
    if engine == "ray":
        _score_with_ray(
            model,
            str(input_path),
            output,
            batch_size,
            chunk_rows or 4096,
            device,
            precision,
            progress,
            ray_address,
            num_actors,
            num_cpus_per_actor,
            num_gpus_per_actor,
        )
        return
    from esci_reranker.reranker import score_parquet

    if not input_path.is_file():
        fail(f"--input {input_path}: no such file.")
    reranker = load_reranker(model, device, batch_size, precision)
    try:
        rows = score_parquet(reranker, input_path, output, chunk_rows=chunk_rows or 50_000, progress=progress)
    except (OSError, ValueError) as error:
        fail(f"--input {input_path}: {error}")
    typer.echo(f"scored {rows:,} rows -> {output}")


def _score_with_ray(
    model: str,
    input_spec: str,
    output: Path,
    batch_size: int,
    rows_per_batch: int,
    device: str,
    precision: str,
    progress: bool,
    address: str | None,
    num_actors: int,
    num_cpus_per_actor: float,
    num_gpus_per_actor: float,
) -> None:
    """`score --engine ray`: check the options, run ``score_with_ray`` and print its counts."""
    try:
        from esci_reranker.scale.ray_scoring import ScaleError, import_ray, score_with_ray

        import_ray()
    except ImportError as error:
        fail(str(error))
        return
    require_positive(num_actors=num_actors, batch_size=batch_size)
    if num_cpus_per_actor <= 0:
        fail(f"--num-cpus-per-actor {num_cpus_per_actor}: expected a positive number.")
    if num_gpus_per_actor < 0:
        fail(f"--num-gpus-per-actor {num_gpus_per_actor}: expected 0 or more.")
    try:
        result = score_with_ray(
            model,
            input_spec,
            output,
            address=address,
            num_actors=num_actors,
            num_gpus_per_actor=num_gpus_per_actor,
            num_cpus_per_actor=num_cpus_per_actor,
            device=device,
            batch_size=batch_size,
            precision=precision,
            rows_per_batch=rows_per_batch,
            progress=progress,
        )
    except FileNotFoundError as error:
        fail(f"--input {error}")
        return
    except ScaleError as error:
        fail(str(error))
        return
    except (OSError, ValueError) as error:  # CheckpointError is a ValueError
        fail(f"--model {model}: {error}")
        return
    typer.echo(
        f"scored {result.scored_rows:,} rows, rejected {result.rejected_rows:,} of {result.input_rows:,} "
        f"with {result.num_actors} Ray actor(s) in {result.seconds:.0f} s -> {result.scores_dir}"
        + (f" (rejects: {result.rejects_dir})" if result.rejected_rows else "")
    )


@app.command("push")
def push_command(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint folder to upload.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub repo, user/name or org/name.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    commit_message: Annotated[str | None, typer.Option(help="Commit message on the Hub.")] = None,
    token: Annotated[
        str | None, typer.Option(help="Hub token (default: HF_TOKEN or the saved login).")
    ] = None,
) -> None:
    """Upload a checkpoint to the Hugging Face Hub with a generated model card (README.md)."""
    from huggingface_hub.errors import HfHubHTTPError

    from esci_reranker.hub import CARD_NAME, push_to_hub

    try:
        result = push_to_hub(model, repo_id, private=private, commit_message=commit_message, token=token)
    except ValueError as error:  # CheckpointError, bad repo id
        fail(str(error))
    except (HfHubHTTPError, OSError) as error:
        fail(f"upload to {repo_id} failed: {error}")
    card = "generated" if result.card_written else "kept (hand-written)"
    typer.echo(f"{CARD_NAME} {card}; pushed {model} to {result.url}")
    typer.echo(f'load it with: Reranker.from_pretrained("{repo_id}")')


@app.command("export")
def export_command(
    model: Annotated[str, typer.Option("--model", help=MODEL_HELP)],
    output_format: Annotated[str, typer.Option("--format", help=f"One of: {', '.join(EXPORT_FORMATS)}.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the exported model to.")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it exists and is not empty.")
    ] = False,
    quantize: Annotated[
        str | None,
        typer.Option("--quantize", help="onnx only: int8 (dynamic quantisation, smaller and faster on CPU)."),
    ] = None,
    cross_encoder_only: Annotated[
        bool,
        typer.Option(
            "--cross-encoder-only",
            help="onnx only: export a stacked checkpoint's cross-encoder without its stacker (the "
            "trees are not in ONNX; the folder records that it is the first stage only).",
        ),
    ] = False,
) -> None:
    """Export a checkpoint as a standard model (docs/deploy.md, docs/inference.md).

    The stacked default and the cross-encoder with priors have no stock form: distil them first
    (`esci-reranker distill`), then export the student.

    - hf-classifier: transformers AutoModelForSequenceClassification with labels E, S, C, I.
    - st-cross-encoder: a sentence-transformers CrossEncoder giving the Task 1 score.
    - tei: the st-cross-encoder folder as text-embeddings-inference serves it on /rerank.
    - onnx: the whole model as one ONNX graph for ONNX Runtime (fp32, or int8 with --quantize
      int8); Reranker.from_pretrained loads the folder (see docs/speed.md). A stacked checkpoint
      is refused (its trees are not in ONNX) unless --cross-encoder-only asks for its first stage
      alone.
    - merged: an llm-family checkpoint with its LoRA adapter merged into the LM's weights (no base
      model or peft needed to load it; Reranker.from_pretrained loads the folder).

    The llm and listwise families have no other export: distil them into a stock student instead.
    """
    import importlib

    from esci_reranker.reranker import resolve_checkpoint

    target = EXPORT_FORMATS.get(output_format)
    if target is None:
        fail(f"--format {output_format!r}: expected one of {', '.join(EXPORT_FORMATS)}.")
        return
    options: dict[str, object] = {}
    if quantize is not None:
        allowed = QUANTIZE_FORMATS.get(output_format)
        if allowed is None:
            fail(
                f"--quantize {quantize}: only --format {' or '.join(QUANTIZE_FORMATS)} can be quantized, "
                f"not {output_format}; drop --quantize or use --format onnx."
            )
            return
        if quantize not in allowed:
            fail(f"--quantize {quantize!r}: expected one of {', '.join(allowed)}.")
            return
        options["quantize"] = quantize
    if cross_encoder_only:
        if output_format not in CROSS_ENCODER_ONLY_FORMATS:
            fail(
                f"--cross-encoder-only: only --format {' or '.join(CROSS_ENCODER_ONLY_FORMATS)} can "
                f"export a stacked checkpoint's first stage, not {output_format}; drop the flag."
            )
            return
        options["cross_encoder_only"] = True
    try:
        folder = resolve_checkpoint(model)
        module_name, function_name = target.split(":")
        exporter = getattr(importlib.import_module(module_name), function_name)
        written = exporter(folder, out, overwrite=overwrite, **options)
    except ImportError as error:
        fail(f"--format {output_format}: a dependency is missing ({error}).")
    except (OSError, ValueError) as error:  # CheckpointError and ExportError are ValueErrors
        fail(str(error))
    typer.echo(f"exported {model} as {output_format}{f' ({quantize})' if quantize else ''} to {written}")
