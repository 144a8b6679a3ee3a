"""progress_bar: redrawn in place on a terminal, a few whole lines on any other stream."""

from __future__ import annotations

import io
import time

import pytest
from tqdm.std import tqdm as std_tqdm

from esci_reranker.progress import LogProgress, progress_bar


class Terminal(io.StringIO):
    """An in-memory stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_a_bar_of_many_updates_writes_one_line_to_a_log():
    log = io.StringIO()
    for _ in progress_bar(range(50_000), desc="scoring", unit="row", file=log, mininterval=0):
        pass
    text = log.getvalue()
    assert "\r" not in text
    assert text.splitlines() == [text.rstrip("\n")]
    assert text.startswith("scoring: 100%")
    assert "50000/50000" in text
    assert text.endswith("\n")


def test_a_bar_updated_by_hand_with_postfix_writes_one_line_to_a_log():
    log = io.StringIO()
    bar = progress_bar(total=2_000, desc="training", unit="step", file=log, mininterval=0)
    for step in range(2_000):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1
    assert "2000/2000" in lines[0]
    assert "loss=0.0005" in lines[0]


def test_a_transient_bar_leaves_nothing_in_a_log():
    log = io.StringIO()
    for _ in progress_bar(range(10_000), desc="encoding", leave=False, file=log, mininterval=0):
        pass
    assert log.getvalue() == ""


def test_a_long_bar_writes_a_line_each_interval_then_a_final_one():
    log = io.StringIO()
    bar = progress_bar(total=3, desc="training", file=log, log_every=0.2, mininterval=0)
    for _ in range(3):
        time.sleep(0.25)  # longer than log_every, so every update may print
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split("|")[0] for line in lines] == [
        "training:  33%",
        "training:  67%",
        "training: 100%",
        "training: 100%",  # the closing line, with the totals
    ]


def test_updates_within_the_interval_are_not_written():
    log = io.StringIO()
    bar = progress_bar(total=1_000, desc="training", file=log, log_every=3600, mininterval=0)
    for _ in range(999):
        bar.update(1)
    assert log.getvalue() == ""  # nothing while running: the first line is due an hour in
    bar.update(1)
    bar.close()
    assert len(log.getvalue().splitlines()) == 1


def test_a_terminal_gets_tqdm_redrawing_in_place():
    screen = Terminal()
    bar = progress_bar(range(1_000), desc="scoring", file=screen, mininterval=0)
    assert type(bar) is std_tqdm
    for _ in bar:
        pass
    assert screen.getvalue().count("\r") > 100  # redrawn, not one line each


def test_disable_none_hides_the_bar_off_a_terminal():
    log = io.StringIO()
    for _ in progress_bar(range(100), file=log, disable=None):
        pass
    assert log.getvalue() == ""


def test_log_every_must_be_positive():
    with pytest.raises(ValueError, match="log_every must be a positive number of seconds, got 0"):
        LogProgress(range(3), log_every=0, file=io.StringIO())
