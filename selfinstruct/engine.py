"""The engine every teacher stage runs on: ledger, budget, dispatch, health, drain, usage and manifest.

A stage (generate, evolve, ...) is a job source: `next_job()` hands out coroutines that call
`Engine.ask()` for each request and then turn the reply into records. The engine owns everything
around the request: the ledger line written before it leaves and the one written before its reply
is used, replay of paid replies on resume, the `--max-cost` reservation, the health checks, the
graceful stop and the manifest.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import secrets
import shlex
import signal
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol
from urllib.parse import urlparse

from selfinstruct import __version__
from selfinstruct.errors import OutputError, RunStopped
from selfinstruct.pricing import Price, endpoint_kind, estimate_prompt_tokens
from selfinstruct.rundir import LEDGER, RECORDS, REJECTED, RunDir
from selfinstruct.teacher import Completion, RequestCancelled, RequestFailed, TeacherSettings, Usage

# Stop when this many requests in a row failed after retries: the teacher is down.
MAX_CONSECUTIVE_FAILURES = 20
# Ledger statuses of a request that got an answer (ok) or failed for good; only these are replayed.
FINISHED = ("ok", "failed")
# Reasons a signal gives a stop; the manifest's status says which.
SIGNAL_STOPS = ("interrupted", "terminated")


@dataclass
class Tally:
    """Running counts for the manifest and the progress line."""

    kept: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    requests: int = 0
    failed_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_requests: int = 0
    items: int = 0
    # Every HTTP request sent, retries included, and why the failed ones failed (timeout, http-429...).
    attempts: int = 0
    attempt_errors: collections.Counter = field(default_factory=collections.Counter)

    def add_usage(self, entry: dict) -> None:
        for key in ("usage", "wasted"):
            usage = entry.get(key) or {}
            self.prompt_tokens += int(usage.get("prompt_tokens", 0))
            self.completion_tokens += int(usage.get("completion_tokens", 0))
        if (entry.get("usage") or {}).get("estimated"):
            self.estimated_requests += 1

    def add_attempts(self, entry: dict) -> None:
        self.attempts += int(entry.get("attempts", 1))
        self.attempt_errors.update(entry.get("errors", []))

    def add_request(self, entry: dict) -> None:
        """Count one finished ledger entry."""
        self.requests += 1
        self.add_usage(entry)
        self.add_attempts(entry)
        if entry.get("status") != "ok":
            self.failed_requests += 1


@dataclass
class Route:
    """A teacher the engine sends to: model, endpoint and price, and its transport once the run is driven."""

    name: str
    model: str
    base_url: str | None
    price: Price | None
    make: Callable[[], "Transport"] | None = None
    transport: "Transport | None" = None


class Halted(Exception):
    """A job stopped before its next request (a stop, or the budget elsewhere); resume finishes it."""


class Transport(Protocol):
    """Where requests go: the online chat endpoint today (teacher.Teacher), a batch or a pool tomorrow."""

    json_mode_error: str | None

    async def complete(self, messages: list[dict[str, str]], json_mode: bool = False, max_tokens: int | None = None,
                       text_messages: Callable[[], list[dict[str, str]]] | None = None,
                       may_retry_billed: Callable[[Usage], bool] | None = None, request_id: str | None = None) -> Completion: ...

    def stop_retrying(self) -> None: ...


class Stage(Protocol):
    """What a stage gives the engine: jobs, its own manifest sections and what to say about itself."""

    name: str
    ledger_stages: tuple[str, ...]  # the `stage` values of its ledger lines
    window: int  # jobs in flight at once

    def next_job(self, running: int) -> Callable[[], Awaitable[None]] | None: ...  # running: jobs not finished yet

    def finish(self) -> None: ...

    # Optional: `wanted() -> bool`, whether the stage still needs requests (a job waiting on the budget is then
    # halted instead of stopping a run whose target the requests in flight already met).

    def low_yield(self, useful: int, window: int) -> str | None: ...

    def progress(self) -> tuple[str, int, int]: ...

    def counts(self) -> tuple[int, collections.Counter]: ...

    def describe(self, manifest: dict) -> None: ...


def public_url(base_url: str | None) -> str | None:
    """A base URL without credentials or query strings (which sometimes carry keys)."""
    if not base_url:
        return None
    parts = urlparse(base_url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def teacher_mismatches(previous: dict, model: str, price: Price | None) -> tuple[list[str], list[str]]:
    """What differs from a run's recorded model and price, and the flags that would resume it.

    A manifest has one model and one price for the whole run: resuming with others would relabel
    records another model wrote and re-price (or zero) money already spent.
    """
    mismatches: list[str] = []
    flags: list[str] = []
    was_model = (previous.get("teacher") or {}).get("model")
    if was_model not in (None, model):
        mismatches.append(f"--model ({was_model})")
        flags.append(f"--model {shlex.quote(str(was_model))}")
    cost = previous.get("cost") or {}
    was = (cost.get("price_in_per_1m"), cost.get("price_out_per_1m"))
    if cost.get("priced") and None not in was and (price is None or (price.input, price.output) != was):
        # repr, not :g: the hint must give back the exact figure (1.234567 must not become 1.23457).
        mismatches.append(f"price (${was[0]!r} in, ${was[1]!r} out per 1M tokens)")
        flags.append(f"--price-in {was[0]!r} --price-out {was[1]!r}")
    return mismatches, flags


def one_line(text: str | None, limit: int = 300) -> str:
    """A teacher's reply as a stop message quotes it: on one line (⏎ for newlines), cut to `limit` characters."""
    return (text or "").strip().replace("\n", "⏎")[:limit]


