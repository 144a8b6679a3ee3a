"""Helpers shared by the command modules: clean failures, model loading, tables, option help."""

from __future__ import annotations

from typing import Annotated

import typer

DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (cuda > mps > cpu)."
MODEL_HELP = "Checkpoint folder, or a Hugging Face Hub repo id (user/name) to download."
PRECISION_HELP = (
    "Torch arithmetic: fp32; bf16 (autocast); int8 (dynamic int8 linear layers, CPU only, the "
    "fastest on CPUs with AVX-512 VNNI; scores shift slightly); auto = bf16 where native, else fp32."
)

# `train`, `cv` and `pipeline` all take the same starting weights.
BaseModelOption = Annotated[
    str | None,
    typer.Option(
        "--base-model",
        help="Pretrained weights to start from (sets model.backbone): for model.type llm a causal "
        "LM folder, Hub id (e.g. Qwen/Qwen3-0.6B) or packaged:SmolLM2-135M-Instruct.",
    ),
]


# Every command that reads a YAML config (training, retriever, distillation, training benchmark)
# takes its overrides the same way; `optim.epochs` is a key of all three config kinds.
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value, e.g. --set optim.epochs=2 (repeatable)."),
]


def fail(message: str) -> None:
    """Print ``message`` as an error and exit with status 2 (bad input), without a traceback."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def require_positive(**options: int | None) -> None:
    """Fail on the first option (given as ``batch_size=...``, named ``--batch-size``) whose value
    is below 1; ``None`` means unset and passes. Checked before any slow work."""
    for name, value in options.items():
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} {value}: expected a positive integer.")


def parse_int_list(option: str, value: str, minimum: int = 0, distinct: bool = False) -> tuple[int, ...]:
    """``value`` ("0,1,2") as integers >= ``minimum``, in order (all different when ``distinct``);
    a clean error naming ``option`` otherwise (an empty list, a word, a value below ``minimum``)."""
    try:
        numbers = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        numbers = ()
    if not numbers or min(numbers) < minimum or (distinct and len(set(numbers)) != len(numbers)):
        what = f"{'distinct ' if distinct else ''}integers >= {minimum}"
        example = ",".join(str(minimum + i) for i in range(3))
        fail(f"{option} {value!r}: expected {what} separated by commas, e.g. {example}.")
    return numbers


def parse_seeds(option: str, value: str) -> tuple[int, ...]:
    """``value`` ("0,1,2") as distinct non-negative integers: a repeated seed would train the same
    run twice."""
    return parse_int_list(option, value, minimum=0, distinct=True)


def load_reranker(
    model: str, device: str, batch_size: int = 64, precision: str = "fp32"
):  # -> Reranker (imported lazily)
    """`Reranker.from_pretrained`, turning a bad folder / repo id / device / precision into a clean error."""
    from esci_reranker.hardware import resolve_precision
    from esci_reranker.reranker import Reranker, select_device

    require_positive(batch_size=batch_size)
    try:
        target = select_device(device)
    except (RuntimeError, ValueError) as error:
        fail(f"--device {device}: {error}")
    try:
        resolved = resolve_precision(precision, target)
    except ValueError as error:
        fail(f"--precision: {error}")
    try:
        return Reranker.from_pretrained(model, device=device, batch_size=batch_size, precision=resolved)
    except (OSError, ValueError) as error:  # CheckpointError is a ValueError
        fail(f"--model {model}: {error}")
        raise  # unreachable: fail() exits


def shorten(text: object, width: int = 60) -> str:
    """``text`` as a string of at most ``width`` characters, cut with an ellipsis."""
    text = "" if text is None else str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """Print a rich table on one line per row; the last column (a text) is cut to the width left."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns[:-1])]
    room = min(70, max(12, console.width - sum(widths) - 3 * len(columns) - 1))
    table = Table(title=escape(title), title_justify="left")
    for name in columns[:-1]:
        table.add_column(
            name, justify="right" if name in ("rank", "score", "P(sub)") else "left", no_wrap=True
        )
    table.add_column(columns[-1], no_wrap=True)
    for row in rows:
        # Product titles contain brackets ("[Pack of 2]") that rich would take for markup.
        table.add_row(*(escape(cell) for cell in row[:-1]), escape(shorten(row[-1], room)))
    console.print(table)


def fmt_prob(value: float | None) -> str:
    """A probability with three decimals, or ``-`` when there is none (None or NaN)."""
    return "-" if value is None or value != value else f"{value:.3f}"
