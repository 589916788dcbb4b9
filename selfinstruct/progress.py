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
        f"{tokens:,} tok | ${state.usd:.4f}{_concurrency(state)}"
    )


def _concurrency(state: RunState) -> str:
    """' | concurrency 12 (auto, ≤64), 0 timeouts, 3 retries' from the teacher's transport, or '' without one."""
    report = getattr(getattr(state, "transport", None), "concurrency", None)
    if not callable(report):
        return ""
    c = report()
    mode = f" (auto, ≤{c['max']})" if c["adaptive"] else ""
    return f" | concurrency {c['concurrency']}{mode}, {c['timeouts']} timeouts, {c['retries']} retries"


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


class StageViews:
    """One progress view per phase of a run (kept records of generate, each evolve round), opened as the phase changes."""

    def __init__(self, quiet: bool, console: Console) -> None:
        self.quiet = quiet
        self.console = console
        self._view: ProgressView | None = None
        self._phase: tuple[str, int] | None = None

    def __call__(self, state: RunState, stage) -> None:
        label, done, total = stage.progress()
        if (label, total) != self._phase:
            self.close()
            self._phase = (label, total)
            self._view = ProgressView(total, label=label, quiet=self.quiet, console=self.console).__enter__()
        self._view.update(state, done)

    def close(self) -> None:
        if self._view is not None:
            self._view.__exit__(None, None, None)
            self._view = None
        self._phase = None


def print_generation_summary(engine, gen, console: Console) -> None:
    """The table a generate run ends with."""
    from rich.table import Table

    t = engine.usage.get("generate")
    requests, failed = (t.requests, t.failed_requests) if t else (0, 0)
    prompt, completion = (t.prompt_tokens, t.completion_tokens) if t else (0, 0)
    table = Table(title=f"selfinstruct generate: {engine.status}", show_header=False)
    table.add_row("run directory", str(engine.run.path))
    table.add_row("kept", f"{gen.tally.kept:,} / {gen.cfg.n:,}")
    for reason, count in gen.tally.rejected.most_common():
        table.add_row(f"rejected: {reason}", f"{count:,}")
    table.add_row("requests", f"{requests:,} ({failed:,} failed)")
    estimated = " (some estimated)" if t and t.estimated_requests else ""
    table.add_row("tokens", f"{prompt:,} prompt + {completion:,} completion{estimated}")
    table.add_row("cost", f"${engine.stage_usd('generate'):.4f}" if engine.price else "unknown (no price for this model; pass --price-in/--price-out)")
    unanswered = engine.possibly_billed()
    if unanswered["requests"]:
        cost = f", ≈ ${unanswered['usd']:.4f}" if engine.price else ""
        table.add_row("possibly billed", f"{unanswered['requests']:,} requests sent but never answered (estimated{cost})")
    console.print(table)


def generation_summary_line(engine, gen) -> str:
    """The end of a --quiet run in one line, for logs."""
    t = engine.usage.get("generate")
    requests, failed = (t.requests, t.failed_requests) if t else (0, 0)
    tokens = f"{t.prompt_tokens:,}+{t.completion_tokens:,}" if t else "0+0"
    cost = f"${engine.stage_usd('generate'):.4f}" if engine.price else "cost unknown (no price)"
    return (f"{engine.status}: kept {gen.tally.kept:,}/{gen.cfg.n:,}, rejected {sum(gen.tally.rejected.values()):,}, "
            f"requests {requests:,} ({failed:,} failed), tokens {tokens}, {cost}; {engine.run.path}")


def print_evolution_summary(engine, evo, console: Console) -> None:
    """The tables an evolution ends with: kept and eliminated per round and op, then cost per stage."""
    from rich.table import Table

    summary = evo.evol_summary()
    table = Table(title=f"selfinstruct evolve: {engine.status} ({engine.run.path})")
    for column in ("round", "op", "kept", "eliminated"):
        table.add_column(column)
    rows = sorted((int(r), op, c) for op, rounds in summary["ops"].items() for r, c in rounds.items())
    for r, op, c in rows:
        table.add_row(str(r), op, f"{c['kept']:,}", ", ".join(f"{k} {v:,}" for k, v in c["eliminated"].items()) or "-")
    console.print(table)
    costs = Table(show_header=True)
    for column in ("stage", "requests", "prompt tokens", "completion tokens", "cost"):
        costs.add_column(column)
    for name, st in engine.manifest()["stages"].items():
        costs.add_row(name, f"{st['requests']:,}", f"{st['prompt_tokens']:,}", f"{st['completion_tokens']:,}",
                      f"${st['usd']:.4f}" if engine.price else "unknown")
    console.print(costs)


def run_displayed(engine, stage, make_transport, console: Console, quiet: bool) -> int:
    """Drive one stage on the engine under a progress display; a stop is one line on the console. Returns the exit code."""
    import asyncio

    from rich.markup import escape

    from selfinstruct.engine import drive
    from selfinstruct.errors import RunStopped

    views = StageViews(quiet, console)
    engine.on_progress = views
    # The stop notice goes above the live bar, never inside a markup parse.
    engine.notify = lambda message: console.print(message, highlight=False, markup=False, soft_wrap=True)
    try:
        return asyncio.run(drive(engine, stage, make_transport))
    except RunStopped as stop:
        views.close()
        # The message may quote a teacher's reply: no markup from it, and one line to grep.
        console.print(f"[yellow]stopped:[/] {escape(stop.message)}", soft_wrap=True, highlight=False)
        return stop.exit_code
    finally:
        views.close()
        engine.on_progress = None
