"""``esci-reranker distill``: teacher outputs -> a stock student, end to end.

1. the distillation pairs of the prepared folder (``distill.data``: train+val pairs and
   unlabelled pairs made from them; the test split is kept out and that is checked);
2. the teacher's outputs on them, grouped per candidate list and cached (``distill.teacher``);
3. the student trained on them, early-stopped on held-out distillation queries
   (``distill.student``);
4. the student saved as a stock transformers classifier in ``OUT/model`` (``model.stock``), with
   ``distill.json`` beside it; it is loaded back with ``Reranker.from_pretrained`` and checked
   against the trained model before the command returns.

Output folder::

    OUT/model/                   the student (config.json, model.safetensors, tokenizer, distill.json)
    OUT/teacher_outputs.parquet  the teacher's outputs per pair (the cache) + teacher_outputs.json
    OUT/pairs.parquet            the distillation pairs (ids, query, source, label) and their split
    OUT/log.jsonl                training and validation records
    OUT/distill.json             the summary (also in the model folder)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from esci_reranker.distill.config import DistillConfig
from esci_reranker.distill.data import PAIR_KEY, RetrievedLists, distillation_pairs, validation_queries
from esci_reranker.distill.student import STUDENT_FAMILIES, train_student
from esci_reranker.distill.teacher import teacher_outputs

MODEL_DIR: Final[str] = "model"
SUMMARY_NAME: Final[str] = "distill.json"
LOG_NAME: Final[str] = "log.jsonl"
PAIRS_NAME: Final[str] = "pairs.parquet"
#: Largest |difference| allowed between the trained student and the saved one loaded back.
RELOAD_TOLERANCE: Final[float] = 1e-4


@dataclass(frozen=True)
class DistillResult:
    """Where the student is and what the run measured (``summary`` is ``distill.json``)."""

    model_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


def distill(
    teacher: str | Path,
    cfg: DistillConfig,
    out_dir: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
    retrieved: RetrievedLists | None = None,
) -> DistillResult:
    """Distil ``teacher`` into the student ``cfg`` describes; see the module docstring.

    ``retrieved``: query id -> product ids retrieved for it from the train+val catalogue, in
    retrieval order; needed when ``cfg.data.retrieved_share`` is above 0 (``distill.data``).

    Raises:
        CheckpointError: the teacher does not load.
        FileNotFoundError: a split of ``cfg.data.dir`` is missing.
        TestLeakError: the distillation set would hold test data.
        ValueError: an esci student from a teacher without class outputs, and bad settings.
    """
    from esci_reranker.fsutil import write_json
    from esci_reranker.model.stock import save_stock
    from esci_reranker.reranker import resolve_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs = distillation_pairs(cfg.data.dir, cfg.data, retrieved)
    counts = pairs.counts()
    log(
        f"distillation pairs: {counts['labelled_pairs']} labelled + {counts['unlabelled_pairs']} unlabelled "
        f"+ {counts['synthetic_pairs']} synthetic "
        f"({', '.join(f'{v} {k}' for k, v in pairs.draws.items())}) over {counts['queries']} queries "
        f"and {counts['synthetic_queries']} synthetic ones "
        f"(left out for the test split: {pairs.excluded})"
    )
    outputs = teacher_outputs(teacher, pairs.frame, cfg.teacher, out, progress=progress, log=log)
    frame = pairs.frame.merge(outputs.frame, on=list(PAIR_KEY), how="left", validate="one_to_one")
    # The validation queries are drawn from the finished set, so they get the same unlabelled pairs
    # as the training queries, retrieved ones included: early stopping then watches the loss on the
    # mixture the student learns, retrieved products among it (leaving them out would hide the very
    # pairs the share is there for). Nothing leaks: their lists come from the same train+val
    # catalogue, and the class offsets are fitted on the labelled validation pairs only.
    val_ids = validation_queries(frame, cfg.data.val_share, cfg.data.seed)
    is_val = frame["query_id"].isin(val_ids).to_numpy()
    frame.assign(split=np.where(is_val, "val", "train"))[
        [*PAIR_KEY, "query", "source", "esci_label", "split"]
    ].to_parquet(out / PAIRS_NAME, index=False)

    log_path = out / LOG_NAME
    log_path.unlink(missing_ok=True)

    def record(rec: dict[str, Any]) -> None:
        with open(log_path, "a") as fh:
            fh.write(json.dumps(rec, default=float) + "\n")
        if rec.get("type") == "val":
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k.startswith("val_"))
            log(f"      step {rec['step']}: {metrics}")

    info = outputs.info
    text_fields = tuple(info.get("text_fields") or ())
    long_chars = int(info.get("long_field_chars") or 500)
    if not text_fields:  # a cache from a teacher whose info lacks them: read the teacher's config
        from esci_reranker.model.config import ModelConfig

        teacher_config = ModelConfig.load(resolve_checkpoint(teacher))
        text_fields, long_chars = teacher_config.text_fields, teacher_config.long_field_chars
    log(
        f"student-{cfg.student}: {int((~is_val).sum())} training pairs, {int(is_val.sum())} validation "
        f"pairs ({len(val_ids)} queries)"
    )
    result = train_student(
        cfg,
        frame[~is_val],
        frame[is_val],
        text_fields=text_fields,
        long_field_chars=long_chars,
        progress=progress,
        record=record,
        teacher_encoder=resolve_checkpoint(teacher) if cfg.model.init == "teacher" else None,
    )
    summary: dict[str, Any] = {
        "student": f"student-{cfg.student}",
        "model_type": STUDENT_FAMILIES[cfg.student],
        "teacher": info,
        "teacher_outputs_cached": outputs.cached,
        "pairs": counts,
        "excluded_for_test": pairs.excluded,
        "unlabelled_draws": pairs.draws,
        "validation_queries": len(val_ids),
        "best_step": result.best_step,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "best_val_loss": result.best_val_loss,
        "best_val": next((h for h in result.history if h["step"] == result.best_step), {}),
        "standardisation": result.standardisation,
        "substitute_threshold": result.model.config.substitute_threshold,
        "decision_rules": result.decision_rules,
        "training_seconds": result.seconds,
        "config": cfg.model_dump(mode="json"),
    }
    model_dir = save_stock(
        result.model,
        result.tokenizer,
        out / MODEL_DIR,
        extra_files={SUMMARY_NAME: json.dumps(summary, indent=2, default=float) + "\n"},
    )
    write_json(out / SUMMARY_NAME, summary)
    check_reload(result.model, result.tokenizer, model_dir, frame[is_val].head(16))
    log(
        f"student saved to {model_dir} (stock {result.model.config.model_type}; best step {result.best_step})"
    )
    return DistillResult(model_dir, summary)


def check_reload(model: Any, tokenizer: Any, model_dir: Path, pairs: pd.DataFrame) -> float:
    """Load ``model_dir`` with ``Reranker.from_pretrained`` and compare its scores with ``model``'s.

    Raises:
        RuntimeError: they differ by more than ``RELOAD_TOLERANCE`` (the saved folder is not the
            trained model).
    """
    from esci_reranker.distill.student import student_reranker
    from esci_reranker.reranker import Reranker
    from esci_reranker.train.texts import frame_texts

    if pairs.empty:
        return 0.0
    queries = pairs["query"].astype(str).tolist()
    texts = frame_texts(pairs, model.config)
    ours = student_reranker(model.eval(), tokenizer).predict_texts(queries, texts)
    loaded = Reranker.from_pretrained(model_dir, device="cpu").predict_texts(queries, texts)
    diff = float(np.max(np.abs(np.asarray(ours.scores) - np.asarray(loaded.scores))))
    if not diff <= RELOAD_TOLERANCE:
        raise RuntimeError(
            f"distill: the saved student {model_dir} scores {diff:.2e} away from the trained one "
            f"(> {RELOAD_TOLERANCE:g}); please report this."
        )
    return diff
