"""Several processes of one job (``torchrun`` / ``accelerate launch``): who does what, how results meet.

The training loop runs data-parallel on every process. Around it, the stacked recipe and the
main job need three more things, all here so that every caller shares them:

- **one process group for the whole job** (``process_state``), formed before the first training
  with a long timeout: the other processes wait at a barrier while the main process fits the
  trees or evaluates, which on the full data takes longer than torch's default 10-30 minutes;
- **work done once** (``on_main``): the main process runs it, the others wait and receive its
  result; every file of the job is written this way, so no two processes write one file;
- **work shared out** (``aligned_share``, ``gather_arrays``, ``sharded_outputs``): each process
  takes a share of the pairs and the main process (or every one) gets the whole back, in order.

With one process every helper is a plain call: no process group, no copy.
"""

from __future__ import annotations

import atexit
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from esci_reranker.model.features import length_sorted_batches

if TYPE_CHECKING:
    from esci_reranker.model.scorer import Scorer

T = TypeVar("T")

#: How long a process waits for the others at a collective before it gives up. Hours, not
#: torch's default: the others wait while the main process fits the trees, scores the test
#: split or builds the index. A launcher (torchrun, accelerate launch) stops every process as soon
#: as one fails, so a long timeout never leaves a job hanging after a crash.
PROCESS_GROUP_TIMEOUT = timedelta(hours=12)


def distributed_cpu() -> bool:
    """Whether this process is one of several CPU-only training processes (gloo).

    accelerate only forms a CPU process group when asked (``cpu=True``, or ``ACCELERATE_USE_CPU``
    as ``accelerate launch --cpu`` sets); a plain ``torchrun --nproc_per_node N`` on a machine
    without GPUs would otherwise run N independent copies that all write the same files.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return forced or (world_size > 1 and not torch.cuda.is_available())


def process_state() -> PartialState:
    """This job's process group (accelerate's ``PartialState``, formed on first use).

    Formed here with ``PROCESS_GROUP_TIMEOUT``; a training's ``Accelerator`` joins the same group.
    With several processes, the group is torn down when the process exits.
    """
    state = PartialState(cpu=distributed_cpu(), timeout=PROCESS_GROUP_TIMEOUT)
    if state.num_processes > 1:
        _tear_down_at_exit()
    return state


@functools.cache
def _tear_down_at_exit() -> None:
    # A process that exits with its group alive leaves the group's own threads to the
    # interpreter's teardown, which can abort it ("terminate called without an active
    # exception") while the others still run; torch asks for destroy_process_group at the end.
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_main_process() -> bool:
    """Whether this process writes the job's files and runs its one-process stages."""
    return process_state().is_main_process


def model_device() -> str | None:
    """Where this process puts a model it loads for scoring: its own device (``cuda:<local
    rank>``) with several processes, None (the usual choice: cuda > mps > cpu) with one."""
    state = process_state()
    return str(state.device) if state.num_processes > 1 else None


def barrier() -> None:
    """Wait until every process of the job reaches this point (nothing with one process)."""
    process_state().wait_for_everyone()


def on_main(work: Callable[[], T]) -> T:
    """``work()`` run on the main process only; every process returns its result.

    The others wait (in the broadcast of the result) until it is done, so files it writes are
    there for all of them afterwards. The result must pickle; keep it small (a path, a summary).
    """
    state = process_state()
    if state.num_processes == 1:
        return work()
    box: list[Any] = [work() if state.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def aligned_share(n: int, multiple: int, rank: int, processes: int) -> np.ndarray:
    """Indices of process ``rank``'s contiguous share of ``n`` items, cut at multiples of ``multiple``.

    Work done in chunks of ``multiple`` from the start of each share meets the same chunks as one
    process working through all ``n`` from 0: results that depend on what shares a chunk (float
    sums over a padded batch) are then the same.

    Raises:
        ValueError: ``multiple`` below 1, or ``rank`` outside ``0..processes-1``.
    """
    if multiple < 1:
        raise ValueError(f"aligned_share: multiple={multiple}; expected a positive integer.")
    if not 0 <= rank < processes:
        raise ValueError(f"aligned_share: rank={rank}; expected 0 <= rank < processes ({processes}).")
    chunks = -(-n // multiple)
    size = -(-chunks // processes) * multiple
    return np.arange(min(n, rank * size), min(n, (rank + 1) * size))


def gather_arrays(part: np.ndarray) -> np.ndarray:
    """Every process's ``part`` joined in rank order (along the first axis), on every process."""
    if process_state().num_processes == 1:
        return part
    return np.concatenate(gather_object([part]))


def sharded_outputs(
    scorer: Scorer, queries: Sequence[str], texts: Sequence[str], batch_size: int
) -> dict[str, np.ndarray]:
    """``scorer.run_encoded`` of every (query, text) pair, the forward passes shared out over the
    processes; the whole result, in input order, on every process.

    Each process tokenises only the pairs it scores (plus a share for their lengths). Pairwise
    families: the passes are those one process makes (``length_sorted_batches`` of every pair's
    length, ``batch_size`` each) dealt out in turn, so the outputs equal a one-process run's
    bit for bit. List-level families: whole candidate lists (queries) are dealt out instead.
    """
    state = process_state()
    encoder = scorer.pair_encoder
    n = len(queries)
    if state.num_processes == 1 or n == 0:
        return scorer.run_encoded(encoder.encode(list(queries), list(texts)))
    rank, processes = state.process_index, state.num_processes
    if encoder.list_level:
        lists = np.unique(np.asarray(queries, dtype=object), return_inverse=True)[1]
        mine = np.flatnonzero(lists % processes == rank)
    else:
        share = aligned_share(n, 1, rank, processes)
        lengths = gather_arrays(
            np.asarray(encoder.encode([queries[i] for i in share], [texts[i] for i in share]).lengths())
        )
        turns = length_sorted_batches(lengths, batch_size)[rank::processes]
        # In pass order, longest first: run_encoded's own length-sorted passes over these pairs
        # are then exactly the passes dealt to this process.
        mine = np.concatenate(turns) if turns else np.zeros(0, dtype=np.int64)
    out = (
        scorer.run_encoded(encoder.encode([queries[i] for i in mine], [texts[i] for i in mine]))
        if len(mine)
        else {}
    )
    return _assemble(gather_object([(mine, out)]), n)


def _assemble(parts: Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]], n: int) -> dict[str, np.ndarray]:
    """One array per output name with every process's rows put back at their indices."""
    whole: dict[str, np.ndarray] = {}
    for index, out in parts:
        for name, values in out.items():
            if name not in whole:
                whole[name] = np.zeros((n, *values.shape[1:]), dtype=values.dtype)
            whole[name][index] = values
    return whole
