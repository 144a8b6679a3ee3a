"""Serving command: ``serve`` (FastAPI + uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from esci_reranker.cli.app import app
from esci_reranker.cli.common import fail


@app.command("serve")
def serve_command(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Checkpoint folder or Hugging Face Hub repo id. Default: $MODEL_PATH, then "
            "$HF_MODEL_REPO_ID, then runs/default/model (what `make run` trains).",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 in a container).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Worker processes; each loads its own copy of the model.")
    ] = 1,
) -> None:
    """Serve the reranker over HTTP (FastAPI + uvicorn): /rerank, /classify, /substitute, /predict, /v1/rerank, /v2/rerank, /health, /ready, /metrics, /info; docs at /docs.

    Other settings come from environment variables (API_KEY, RATE_LIMIT, CACHE_SIZE, MAX_CANDIDATES, MEMORY_LIMIT_MB, LOG_FORMAT, ...): see docs/serving.md.
    """
    import logging
    import os

    try:
        import uvicorn

        from esci_reranker.serve.logs import configure_logging, logging_config
        from esci_reranker.serve.settings import SettingsError, load_settings, looks_like_hub_repo_id
    except ImportError as error:
        fail(f"serve needs the 'serve' extra ({error}); install it with: pip install 'esci-reranker[serve]'")
        return
    try:
        settings = load_settings(**({"model_path": model} if model else {}))
    except SettingsError as error:
        fail(str(error))
        return
    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("esci_reranker.serve")
    source, origin = settings.model_source()
    if origin == "default":
        log.info(
            "no --model, MODEL_PATH or HF_MODEL_REPO_ID given: serving %s, the checkpoint `make run` trains",
            source,
        )
        if not Path(source).is_dir():
            fail(f"no model at {source}: run `make run` first or pass --model DIR (or set MODEL_PATH).")
    elif not Path(source).expanduser().exists() and not looks_like_hub_repo_id(source):
        fail(
            f"--model/{origin} {source!r}: no such folder, and not a Hugging Face Hub repo id ('user/name'). "
            "Pass a checkpoint folder (e.g. runs/default/model) or a Hub repo id."
        )
    log.info("serving %s on http://%s:%d with %d worker(s); docs at /docs", source, host, port, workers)
    uvicorn_options = {
        "host": host,
        "port": port,
        "log_config": logging_config(settings.log_level, settings.log_format),
        "access_log": False,  # the service writes its own access line (with request id)
    }
    if workers == 1:
        from esci_reranker.serve.app import create_app

        uvicorn.run(create_app(settings), **uvicorn_options)  # type: ignore[arg-type]
    else:
        # Workers are separate processes: each builds its app from the environment.
        os.environ["MODEL_PATH"] = source
        uvicorn.run(
            "esci_reranker.serve.app:create_app_from_env",
            factory=True,
            workers=workers,
            **uvicorn_options,  # type: ignore[arg-type]
        )
