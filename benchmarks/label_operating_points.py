"""What the E label can reach on out-of-fold predictions: its precision against micro-F1 as the
bar for calling a product E moves (an analysis, not a test).

Reads a stacked CV's ``stack_oof.parquet`` (the stacker's held-out probabilities, written by
``esci-reranker cv`` and ``pipeline``) and the fold rules in ``stack_cv.json`` beside it. For
each margin ``m`` the E log-probability is lowered by ``m`` on top of each fold's own class
offsets (``m = 0`` is the shipped rule), and the judged rows are labelled again. Per margin,
over every held-out row of every seed: E precision and recall, Task 2 micro- and macro-F1,
the judged-I recall and the always-E rate. The margins are read off the held-out labels, so the
best row is a ceiling for any rule of this form, not a rule to ship.

    python benchmarks/label_operating_points.py --cv runs/screen/mw2.0 --out runs/bench/label_operating_points.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from esci_reranker.fsutil import write_json
from esci_reranker.labels import ESCI_LABELS
from esci_reranker.stack.rules import DecisionRules, task2_metric

MARGINS = np.round(np.arange(-1.0, 2.0001, 0.1), 2)


def relabel(pred: pd.DataFrame, entries: list[dict], margin: float) -> np.ndarray:
    """Class indices of every row of ``pred`` under its fold's rules, E lowered by ``margin``."""
    out = np.empty(len(pred), dtype=np.int64)
    columns = [f"p_{label}" for label in ESCI_LABELS]
    for entry in entries:
        mask = ((pred["seed"] == entry["seed"]) & (pred["fold"] == entry["fold"])).to_numpy()
        rules = DecisionRules.from_dict(entry["rules"])
        rules.class_offsets = [rules.class_offsets[0] - margin, *rules.class_offsets[1:]]
        out[mask] = rules.classes(pred.loc[mask, columns].to_numpy())
    return out


def operating_point(true: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """The label figures of one set of predicted classes against the true ones."""
    e, i = 0, len(ESCI_LABELS) - 1
    called_e = classes == e
    return {
        "E_precision": float(np.mean(true[called_e] == e)) if called_e.any() else float("nan"),
        "E_recall": float(np.mean(called_e[true == e])),
        "share_called_E": float(np.mean(called_e)),
        "task2_micro_f1": task2_metric(true, classes, "micro_f1"),
        "task2_macro_f1": task2_metric(true, classes, "macro_f1"),
        "judged_I_recall": float(np.mean(classes[true == i] == i)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cv", type=Path, required=True, help="a stacked CV folder (stack_oof.parquet, stack_cv.json)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench/label_operating_points.json"))
    args = parser.parse_args()
    pred = pd.read_parquet(args.cv / "stack_oof.parquet")
    entries = json.loads((args.cv / "stack_cv.json").read_text())["entries"]
    true = pred["esci_label"].map({label: k for k, label in enumerate(ESCI_LABELS)}).to_numpy()
    always_e = float(np.mean(true == 0))
    rows = [{"margin": float(m), **operating_point(true, relabel(pred, entries, float(m)))} for m in MARGINS]
    print(f"{len(pred)} held-out rows, {pred['seed'].nunique()} seed(s); always-E micro-F1 {always_e:.3f}\n")
    print("| E margin | E precision | E recall | called E | T2 micro-F1 | T2 macro-F1 | judged-I recall |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['margin']:+.2f} | {r['E_precision']:.3f} | {r['E_recall']:.3f} | {r['share_called_E']:.3f} "
            f"| {r['task2_micro_f1']:.3f} | {r['task2_macro_f1']:.3f} | {r['judged_I_recall']:.3f} |"
        )
    at_bar = [r for r in rows if r["task2_micro_f1"] >= always_e]
    best = max(at_bar, key=lambda r: r["E_precision"]) if at_bar else None
    if best is not None:
        print(
            f"\nhighest E precision with micro-F1 >= always-E: {best['E_precision']:.3f} (margin {best['margin']:+.2f})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"cv": str(args.cv), "rows": len(pred), "always_E": always_e, "margins": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
