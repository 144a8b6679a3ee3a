"""One rank of a multi-process training run, for tests/train/test_multiprocess.py (not a test module).

Run under ``accelerate launch --cpu --num_processes N tests/train/distributed_worker.py CONFIG OUT_DIR
[--resume] [--set key=value ...]``. It trains with ``esci_reranker.train.train`` and records, per rank,
into OUT_DIR (outside the run's folders):

- ``result-<rank>.json``: the rank's ``TrainResult`` (steps, early stop, best step);
- ``writes-<rank>.json``: every file-system write this rank made under ``AUDIT_ROOT`` (from Python's
  audit hooks: opens for writing, renames, mkdir, deletions), to show that only rank 0 writes.

``CRASH_AT_CLIP=K`` makes the K-th gradient clipping raise on every rank, a crash in the middle of
a step at the same point on all ranks (what a preempted job looks like to ``--resume``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

WRITE_EVENTS = {"os.rename", "os.replace", "os.mkdir", "os.remove", "os.unlink", "os.rmdir", "shutil.rmtree"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def main() -> None:
    config, out_dir, *rest = sys.argv[1:]
    resume = "--resume" in rest
    overrides = [rest[i + 1] for i, arg in enumerate(rest) if arg == "--set"]
    root = os.environ["AUDIT_ROOT"]
    rank = int(os.environ.get("RANK", "0"))
    writes: list[list[str]] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if writing and isinstance(path, str | Path) and str(path).startswith(root):
                writes.append([event, str(path)])
        elif event in WRITE_EVENTS and args and str(args[0]).startswith(root):
            writes.append([event, str(args[0])])

    sys.addaudithook(audit)

    import torch

    from esci_reranker.train import load_config, train
    from esci_reranker.train import loop as loop_module

    crash_at = int(os.environ.get("CRASH_AT_CLIP", "0"))
    if crash_at:
        real_clip = loop_module.Accelerator.clip_grad_norm_
        calls = {"n": 0}

        def clip_then_maybe_crash(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise RuntimeError(f"simulated crash at clip {crash_at} on rank {rank}")
            return real_clip(self, *args, **kwargs)

        loop_module.Accelerator.clip_grad_norm_ = clip_then_maybe_crash

    torch.set_num_threads(1)
    result = train(load_config(Path(config), tuple(overrides)), resume=resume, progress=False)
    record = {
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "best_step": result.best_step,
        "best_metric": result.best_metric,
        "history_steps": [h["step"] for h in result.history],
    }
    Path(out_dir, f"result-{rank}.json").write_text(json.dumps(record))
    Path(out_dir, f"writes-{rank}.json").write_text(json.dumps(writes))


if __name__ == "__main__":
    main()
