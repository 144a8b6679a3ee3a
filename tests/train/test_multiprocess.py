"""The training loop with 2 CPU processes (torchrun, gloo) on a tiny model.

Checks that data-parallel training is the same computation as one process with the same global
batch, that only rank 0 writes, that early stopping stops every rank together and that a
2-process run with dropout resumes from its checkpoint to the uninterrupted run's weights. Each rank runs tests/train/distributed_worker.py.

Tolerance: the 2-process weights equal the 1-process weights to 1e-6 (absolute). The global
batch is the same (2 x 8 pairs) and made of the same pairs: rank r takes batches r, r+2, ...
of the epoch, one process with 2 accumulation steps takes them in pairs, and DDP's mean of the
two ranks' gradients is the mean of the two accumulated halves. Only float summation order
differs (measured: bit-identical here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import free_port

WORKER = Path(__file__).with_name("distributed_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.slow


def _run(out: Path, splits: Path, backbone: Path, processes: int, *sets: str, resume=False, env=None):
    """Train with the shared tiny settings in ``processes`` processes; return the ranks' results."""
    out.mkdir(parents=True, exist_ok=True)
    config = out.parent / "config.yaml"
    config.write_text("seed: 0\n")
    overrides = (
        f"data.dir={splits}",
        f"model.backbone={backbone}",
        "model.max_length=48",
        "model.dropout=0",
        f"output.save_path={out / 'model'}",
        "optim.batch_size=8",
        "optim.lr=1e-3",
        "optim.head_lr=1e-2",
        "eval.every_steps=3",
        "eval.patience=100",
        "output.checkpoint_every=3",
        "optim.max_steps=6",
        *sets,
    )
    args = [str(WORKER), str(config), str(out), *(x for o in overrides for x in ("--set", o))]
    args += ["--resume"] if resume else []
    launcher = [sys.executable] if processes == 1 else [
        str(TORCHRUN), "--nproc_per_node", str(processes), "--master_port", str(free_port()),
    ]  # fmt: skip
    variables = {**os.environ, "AUDIT_ROOT": str(out), "OMP_NUM_THREADS": "1", **(env or {})}
    variables.pop("WORLD_SIZE", None)
    done = subprocess.run([*launcher, *args], env=variables, capture_output=True, text=True, timeout=600)
    results = [json.loads(p.read_text()) for p in sorted(out.glob("result-*.json"))]
    return done, results


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "train" / "last" / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_two_processes_train_like_one_with_the_same_global_batch_and_resume(
    tmp_path: Path, small_splits: Path, dropout_free_backbone: Path
):
    one, [single] = _run(tmp_path / "one", small_splits, dropout_free_backbone, 1, "optim.grad_accum_steps=2")
    assert one.returncode == 0, one.stderr[-3000:]
    two, ranks = _run(tmp_path / "two", small_splits, dropout_free_backbone, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["world_size"] for r in ranks} == {2}
    assert {r["steps"] for r in ranks} == {single["steps"]} == {6}
    _assert_same_weights(_weights(tmp_path / "one"), _weights(tmp_path / "two"))

    # Only rank 0 touched the run's folders: rank 1 wrote nothing but its own result file.
    writes = json.loads((tmp_path / "two" / "writes-1.json").read_text())
    assert [path for _, path in writes] == [str(tmp_path / "two" / "result-1.json")]
    assert any(
        "model.safetensors" in p or "/train/" in p
        for _, p in json.loads((tmp_path / "two" / "writes-0.json").read_text())
    )
    log = [json.loads(line) for line in (tmp_path / "two" / "train" / "log.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in log] == [
        ("val", 0),
        ("train", 3),
        ("val", 3),
        ("train", 6),
        ("val", 6),
    ]

    # With dropout each rank draws its own masks: a crash on every rank inside step 5 (after the
    # step-3 checkpoint), then --resume, must end where the uninterrupted run ends.
    dropout = "model.dropout=0.3"
    full, _ = _run(tmp_path / "full", small_splits, dropout_free_backbone, 2, dropout)
    assert full.returncode == 0, full.stderr[-3000:]
    crashed, _ = _run(
        tmp_path / "cut", small_splits, dropout_free_backbone, 2, dropout, env={"CRASH_AT_CLIP": "5"}
    )
    assert crashed.returncode != 0
    assert "simulated crash at clip 5" in crashed.stderr
    state = json.loads((tmp_path / "cut" / "train" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 3
    resumed, ranks = _run(tmp_path / "cut", small_splits, dropout_free_backbone, 2, dropout, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {r["steps"] for r in ranks} == {6}
    _assert_same_weights(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))
    # rank 1 wrote nothing on resume either (rank 0 wrote the gathered random states)
    writes = json.loads((tmp_path / "cut" / "writes-1.json").read_text())
    assert [path for _, path in writes] == [str(tmp_path / "cut" / "result-1.json")]


def test_early_stopping_stops_every_rank_at_the_same_step(
    tmp_path: Path, small_splits: Path, dropout_free_backbone: Path
):
    # A zero learning rate never improves on the first evaluation: patience 2 ends at step 6.
    sets = ("optim.lr=1e-12", "optim.head_lr=1e-12", "eval.patience=2", "optim.max_steps=30")
    done, ranks = _run(tmp_path / "stop", small_splits, dropout_free_backbone, 2, *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(ranks) == 2
    assert {(r["steps"], r["stopped_early"], r["best_step"]) for r in ranks} == {(6, True, 0)}
    assert ranks[0]["history_steps"] == ranks[1]["history_steps"] == [0, 3, 6]