def teacher_capacity(engine: "Engine", cfg) -> int:
    """Requests the teacher takes at once now: its adaptive capacity (--concurrency auto), else --concurrency."""
    return getattr(engine.transport, "capacity", None) or cfg.concurrency


class QueuedStage:
    """What a stage with one job per queued item shares: the jobs in queue order, its tallies, its low-yield stop.

    A subclass fills `_queue`, defines `_job(item)`, keeps `tally`, `sample_reply`, `engine` and `cfg`, and names
    what a useful job gave (`yield_what`) and what to check when few do (`yield_check`).
    """

    yield_what: str
    yield_check: str

    @property
    def window(self) -> int:
        """Jobs in flight: as many as the teacher takes requests at once now (--concurrency auto moves it)."""
        return teacher_capacity(self.engine, self.cfg)

    def next_job(self, running: int) -> Callable[[], Awaitable[None]] | None:
        item = next(self._queue, None)
        return None if item is None else (lambda: self._job(item))

    def finish(self) -> None:
        """Nothing left to write: each job wrote its own records."""

    def low_yield(self, useful: int, window: int) -> str | None:
        return (f"only {useful} of the last {window} {self.yield_what}; stopping instead of spending on. "
                f"A sample reply: {one_line(self.sample_reply)!r} (hint: check {self.yield_check}, then re-run to resume)")

    def counts(self) -> tuple[int, collections.Counter]:
        return self.tally.kept, self.tally.rejected


def teacher_settings(cfg) -> TeacherSettings:
    """How a run drives its teacher, from its frozen config."""
    return TeacherSettings(
        model=cfg.model, base_url=cfg.base_url, timeout=cfg.timeout, retries=cfg.retries, concurrency=cfg.concurrency,
        adaptive=getattr(cfg, "adaptive_concurrency", False),
        rpm=cfg.rpm, tpm=cfg.tpm, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
    )


def make_engine(run: RunDir, cfg, price: Price | None, command: str) -> "Engine":
    """An engine for a run's config (the transport comes when it is driven)."""
    return Engine(run, None, model=cfg.model, base_url=cfg.base_url, price=price, command=command, max_cost=cfg.max_cost,
                  max_tokens=cfg.max_tokens, min_yield=cfg.min_yield, yield_window=cfg.yield_window, grace=cfg.grace)


