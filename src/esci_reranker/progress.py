"""Progress bars that redraw in a terminal and stay short in a log.

Every progress bar in the package is made by :func:`progress_bar`. On a terminal it is an ordinary
tqdm bar redrawn in place. When the stream is not a terminal (``make run > log.txt``, a CI or
cluster log) a redraw cannot overwrite the previous one, so each would become a line of its own:
there the bar writes one line per ``log_every`` seconds at most while it runs and, when it closes
with ``leave=True``, one final line with the totals. A bar that lasts under a minute therefore
leaves a single line, and a transient one (``leave=False``) none.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.autonotebook import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

T = TypeVar("T")

#: Seconds between two lines of a running bar when the output is not a terminal.
LOG_EVERY_S = 60.0


class LogProgress(std_tqdm):
    """A tqdm bar for a stream that is not a terminal: whole lines, one per ``log_every`` seconds.

    tqdm redraws by writing ``\\r`` and the new state; this class overrides ``display`` (tqdm's
    documented extension point) to write a newline-terminated line instead, rate-limited. tqdm's
    ``close`` marks the bar disabled before its last ``display`` and then writes the newline
    itself, which is how that last call is told apart from a running one.
    """

    def __init__(self, *args: Any, log_every: float = LOG_EVERY_S, **kwargs: Any) -> None:
        if log_every <= 0:
            raise ValueError(f"progress: log_every must be a positive number of seconds, got {log_every!r}")
        # Set before tqdm's __init__, which displays the bar once: that first call must not print.
        self._log_every = log_every
        self._last_line = time.monotonic()
        # Formatting the state is all a display costs here, but there is no need to do it 10x a second.
        kwargs.setdefault("mininterval", 1.0)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """Write the bar's state as one line, at most once per ``log_every`` seconds (and at close)."""
        if msg == "":  # a request to clear the line: there is nothing on screen to clear
            return False
        text = self.__str__() if msg is None else msg
        if self.disable:  # the final display from close(), which adds the newline itself
            self.fp.write(text)
            self.fp.flush()
            return True
        now = time.monotonic()
        if now - self._last_line < self._log_every:
            return False
        self._last_line = now
        self.fp.write(text + "\n")
        self.fp.flush()
        return True

    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear: lines written to a log stay."""


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def progress_bar(
    iterable: Iterable[T] | None = None, *, log_every: float = LOG_EVERY_S, **kwargs: Any
) -> std_tqdm:
    """A progress bar over ``iterable`` (or one updated by hand with ``total=``); tqdm's arguments.

    On a terminal (or in a notebook) it is tqdm's own bar. On any other stream -- ``file=``,
    default ``sys.stderr`` -- it is a :class:`LogProgress`, which writes at most one line per
    ``log_every`` seconds while running and one when it closes (none if ``leave=False``).
    ``disable=None`` keeps tqdm's meaning: shown on a terminal only.
    """
    stream = kwargs.get("file") or sys.stderr
    if _is_terminal(stream) or auto_tqdm.__module__ != std_tqdm.__module__:
        return auto_tqdm(iterable, **kwargs)
    return LogProgress(iterable, log_every=log_every, **kwargs)
