"""Worker threads scheduled below the thread that answers HTTP.

On a CPU host the model's forwards (and the stacker's features and trees) keep every core busy.
Run at the same priority as the event loop, they make it wait for a free core before it can
answer anything, a load-shedding 429 or ``/health`` included. Linux keeps a nice value per
thread and a thread inherits its creator's, so a worker thread that lowers itself before it
first calls torch or LightGBM also lowers the OpenMP pool it starts; the event loop keeps its
priority and gets a core as soon as it has work. Lowering one's own priority needs no privilege.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

_lowered = threading.local()


def lower_this_thread(niceness: int) -> bool:
    """Add ``niceness`` (at most up to 19) to the calling thread's nice value, once per thread.

    Returns whether the value was changed: False for ``niceness`` <= 0, a thread lowered before,
    or a platform without per-thread priorities (the thread then keeps its priority).
    """
    if niceness <= 0 or getattr(_lowered, "done", False):
        return False
    _lowered.done = True
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + niceness))
    except (AttributeError, OSError) as err:  # not Linux, or a sandbox that forbids it
        log.debug("worker thread priority left as it is: %s", err)
        return False
    return True


def thread_niceness() -> int:
    """The calling thread's nice value (0 where it cannot be read)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except (AttributeError, OSError):
        return 0