def check_orphaned(run: RunDir) -> None:
    """Refuse to resume records whose manifest is gone: their model, prices and settings are unknown."""
    if run.manifest_path.exists():
        return
    holding = [name for name in (RECORDS, REJECTED, LEDGER) if (run.path / name).exists() and (run.path / name).stat().st_size > 0]
    if holding:
        raise OutputError(
            f"{run.path}: holds {', '.join(holding)} but no manifest.json, so the model and settings that made them are unknown",
            "restore manifest.json to resume; or keep the records as a dataset (selfinstruct filter "
            f"{run.path / RECORDS} --out DIR) and choose a new --out",
        )


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Engine:
    """Runs stages against one transport into one run directory; every request is ledgered before it leaves."""

    def __init__(
        self,
        run: RunDir,
        transport: Transport | None,
        *,
        model: str,
        base_url: str | None,
        price: Price | None,
        command: str,
        max_cost: float | None = None,
        max_tokens: int | None = None,
        min_yield: float = 0.1,
        yield_window: int = 50,
        grace: float = 10.0,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.run = run
        # The run's teacher; stages may add others (a judge, a second model) with their own price.
        self.routes: dict[str, Route] = {"teacher": Route("teacher", model, base_url, price, transport=transport)}
        self.model = model
        self.base_url = base_url
        self.price = price
        self.command = command
        self.max_cost = max_cost
        self.max_tokens = max_tokens
        self.min_yield = min_yield
        self.yield_window = yield_window
        self.grace = grace
        self.notify = notify or (lambda message: None)
        self.on_progress: Callable[["Engine", Stage], None] | None = None
        self.stages: list[Stage] = []
        self.usage: dict[str, Tally] = {}
        # Tokens by (stage, route): each route's tokens are charged at its own price.
        self._spent: dict[tuple[str, str], Tally] = {}
        # Finished requests by id: a stage asking again gets the logged reply (resume pays nothing twice).
        self.replies: dict[str, dict] = {}
        # Requests sent but never answered (a kill) or cancelled at a stop: the server may have billed them.
        self.unanswered: list[dict] = []
        # Ledger lines that are no request (a batch transport's files and batches), in order, for the transport to resume from.
        self.notes: list[dict] = []
        # Requests a batch holds: submitted once, billed only when its output comes back, so never "possibly billed".
        self.held: set[str] = set()
        # Requests a batch transport queued but never uploaded before a stop: never billed either.
        self.unsent: set[str] = set()
        self.previous: dict | None = None
        self.created = _now()
        self.started = time.monotonic()
        self.status = "running"
        self.stop_reason: str | None = None
        self.stopping: str | None = None
        self._stop_at = 0.0
        self.recent: collections.deque[int] = collections.deque(maxlen=yield_window)
        self.consecutive_failures = 0
        self.last_error = ""
        self.in_flight = 0
        self._reserved = 0.0
        # Billed but unusable replies of requests still retrying: spent, not in the usage yet.
        self._billed = 0.0
        self._last_manifest = 0.0
        self._running: Stage | None = None
        # Jobs whose request came back and that now handle its reply: out of the window, so it refills first.
        self._handling: set[asyncio.Task] = set()
        self._wake: asyncio.Event | None = None

    # ---- resume -------------------------------------------------------------------------

    def load(self) -> list[dict]:
        """Read the ledger once: finished replies (returned in order) and requests that never came back."""
        self.previous = self.run.load_manifest()
        if self.previous:
            self.created = self.previous.get("created", self.created)
        finished: list[dict] = []
        sent: dict[str, dict] = {}
        for entry in self.run.load(LEDGER):
            status = entry.get("status")
            if status in FINISHED:
                finished.append(entry)
                self.replies[entry["request_id"]] = entry
                self._count(entry)
                sent.pop(entry.get("dispatch", ""), None)
            elif status == "dispatched":
                sent[entry.get("dispatch", "")] = entry
            elif status == "cancelled":
                sent.pop(entry.get("dispatch", ""), None)
                self.unanswered.append(entry)
                self._count(entry, request=False)  # billed failed attempts before the stop are known
            elif status:
                self.notes.append(entry)
                self.held.update(entry.get("request_ids") or ())
                self.unsent.update(entry.get("unsent_ids") or ())
        self.unanswered.extend(sent.values())
        return finished

    @property
    def transport(self) -> Transport | None:
        return self.routes["teacher"].transport

    @transport.setter
    def transport(self, value: Transport | None) -> None:
        self.routes["teacher"].transport = value

    def note(self, entry: dict) -> None:
        """Append a ledger line that is no request (e.g. a batch's file and batch ids), before anything depends on it."""
        line = {**entry, "at": round(time.time(), 3)}
        self.run.append(LEDGER, [line])
        self.notes.append(line)
        self.held.update(line.get("request_ids") or ())
        self.unsent.update(line.get("unsent_ids") or ())

    def add_route(self, name: str, model: str, base_url: str | None, price: Price | None, make: Callable[[], Transport]) -> None:
        """Another teacher for some requests (ask(..., route=name)), charged at its own price."""
        self.routes[name] = Route(name, model, base_url, price, make)

    def _count(self, entry: dict, request: bool = True) -> None:
        """Add a ledger entry to its stage's usage and to its route's spend."""
        stage = str(entry.get("stage", "generate"))
        for tally in (self.usage.setdefault(stage, Tally()), self._spent.setdefault((stage, self._route_of(entry).name), Tally())):
            if request:
                tally.add_request(entry)
            else:
                tally.add_usage(entry)

    def _route_of(self, entry: dict) -> Route:
        return self.routes.get(str(entry.get("route", "teacher"))) or self.routes["teacher"]

    # ---- requests -----------------------------------------------------------------------

    async def ask(
        self,
        stage: str,
        request_id: str,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None = None,
        json_mode: bool = False,
        text_messages: Callable[[], list[dict[str, str]]] | None = None,
        fields: dict | None = None,
        route: str = "teacher",
    ) -> dict:
        """One request: replayed from the ledger if an earlier attempt paid for it, else sent and ledgered first."""
        entry = self.replies.get(request_id)
        if entry is not None:
            return entry
        job = asyncio.current_task()
        self._handling.discard(job)
        target = self.routes[route]
        worst = self.worst_case_usd(messages, max_tokens, route) if self.max_cost is not None else 0.0
        await self._reserve(worst)
        base = {"request_id": request_id, "stage": stage, **(fields or {})}
        if route != "teacher":
            base["route"] = route
        dispatch = secrets.token_hex(6)
        self.run.append(LEDGER, [{**base, "status": "dispatched", "dispatch": dispatch, "at": round(time.time(), 3),
                                  "prompt_chars": sum(len(m.get("content", "")) for m in messages),
                                  "max_tokens": max_tokens or self.max_tokens}])
        self.in_flight += 1
        billed = 0.0

        def may_retry_billed(usage: Usage) -> bool:
            # This request's reservation still covers its next attempt; the billed reply is extra.
            nonlocal billed
            cost = target.price.usd(usage.prompt_tokens, usage.completion_tokens)
            billed += cost
            self._billed += cost
            return self.committed_usd() <= self.max_cost

        guard = may_retry_billed if self.max_cost is not None and target.price else None
        try:
            result: Completion | RequestFailed = await target.transport.complete(
                messages, json_mode=json_mode, max_tokens=max_tokens, text_messages=text_messages, may_retry_billed=guard,
                request_id=request_id)
        except RequestFailed as failed:
            result = failed
        except (RequestCancelled, asyncio.CancelledError) as exc:
            wasted = exc.wasted if isinstance(exc, RequestCancelled) else Usage()
            self._log_cancelled(base, dispatch, wasted)
            if isinstance(exc, RequestCancelled):
                raise Halted() from None
            raise
        finally:
            self.in_flight -= 1
            self._reserved = max(0.0, self._reserved - worst) if self.in_flight else 0.0
            self._billed = max(0.0, self._billed - billed) if self.in_flight else 0.0
        entry = self._log(base, dispatch, result)
        # Refill before this reply is handled: the loop dispatches the next requests, and they leave, while this one is
        # parsed and deduplicated (two turns of the loop: one to refill, one for the new requests to go out).
        self._handling.add(job)
        if self._wake is not None:
            self._wake.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return entry

    async def _reserve(self, worst: float) -> None:
        """Wait until the budget holds one more request at its worst; stop the run when nothing in flight can free it."""
        while True:
            if self.stopping:
                raise Halted()
            if self.max_cost is None or self.committed_usd() + worst <= self.max_cost:
                self._reserved += worst
                return
            if self.in_flight == 0:
                wanted = getattr(self._running, "wanted", None)
                if wanted is not None and not wanted():
                    raise Halted()  # the requests that landed meanwhile met the stage's target: no stop to report
                raise RunStopped(
                    "budget",
                    f"stopped at ${self.usd:.4f}: one more request could pass --max-cost ${self.max_cost:g} "
                    f"(hint: raise --max-cost and re-run the same command to resume)",
                    exit_code=3,
                )
            await asyncio.sleep(0.05)

    def _log(self, base: dict, dispatch: str, result: Completion | RequestFailed) -> dict:
        """Append a finished request to the ledger before anything acts on it."""
        entry = dict(base)
        if isinstance(result, RequestFailed):
            entry.update(
                status="failed", error=result.message, error_kind=result.kind, http_status=result.status,
                attempts=result.attempts, errors=list(result.errors),
                usage={"prompt_tokens": 0, "completion_tokens": 0, "estimated": False},
                wasted=vars(result.wasted),
            )
            self.consecutive_failures += 1
            self.last_error = result.message
        else:
            entry.update(
                status="ok", response_id=result.response_id, finish_reason=result.finish_reason, usage=vars(result.usage),
                wasted=vars(result.wasted), attempts=result.attempts, errors=list(result.errors), json_mode=result.json_mode,
                latency=round(result.latency, 3), content=result.content,
            )
            self.consecutive_failures = 0
        entry["dispatch"] = dispatch
        entry["at"] = round(time.time(), 3)
        self.run.append(LEDGER, [entry])
        self.replies[entry["request_id"]] = entry
        self._count(entry)
        return entry

    def _log_cancelled(self, base: dict, dispatch: str, wasted: Usage) -> None:
        """A request given up at a stop: ledgered so the manifest counts it as possibly billed, and resume resends it."""
        entry = {**base, "status": "cancelled", "dispatch": dispatch, "at": round(time.time(), 3), "wasted": vars(wasted)}
        try:
            self.run.append(LEDGER, [entry])
        except Exception:  # the run is stopping anyway; the dispatched line already counts it
            return
        self.unanswered.append(entry)
        self._count(entry, request=False)

    # ---- money --------------------------------------------------------------------------

    def stage_usd(self, stage: str) -> float:
        """Dollars of a stage's requests, each route's tokens at its price."""
        usd = 0.0
        for (name, route), t in self._spent.items():
            price = (self.routes.get(route) or self.routes["teacher"]).price
            if name == stage and price:
                usd += price.usd(t.prompt_tokens, t.completion_tokens)
        return usd

    @property
    def usd(self) -> float:
        """Dollars of every request that came back (and billed attempts of cancelled ones)."""
        return sum(self.stage_usd(s) for s in self.usage)

    def committed_usd(self) -> float:
        """Spent, plus what may have been billed unseen, plus what requests in flight may still cost."""
        return self.usd + self.possibly_billed()["usd"] + self._reserved + self._billed

    def worst_case_usd(self, messages: list[dict[str, str]], max_tokens: int | None = None, route: str = "teacher") -> float:
        """The most one request can cost: its prompt plus a full max_tokens reply."""
        price = self.routes[route].price
        if not price:
            return 0.0
        # Estimates can undershoot real tokenisers on CJK text; pad the prompt by half.
        return price.usd(estimate_prompt_tokens(messages) * 1.5, max_tokens or self.max_tokens or 4096)

    def possibly_billed(self) -> dict:
        """Requests sent but never answered (killed or cancelled): estimated from their stage's answered ones."""
        prompt = completion = usd = 0.0
        unanswered = [e for e in self.unanswered if e.get("request_id") not in self.held and e.get("request_id") not in self.unsent]
        for entry in unanswered:
            t = self.usage.get(str(entry.get("stage", "generate")))
            answered = t.requests - t.failed_requests if t else 0
            if answered:
                p, c = t.prompt_tokens / answered, t.completion_tokens / answered
            else:  # nothing of its kind came back yet: a character a token, half the reply limit
                p, c = float(entry.get("prompt_chars") or 0), float(entry.get("max_tokens") or self.max_tokens or 0) / 2
            prompt, completion = prompt + p, completion + c
            price = self._route_of(entry).price
            usd += price.usd(p, c) if price else 0.0
        return {"requests": len(unanswered), "prompt_tokens": int(prompt), "completion_tokens": int(completion),
                "usd": round(usd, 6), "estimated": True}

    # ---- stopping -----------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Stop dispatching and retrying (a signal, or a stop elsewhere); requests in flight get --grace to land."""
        if self.stopping:
            return
        self.stopping = reason
        self._stop_at = time.monotonic()
        for route in self.routes.values():
            if route.transport is not None:
                route.transport.stop_retrying()
        if reason in SIGNAL_STOPS:
            self.notify(f"stopping: waiting up to {self.grace:g} s for {self.in_flight} requests (Ctrl-C again to quit now)")

    def _check_health(self, stage: Stage) -> None:
        """Stop a run that only spends: collapsed yield or a dead teacher."""
        window = self.yield_window
        if len(self.recent) >= window:
            useful = sum(1 for k in self.recent if k > 0)
            if useful < self.min_yield * window:
                message = stage.low_yield(useful, window)
                if message:
                    raise RunStopped("low-yield", message, exit_code=1)
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            raise RunStopped(
                "teacher-unavailable",
                f"the last {self.consecutive_failures} requests failed (each after the retries its error allows), the last with: "
                f"{self.last_error[:300]} (hint: check the teacher at --base-url, or run `selfinstruct doctor`; "
                f"re-run the same command to resume)",
                exit_code=1,
            )

    def outcome(self, useful: int) -> None:
        """A job's yield (records it kept), for the low-yield check."""
        self.recent.append(useful)

    # ---- the loop -----------------------------------------------------------------------

    async def run_stage(self, stage: Stage) -> None:
        """Run a stage's jobs until it has no more, a stop is asked, or something fails; the manifest is saved on every exit."""
        if stage not in self.stages:
            self.stages.append(stage)
        self._running = stage
        self.status, self.stop_reason = "running", None
        self.recent.clear()
        pending: set[asyncio.Task] = set()
        wake = self._wake = asyncio.Event()
        self._handling.clear()
        self.save_manifest(force=True)
        try:
            while True:
                self._check_health(stage)
                # A job handling a reply that came back is not in flight: the window counts only the others.
                while not self.stopping and len(pending) - len(self._handling) < stage.window:
                    job = stage.next_job(len(pending))  # every unfinished job: the stage's own estimates count them all
                    if job is None:
                        break
                    task = asyncio.ensure_future(self._guard(job))
                    task.add_done_callback(self._job_done)
                    pending.add(task)
                if not pending:
                    break
                if self.stopping:
                    await self._drain(pending)
                    break
                if not wake.is_set():
                    await self._sleep_until(wake, 0.25)
                wake.clear()
                done = {task for task in pending if task.done()}
                pending -= done
                self._handling -= done  # their done callbacks may not have run yet
                self._raise_first(done)
                self.save_manifest()
                if self.on_progress:
                    self.on_progress(self, stage)
            if self.stopping:
                raise RunStopped(self.stopping, "stopped on request")
            stage.finish()
            self.status = "completed"
        except RunStopped as stop:
            self.stop_reason = stop.reason
            self.status = stop.reason if stop.reason in SIGNAL_STOPS else "stopped"
            if not self.stopping:
                self.request_stop(stop.reason)
            await self._drain(pending)
            raise
        except BaseException:
            # A second signal (cancelled), or an error no job can go on from (a bad key, a full disk).
            self.status = self.stopping if self.stopping in SIGNAL_STOPS else "failed"
            self.stop_reason = self.stopping if self.stopping in SIGNAL_STOPS else self.stop_reason
            await self._cancel(pending)
            raise
        finally:
            self.save_manifest(force=True)

    def _job_done(self, task: asyncio.Task) -> None:
        self._handling.discard(task)
        if self._wake is not None:
            self._wake.set()

    @staticmethod
    async def _sleep_until(event: asyncio.Event, seconds: float) -> None:
        """Wait for an event at most `seconds` (asyncio.timeout where Python has it: wait_for costs a task)."""
        deadline = getattr(asyncio, "timeout", None)
        try:
            if deadline is not None:
                async with deadline(seconds):
                    await event.wait()
            else:  # pragma: no cover - Python 3.10
                await asyncio.wait_for(event.wait(), seconds)
        except (asyncio.TimeoutError, TimeoutError):
            pass

    @staticmethod
    async def _guard(job: Callable[[], Awaitable[None]]) -> None:
        try:
            await job()
        except Halted:
            pass

    @staticmethod
    def _raise_first(done: set[asyncio.Task]) -> None:
        """Retrieve every finished job's exception (none is left to asyncio), then raise the first."""
        errors = [task.exception() for task in done if not task.cancelled()]
        failure = next((error for error in errors if error is not None), None)
        if failure is not None:
            raise failure

    async def _drain(self, pending: set[asyncio.Task]) -> None:
        """Let requests in flight land (they are paid for) until --grace after the stop, then cancel the rest."""
        if not pending:
            return
        left = max(0.0, self.grace - (time.monotonic() - self._stop_at))
        done, rest = await asyncio.wait(pending, timeout=left)
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved: a job failing while the run stops is not news
        pending.clear()
        await self._cancel(rest)

    @staticmethod
    async def _cancel(tasks: set[asyncio.Task]) -> None:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---- manifest -----------------------------------------------------------------------

    def manifest(self) -> dict:
        """Every stage's sections, with counts, usage and cost across stages, so the card's table adds up."""
        m: dict = {"selfinstruct_version": __version__, "command": self.command, "created": self.created, "updated": _now(),
                   "status": self.status, "stop_reason": self.stop_reason}
        m["teacher"] = {"model": self.model, "endpoint_kind": endpoint_kind(self.base_url)}
        if len(self.routes) > 1:
            m["teachers"] = {r.name: {"model": r.model, "endpoint_kind": endpoint_kind(r.base_url), "base_url": public_url(r.base_url),
                                      "price_in_per_1m": r.price.input if r.price else None,
                                      "price_out_per_1m": r.price.output if r.price else None}
                             for r in self.routes.values()}
        for stage in self.stages:
            stage.describe(m)
        names = list(dict.fromkeys([s for stage in self.stages for s in stage.ledger_stages] + list(self.usage)))
        stages = {}
        for name in names:
            t = self.usage.get(name) or Tally()
            if not t.requests and name not in self._declared():
                continue
            stages[name] = {"requests": t.requests, "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
                            "usd": round(self.stage_usd(name), 6)}
        tallies = list(self.usage.values())
        kept, rejected = 0, collections.Counter()
        for stage in self.stages:
            k, r = stage.counts()
            kept += k
            rejected.update(r)
        estimated = sum(t.estimated_requests for t in tallies)
        m["counts"] = {"kept": kept, "rejected": dict(sorted(rejected.items())), "requests": sum(t.requests for t in tallies),
                       "failed_requests": sum(t.failed_requests for t in tallies), "attempts": sum(t.attempts for t in tallies),
                       "attempt_errors": dict(sorted(sum((t.attempt_errors for t in tallies), collections.Counter()).items()))}
        m["usage"] = {"prompt_tokens": sum(s["prompt_tokens"] for s in stages.values()),
                      "completion_tokens": sum(s["completion_tokens"] for s in stages.values()),
                      "estimated": estimated > 0, "estimated_requests": estimated}
        m["cost"] = {
            "usd": round(sum(s["usd"] for s in stages.values()), 6),
            "priced": self.price is not None,
            "price_in_per_1m": self.price.input if self.price else None,
            "price_out_per_1m": self.price.output if self.price else None,
            "price_source": self.price.source if self.price else None,
            "possibly_billed": self.possibly_billed(),
        }
        m["stages"] = stages
        for route in self.routes.values():
            describe = getattr(route.transport, "describe", None)  # a batch transport adds its batches
            if describe is not None:
                describe(m)
        m["elapsed_seconds"] = round(time.monotonic() - self.started, 1)
        return m

    def _declared(self) -> set[str]:
        return {s for stage in self.stages for s in stage.ledger_stages}

    def save_manifest(self, force: bool = False) -> None:
        """Rewrite the manifest atomically, at most once a second unless forced."""
        now = time.monotonic()
        if force or now - self._last_manifest >= 1.0:
            self.run.write_manifest(self.manifest())
            self._last_manifest = now

    @property
    def tally(self) -> Tally:
        """Everything so far in one Tally, for the progress line and the summary."""
        total = Tally()
        for t in self.usage.values():
            total.requests += t.requests
            total.failed_requests += t.failed_requests
            total.prompt_tokens += t.prompt_tokens
            total.completion_tokens += t.completion_tokens
            total.estimated_requests += t.estimated_requests
            total.attempts += t.attempts
            total.attempt_errors.update(t.attempt_errors)
        for stage in self.stages:
            kept, rejected = stage.counts()
            total.kept += kept
            total.rejected.update(rejected)
        return total


async def drive(engine: Engine, stage: Stage, make_transport: Callable[[], Transport]) -> int:
    """Run one stage with signal handling: the first SIGINT/SIGTERM stops gracefully, a second at once; returns the exit code."""
    loop = asyncio.get_running_loop()
    engine.routes["teacher"].make = make_transport
    for route in engine.routes.values():
        route.transport = route.make()
    received: list[int] = []
    main = asyncio.current_task()

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            engine.request_stop("interrupted" if signum == signal.SIGINT else "terminated")
        elif main is not None:
            main.cancel()

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
    try:
        await engine.run_stage(stage)
    except RunStopped:
        if received:
            return 128 + received[0]
        raise
    except asyncio.CancelledError:
        return 128 + received[0] if received else 130
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        for route in engine.routes.values():
            close = getattr(route.transport, "aclose", None)
            if close is not None:
                await close()
    return 128 + received[0] if received else 0
