"""The progress display: a live bar on a terminal, plain lines with an ETA in logs, nothing when quiet."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

from rich.console import Console

from selfinstruct.engine import Tally
from selfinstruct.progress import ProgressView


@dataclass
class State:
    tally: Tally = field(default_factory=Tally)
    usd: float = 0.0
    started: float = field(default_factory=time.monotonic)


def busy_state() -> State:
    state = State(usd=1.25)
    state.tally.kept, state.tally.requests, state.tally.prompt_tokens = 40, 5, 12_000
    state.tally.rejected.update({"near-duplicate": 7, "blacklist": 2})
    return state


def test_terminal_shows_bar_counts_rejections_and_dollars():
    sink = io.StringIO()
    console = Console(file=sink, force_terminal=True, width=120)
    with ProgressView(100, console=console) as view:
        view.update(busy_state(), 40)
        view._live.refresh()
    shown = sink.getvalue()
    assert "kept" in shown and "40/100" in shown
    assert "near-duplicate 7" in shown and "blacklist 2" in shown and "$1.2500" in shown and "12,000 tok" in shown


def test_plain_lines_carry_an_eta_from_the_rate_of_this_run(capsys):
    console = Console(file=io.StringIO(), force_terminal=False)
    state = busy_state()
    with ProgressView(100, console=console, every=0.0) as view:
        view.update(state, 40)  # a resumed run: 40 were there before
        time.sleep(1.0)
        view.update(state, 41)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("kept 40/100 |")  # no rate yet, no ETA
    head = lines[1].split(" | ")[0]
    assert head.startswith("kept 41/100 eta 0m") or head.startswith("kept 41/100 eta 1m"), head
    # One new record a second, 59 to go: about a minute, not the ~1.4 s the resumed 40 would suggest.
    assert int(head[-3:-1]) + 60 * int(head.split("eta ")[1].split("m")[0]) >= 50
    assert "near-duplicate 7" in lines[1]


def test_quiet_shows_nothing(capsys):
    sink = io.StringIO()
    with ProgressView(100, quiet=True, console=Console(file=sink, force_terminal=True)) as view:
        view.update(busy_state(), 40)
    assert sink.getvalue() == "" and capsys.readouterr().err == ""
