"""Data commands: ``prepare``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from esci_reranker.cli.app import app
from esci_reranker.cli.common import fail


@app.command("prepare")
def prepare_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for train/val/test.parquet and stats.json.")],
    examples: Annotated[
        Path | None,
        typer.Option(help="Amazon's shopping_queries_dataset_examples.parquet (with --products)."),
    ] = None,
    products: Annotated[
        Path | None,
        typer.Option(help="Amazon's shopping_queries_dataset_products.parquet (with --examples)."),
    ] = None,
    joined: Annotated[
        Path | None,
        typer.Option(help="One file with example and product_* columns (the sample's shape)."),
    ] = None,
    sample: Annotated[
        bool,
        typer.Option("--sample", help="Use the bundled real sample (the default with no input)."),
    ] = False,
    locale: Annotated[str, typer.Option(help="us, es, jp, or all.")] = "us",
    small_version: Annotated[
        bool, typer.Option("--small-version", help="Keep only rows with small_version == 1.")
    ] = False,
    text_fields: Annotated[
        str,
        typer.Option(help="Fields of product_text, in order: title,brand,color,description,bullets."),
    ] = "title,brand,color",
    long_field_chars: Annotated[
        int, typer.Option(help="Character cap of description and bullets in product_text.")
    ] = 500,
    val_frac: Annotated[
        float, typer.Option(help="Share of ESCI train queries moved to val (train/test input).")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the val query draw.")] = 0,
) -> None:
    """Join, clean and split ESCI data by query into train/val/test parquet files plus stats.json."""
    from esci_reranker.data import DataError, PrepareOptions, prepare, sample_path, write_splits

    if sample and (joined or examples or products):
        fail("--sample cannot be combined with --joined, --examples or --products.")
    if not (joined or examples or products):
        joined = sample_path()
    try:
        options = PrepareOptions(
            locale=locale,
            small_version=small_version,
            text_fields=tuple(text_fields.split(",")),
            long_field_chars=long_field_chars,
            val_frac=val_frac,
            seed=seed,
        )
        result = prepare(examples, products, joined=joined, options=options, progress=None)
        paths = write_splits(result, out, progress=None)
    except DataError as error:
        fail(str(error))
        return
    for name, split in result.stats["splits"].items():
        labels = " ".join(f"{label}={n}" for label, n in split["labels"].items())
        typer.echo(f"{name:5s} {split['queries']:>7,} queries {split['rows']:>10,} rows  {labels}")
    dropped = ", ".join(f"{reason}={n:,}" for reason, n in result.stats["dropped"].items())
    typer.echo(f"dropped: {dropped}")
    typer.echo(f"wrote {', '.join(p.name for p in paths.values())} to {out}")
