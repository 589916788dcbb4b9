"""Progress display: a rich bar on a terminal, a plain line every few seconds otherwise."""

from __future__ import annotations

import sys
import time
from typing import Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


class RunState(Protocol):
    """What the display reads from a run."""

    tally: object
    usd: float
    started: float


def describe(state: RunState) -> str:
    """One line: rejected by reason, requests/s, tokens and dollars so far."""
    t = state.tally
    elapsed = max(time.monotonic() - state.started, 1e-6)
    top = ", ".join(f"{r} {n}" for r, n in t.rejected.most_common(4)) or "none"
    tokens = t.prompt_tokens + t.completion_tokens
    return (
        f"rejected: {top} | {t.requests} req ({t.failed_requests} failed) {t.requests / elapsed:.1f}/s | "
        f"{tokens:,} tok | ${state.usd:.4f}"
    )


class ProgressView:
    """Shows kept/target with ETA; `quiet` shows nothing, a non-TTY gets plain lines."""

    def __init__(self, target: int, label: str = "kept", quiet: bool = False, console: Console | None = None, every: float = 10.0) -> None:
        self.target = target
        self.label = label
        self.quiet = quiet
        self.console = console or Console(stderr=True)
        self.every = every
        self._last_line = 0.0
        self._progress: Progress | None = None
        self._live: Live | None = None
        self._detail = Text("", overflow="fold")
        self._task = None
        self._first: tuple[float, int] | None = None

    def __enter__(self) -> "ProgressView":
        if not self.quiet and self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task(self.label, total=self.target)
            # The detail line goes under the bar, so a narrow terminal does not cut it off.
            self._live = Live(Group(self._progress, self._detail), console=self.console, refresh_per_second=4)
            self._live.start()
        return self

    def update(self, state: RunState, done: int) -> None:
        if self.quiet:
            return
        if self._progress is not None:
            self._progress.update(self._task, completed=min(done, self.target))
            self._detail.plain = describe(state)
            return
        now = time.monotonic()
        if self._first is None:
            self._first = (now, done)  # a resumed run starts with records: the rate counts only new ones
        if now - self._last_line >= self.every:
            self._last_line = now
            print(f"{self.label} {done}/{self.target}{self._eta(now, done)} | {describe(state)}", file=sys.stderr, flush=True)

    def _eta(self, now: float, done: int) -> str:
        """' eta 12m05s' from the rate since the first update, or '' before there is one."""
        t0, done0 = self._first
        if done <= done0 or now <= t0:
            return ""
        left = max(self.target - done, 0) * (now - t0) / (done - done0)
        minutes, seconds = divmod(int(left), 60)
        hours, minutes = divmod(minutes, 60)
        return f" eta {hours}h{minutes:02d}m" if hours else f" eta {minutes}m{seconds:02d}s"

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
