"""TREC run and qrels files from a run frame, so ``trec_eval`` / ``pytrec_eval`` can re-score it.

``trec_eval`` needs integer relevance levels. Graded qrels hold ``round(100 * gain)``
(``esci``: E=100, S=10, C=1, I=0; ``official-script``: E=100, S=1, C=10, I=0); nDCG does not
change when every gain is multiplied by the same number. Binary qrels hold 1 for the labels in
``relevant`` and 0 otherwise, for ``recip_rank``, ``map``, ``recall`` and ``P``::

    trec_eval -m ndcg -m ndcg_cut.10 qrels.graded.txt run.txt
    trec_eval -m recip_rank -m map -m recall.10 -m P.10 qrels.binary.txt run.txt

From the shell: ``python -m esci_reranker.eval.trec predictions.parquet OUT_DIR [--gains esci]
[--relevant E]`` writes the three files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd

from esci_reranker.eval.ranking import DEFAULT_RELEVANT, parse_relevant, rank_order
from esci_reranker.labels import ESCI_LABELS, check_labels, gain_table

#: Graded qrels hold ``round(GAIN_SCALE * gain)``.
GAIN_SCALE: Final[int] = 100


def _check(run: pd.DataFrame, columns: Iterable[str], where: str) -> None:
    missing = [c for c in columns if c not in run.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; has {list(run.columns)}.")
    for column in ("query_id", "product_id"):
        if run[column].astype(str).str.contains(r"\s", regex=True).any():
            raise ValueError(f"{where}: a {column} contains whitespace; TREC files cannot hold it.")


def trec_qrels(
    run: pd.DataFrame, gains: str = "esci", relevant: Iterable[str] | None = None
) -> dict[str, dict[str, int]]:
    """``{query_id: {product_id: level}}`` as ``pytrec_eval`` takes it.

    ``relevant=None`` gives graded levels ``round(100 * gain)`` from the ``gains`` table; a label
    list gives binary levels (1 if the label is in it, else 0).
    """
    _check(run, ("query_id", "product_id", "esci_label"), "trec qrels")
    labels = run["esci_label"].astype(str).to_numpy()
    check_labels(labels, "trec qrels")
    if relevant is None:
        table = gain_table(gains)
        levels = {label: round(GAIN_SCALE * g) for label, g in table.items()}
        if any(abs(GAIN_SCALE * g - levels[label]) > 1e-9 for label, g in table.items()):
            raise ValueError(f"trec qrels: gains {dict(table)} x {GAIN_SCALE} are not integers.")
    else:
        chosen = set(parse_relevant(relevant))
        levels = {label: int(label in chosen) for label in ESCI_LABELS}
    out: dict[str, dict[str, int]] = {}
    for qid, pid, label in zip(
        run["query_id"].astype(str), run["product_id"].astype(str), labels, strict=True
    ):
        out.setdefault(qid, {})[pid] = levels[label]
    return out


def trec_run(run: pd.DataFrame, score_column: str = "score") -> dict[str, dict[str, float]]:
    """``{query_id: {product_id: score}}`` as ``pytrec_eval`` takes it (scores as float64)."""
    _check(run, ("query_id", "product_id", score_column), "trec run")
    out: dict[str, dict[str, float]] = {}
    scores = run[score_column].to_numpy(dtype=np.float64)
    for qid, pid, score in zip(
        run["query_id"].astype(str), run["product_id"].astype(str), scores, strict=True
    ):
        out.setdefault(qid, {})[pid] = float(score)
    return out


def write_trec_run(
    run: pd.DataFrame, path: str | Path, score_column: str = "score", tag: str = "esci-reranker"
) -> Path:
    """Write ``qid Q0 docno rank score tag`` lines, ranked as trec_eval ranks them.

    Scores are written with 17 significant digits so they read back as the same float64.
    """
    path = Path(path)
    lines = []
    for qid, docs in trec_run(run, score_column).items():
        ids = list(docs)
        scores = np.array([docs[d] for d in ids], dtype=np.float64)
        for rank, i in enumerate(rank_order(scores, ids), start=1):
            lines.append(f"{qid} Q0 {ids[i]} {rank} {scores[i]:.17g} {tag}\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


def write_trec_qrels(
    run: pd.DataFrame, path: str | Path, gains: str = "esci", relevant: Iterable[str] | None = None
) -> Path:
    """Write ``qid 0 docno level`` lines (graded when ``relevant`` is None, else binary; see ``trec_qrels``)."""
    path = Path(path)
    lines = [
        f"{qid} 0 {pid} {level}\n"
        for qid, docs in trec_qrels(run, gains, relevant).items()
        for pid, level in docs.items()
    ]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def write_trec_files(
    run: pd.DataFrame,
    folder: str | Path,
    gains: str = "esci",
    relevant: Iterable[str] = DEFAULT_RELEVANT,
    score_column: str = "score",
) -> dict[str, Path]:
    """Write ``run.txt``, ``qrels.graded.txt`` and ``qrels.binary.txt`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "run": write_trec_run(run, folder / "run.txt", score_column),
        "qrels_graded": write_trec_qrels(run, folder / "qrels.graded.txt", gains),
        "qrels_binary": write_trec_qrels(run, folder / "qrels.binary.txt", gains, relevant),
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m esci_reranker.eval.trec predictions.parquet OUT_DIR [--gains G] [--relevant E,S]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m esci_reranker.eval.trec",
        description="Write run.txt, qrels.graded.txt and qrels.binary.txt from predictions.parquet.",
    )
    parser.add_argument("predictions", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--gains", default="esci", help="esci or official-script (default esci)")
    parser.add_argument("--relevant", default="E", help="labels for the binary qrels (default E)")
    parser.add_argument("--score-column", default="score", help="score or expected_gain")
    args = parser.parse_args(argv)
    files = write_trec_files(
        pd.read_parquet(args.predictions), args.out, args.gains, args.relevant, args.score_column
    )
    for path in files.values():
        print(path)


if __name__ == "__main__":
    main()
