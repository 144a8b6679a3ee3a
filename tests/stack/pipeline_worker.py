"""One process of an ``esci-reranker`` command, for tests/stack/test_multiprocess.py (not a test module).

Run as ``torchrun --nproc_per_node N tests/stack/pipeline_worker.py RECORD_DIR pipeline --config ...``
(or with ``python`` for one process): it runs the command line with the arguments after
``RECORD_DIR`` and writes ``RECORD_DIR/trainings-<rank>.json``, the ``output.save_path`` of every
cross-encoder training this process started, in order.

``CRASH_AT_TRAINING=K`` makes the K-th training raise on every process before its first step: a job
stopped between two trainings, what a preemption after a finished fold looks like to ``--resume``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    record_dir, *arguments = sys.argv[1:]
    rank = int(os.environ.get("RANK", "0"))
    crash_at = int(os.environ.get("CRASH_AT_TRAINING", "0"))
    started: list[str] = []
    record = Path(record_dir, f"trainings-{rank}.json")

    from esci_reranker.cli import app
    from esci_reranker.train import loop

    real_train = loop.Trainer.train

    def recorded_train(self, *args, **kwargs):
        started.append(str(self.save_path))
        record.write_text(json.dumps(started))
        if len(started) == crash_at:
            raise RuntimeError(f"simulated stop before training {crash_at} on rank {rank}")
        return real_train(self, *args, **kwargs)

    loop.Trainer.train = recorded_train
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text("[]")
    app(args=arguments, prog_name="esci-reranker")


if __name__ == "__main__":
    main()
