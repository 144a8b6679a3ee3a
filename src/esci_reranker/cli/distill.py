"""Distillation commands: ``distill`` (a stock student from a teacher) and ``distill-cv``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from esci_reranker.cli.app import app
from esci_reranker.cli.common import MODEL_HELP, SetOption, fail, parse_seeds

if TYPE_CHECKING:
    from esci_reranker.distill.config import DistillConfig

ConfigOption = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        help="YAML distillation config: configs/distill_score.yaml or configs/distill_esci.yaml.",
    ),
]
DataOption = Annotated[
    Path | None,
    typer.Option("--data", help="Prepared folder (train/val/test.parquet); default: the config's data.dir."),
]


CatalogueOption = Annotated[
    Path,
    typer.Option(
        "--catalogue",
        help="Catalogue index of the train+val products that data.retrieved_share retrieves from: "
        "reused when it exists (`make run` leaves it there), else built there without any product "
        "judged for a test query.",
    ),
]


def _config(config: Path, overrides: list[str] | None, data: Path | None):  # -> DistillConfig
    from esci_reranker.distill import load_distill_config

    extra = [f"data.dir={data}"] if data is not None else []
    return load_distill_config(config, [*(overrides or []), *extra])


def _retrieved(cfg: DistillConfig, catalogue: Path) -> dict[object, list[str]] | None:
    """query id -> product ids retrieved for each distillation query from the train+val catalogue,
    when ``data.retrieved_share`` asks for them (else None).

    ``distill`` sits beside ``retrieval`` and does not import it, so the lists are made here and
    handed to it as plain data; the sampling takes only products of the distillation pool from them.
    """
    if cfg.data.retrieved_share <= 0 or cfg.data.unlabelled_per_query <= 0:
        return None
    from esci_reranker.distill.data import distillation_queries
    from esci_reranker.retrieval.flow import DEFAULT_RETRIEVE, catalogue_lists

    wanted = round(cfg.data.unlabelled_per_query * cfg.data.retrieved_share)
    rule = cfg.data.retrieved_rule
    # a query's judged products and products outside the pool are skipped in its list: retrieving
    # the flow's 100 beyond the share leaves room for them; about half of a query's top 100 is
    # foreign to it, so the foreign rule retrieves twice that
    n = wanted + (2 if rule == "foreign" else 1) * DEFAULT_RETRIEVE
    queries = distillation_queries(cfg.data.dir)
    typer.echo(f"retrieved products ({rule}): the top {n} of {catalogue} for {len(queries)} queries")
    try:
        return catalogue_lists(cfg.data.dir, queries, n, catalogue, log=typer.echo, rule=rule)
    except ImportError as err:
        raise ValueError(f"data.retrieved_share={cfg.data.retrieved_share}: {err}") from None


def _validation_flow(teacher: str, student: Path, cfg: DistillConfig, catalogue: Path, out: Path) -> None:
    """The distillation's validation queries through the search flow of the train+val catalogue,
    labelled by the teacher and by the student: how far the student's labels follow its
    teacher's where a user sees them (judged lists alone do not show it). Logged, and written
    into ``distill.json`` (both copies) as ``validation_flow``.

    The teacher trained on these queries and the student did not, so the teacher's own judged
    figures here are optimistic; the foreign products (judged only for unrelated queries) are
    where the comparison holds. Skipped when there is no catalogue at ``catalogue``.
    """
    import pandas as pd

    from esci_reranker.distill.run import MODEL_DIR, PAIRS_NAME, SUMMARY_NAME
    from esci_reranker.fsutil import read_json, write_json
    from esci_reranker.reranker import Reranker
    from esci_reranker.retrieval.flow import DEFAULT_RETRIEVE, compare_in_flow, train_val_catalogue

    if not (catalogue / "manifest.json").is_file():  # a report only: no catalogue is built for it
        typer.echo(
            f"validation search flow skipped: no catalogue at {catalogue} (`make run` leaves one there)"
        )
        return
    pairs = pd.read_parquet(out / PAIRS_NAME, columns=["query_id", "split"])
    val_ids = set(pairs.loc[pairs["split"] == "val", "query_id"])
    try:
        frame, index = train_val_catalogue(cfg.data.dir, catalogue, log=typer.echo)
    except ImportError as err:
        typer.echo(f"validation search flow skipped: {err}")
        return
    val = frame[frame["query_id"].isin(val_ids)]
    models = {"teacher": Reranker.from_pretrained(teacher), "student": Reranker.from_pretrained(student)}
    result = compare_in_flow(models, index, val, frame)
    result |= {"queries": len(val_ids), "retrieve": DEFAULT_RETRIEVE, "catalogue": str(catalogue)}
    for path in (out / SUMMARY_NAME, out / MODEL_DIR / SUMMARY_NAME):
        if path.is_file():
            write_json(path, read_json(path) | {"validation_flow": result}, nan_as_null=True)
    t, s = result["models"]["teacher"], result["models"]["student"]
    agree = result["agreement"]["student"]
    typer.echo(
        f"search flow of the {len(val_ids)} validation queries (top {DEFAULT_RETRIEVE} of {catalogue}; "
        f"teacher / student): foreign products labelled E {t['foreign']['share_E']:.2f} / "
        f"{s['foreign']['share_E']:.2f}, I {t['foreign']['share_I']:.2f} / {s['foreign']['share_I']:.2f}; "
        f"judged-irrelevant labelled I {t['judged_I_recall']:.2f} / {s['judged_I_recall']:.2f} (the teacher "
        f"trained on these queries); the student gives the teacher's class to {agree['foreign']:.0%} of the "
        f"foreign results and {agree['judged']:.0%} of the judged ones"
    )


@app.command("distill")
def distill_command(
    teacher: Annotated[str, typer.Option("--teacher", help=f"The teacher. {MODEL_HELP}")],
    config: ConfigOption,
    out: Annotated[Path, typer.Option("--out", help="Output folder; the student goes to OUT/model.")],
    data: DataOption = None,
    overrides: SetOption = None,
    catalogue: CatalogueOption = Path("runs/default/train/folds/catalogue"),
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    flow: Annotated[
        bool,
        typer.Option(
            "--flow/--no-flow",
            help="student-esci: run the validation queries through the search flow of the --catalogue "
            "and compare the student's labels with the teacher's there (distill.json's validation_flow).",
        ),
    ] = True,
) -> None:
    """Distil a teacher (any checkpoint, e.g. the stacked default) into a stock student.

    The student is a plain transformers BertForSequenceClassification saved in OUT/model:
    student-score (configs/distill_score.yaml, 1 logit: the teacher's Task 1 score) or
    student-esci (configs/distill_esci.yaml, 4 logits E/S/C/I: the teacher's classes after its
    decision rules). transformers, sentence-transformers and text-embeddings-inference load it
    as is; Reranker.from_pretrained, evaluate, bench and serve load it as one of our models;
    `export --model OUT/model --format ...` writes each library's format (docs/deploy.md).
    Trains on the train+val pairs plus unlabelled pairs made from them, never on the test split;
    with data.retrieved_share, part of the unlabelled pairs are products retrieved for the query
    from the --catalogue of train+val products.
    """
    from esci_reranker.distill import distill
    from esci_reranker.train import ConfigError

    try:
        cfg = _config(config, overrides, data)
        retrieved = _retrieved(cfg, catalogue)
        result = distill(teacher, cfg, out, progress=progress, log=typer.echo, retrieved=retrieved)
        if flow and cfg.student == "esci":
            _validation_flow(teacher, result.model_dir, cfg, catalogue, out)
    except (ConfigError, FileNotFoundError, ValueError) as err:  # CheckpointError, TestLeakError too
        fail(str(err))
        return
    best = result.summary.get("best_val", {})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if k.startswith("val_"))
    typer.echo(
        f"student-{cfg.student}: {result.model_dir} (best step {result.summary['best_step']}: {shown})"
    )
    typer.echo(
        f"details: {out / 'distill.json'}; evaluate it with `esci-reranker evaluate --model {result.model_dir}`"
    )


@app.command("distill-cv")
def distill_cv_command(
    teacher: Annotated[
        Path,
        typer.Option("--teacher", help="The teacher checkpoint (a stacked one: its stacker's settings)."),
    ],
    config: ConfigOption,
    oof: Annotated[
        Path,
        typer.Option("--oof", help="The teacher's out-of-fold cross-encoder outputs (esci-reranker cv)."),
    ] = Path("runs/default/train/folds/oof.parquet"),
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (distill_cv.json, teacher_oof.parquet).")
    ] = Path("runs/distill_cv"),
    data: DataOption = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated student training seeds.")] = "0",
    oof_seed: Annotated[int, typer.Option("--oof-seed", help="Which seed of --oof the teacher uses.")] = 0,
    baselines: Annotated[
        str, typer.Option(help="Baselines ranked on every fold: comma-separated bm25,bi-encoder or none.")
    ] = "bm25,bi-encoder",
    overrides: SetOption = None,
    catalogue: CatalogueOption = Path("runs/default/train/folds/catalogue"),
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Keep the (fold, seed) runs an earlier run of this command finished in --out (same config, "
            "teacher outputs and baselines) and train only the others.",
        ),
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = False,
) -> None:
    """Cross-validate a student against its teacher over the teacher's query folds.

    For each fold and seed, a student learns the teacher's out-of-fold outputs on the other
    folds' pairs and is scored on the fold, beside the teacher's own out-of-fold outputs there
    (Task 1 nDCG, Task 2 micro/macro F1, Task 3, per query type). As in `distill`, each fold's
    student also learns from unlabelled pairs made from the other folds' queries and products
    (`data.unlabelled_per_query`; 0 = labelled pairs only), scored by that fold's teacher: the
    cross-encoder cv saved beside --oof (it never saw the fold) and the fold's stacker; the
    scores are cached in --out. The test split is never read beyond keeping its products and
    queries out of training. See distill/cv.py for what this measures and what it does not.
    """
    import pandas as pd

    from esci_reranker.distill import DISTILL_CV_MODELS, cross_validate_student
    from esci_reranker.distill.cv import (
        cv_identity,
        finished_entries,
        fold_unlabelled_outputs,
        teacher_oof_and_stackers,
    )
    from esci_reranker.distill.data import read_labelled_and_test
    from esci_reranker.eval.baselines import parse_baselines, run_baseline
    from esci_reranker.fsutil import write_json
    from esci_reranker.model.config import ModelConfig
    from esci_reranker.stack.cv import cv_summary, cv_tables
    from esci_reranker.stack.stacker import MANIFEST_NAME, STACKER_DIR, Stacker
    from esci_reranker.train import ConfigError
    from esci_reranker.train.cv import fold_model_dir

    seed_list = parse_seeds("--seeds", seeds)
    try:
        cfg = _config(config, overrides, data)
        chosen = parse_baselines(baselines)
        teacher_config = ModelConfig.load(teacher)
        stacker = (
            Stacker.load(teacher / STACKER_DIR) if (teacher / STACKER_DIR / MANIFEST_NAME).is_file() else None
        )
        if not oof.is_file():
            raise FileNotFoundError(
                f"--oof {oof}: no such file; `esci-reranker cv --out DIR` writes DIR/oof.parquet."
            )
        frame, test = read_labelled_and_test(cfg.data.dir)
        typer.echo(
            f"teacher out-of-fold outputs ({'stacked' if stacker else 'cross-encoder'}, oof seed {oof_seed})"
        )
        table, fold_stackers = teacher_oof_and_stackers(frame, pd.read_parquet(oof), stacker, seed=oof_seed)
        identity = cv_identity(cfg, table, chosen)
        result_path = out / "distill_cv.json"
        done = finished_entries(result_path, identity, seed_list) if resume else {}
        out.mkdir(parents=True, exist_ok=True)
        table.to_parquet(out / "teacher_oof.parquet", index=False)

        def save(entries: list[dict]) -> None:
            # After every (fold, seed): an interrupted run loses at most the student in training.
            write_json(
                result_path,
                {
                    "summary": cv_summary(entries, models=DISTILL_CV_MODELS),
                    "entries": entries,
                    "config": cfg.model_dump(mode="json"),
                    "identity": identity,
                },
                nan_as_null=True,
            )

        runs = {
            name: run_baseline(name, frame, text_fields=teacher_config.text_fields).run for name in chosen
        }
        # the cross-encoders behind each fold's out-of-fold outputs, saved by cv beside oof.parquet
        fold_encoders = {
            int(f): fold_model_dir(oof.parent, int(f), oof_seed) for f in sorted(table["fold"].unique())
        }
        needs = [
            why
            for why, needed in (
                ("model.init=teacher starts each fold's student from it", cfg.model.init == "teacher"),
                (
                    "data.unlabelled_per_query > 0 scores each fold's unlabelled pairs with it",
                    cfg.data.unlabelled_per_query > 0,
                ),
            )
            if needed
        ]
        if needs:
            missing = [str(path) for path in fold_encoders.values() if not (path / "config.json").is_file()]
            if missing:
                raise FileNotFoundError(
                    f"each fold's cross-encoder, which cv saves beside --oof {oof}, is needed "
                    f"({'; '.join(needs)}); missing: {', '.join(missing[:2])}"
                )
        unlabelled = (
            fold_unlabelled_outputs(
                table,
                frame,
                cfg,
                fold_encoders,
                fold_stackers,
                out,
                teacher_key=identity["teacher_oof_sha256"],
                test=test,
                progress=progress,
                log=typer.echo,
                retrieved=_retrieved(cfg, catalogue),
            )
            if cfg.data.unlabelled_per_query > 0
            else None
        )
        entries = cross_validate_student(
            table,
            frame,
            cfg,
            seeds=seed_list,
            test=test,
            baseline_runs=runs,
            text_fields=teacher_config.text_fields,
            long_field_chars=teacher_config.long_field_chars,
            progress=progress,
            log=typer.echo,
            done=done,
            on_entry=save,
            fold_encoders=fold_encoders,
            unlabelled=unlabelled,
        )
    except (ConfigError, FileNotFoundError, ValueError) as err:
        fail(str(err))
        return
    save(entries)
    typer.echo(cv_tables(cv_summary(entries, models=DISTILL_CV_MODELS)))
    typer.echo(f"details: {result_path}")
