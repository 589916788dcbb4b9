"""The Batch API transport: requests become JSONL batch files, submitted, polled, and answered by custom_id.

The engine asks one request at a time (`complete()`), exactly as online; this transport queues the
request and a background task sends the queue as batch files once it stops growing (a stage hands
out a whole wave at once), polls the batches and resolves each request from its output or error
line. File and batch ids go into the ledger (`Engine.note`) before anything depends on them, so a
run killed while a batch runs picks the same batch up and never submits a line twice.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable

from selfinstruct.errors import TeacherError
from selfinstruct.pricing import BATCH_DISCOUNT, batch_price
from selfinstruct.teacher import (
    BatchCallFailed,
    BatchClient,
    Completion,
    MalformedReply,
    OversizedReply,
    RequestCancelled,
    RequestFailed,
    TeacherSettings,
    Usage,
    chat_params,
    read_completion,
)

# The provider's limits per input file.
MAX_LINES = 50_000
MAX_BYTES = 200 * 1024 * 1024
# A wave is dispatched in one go: the queue is sent once it has not grown for this long.
QUIET_SECONDS = 0.3
# Polling backs off from --poll-interval to this.
MAX_POLL_SECONDS = 60.0
TERMINAL = ("completed", "failed", "expired", "cancelled")
# Error codes of lines the batch never ran: sent again, not counted as attempts.
NOT_RUN = ("batch_expired", "batch_cancelled")
# Jobs a batch stage may have in flight: a wave can fill a whole input file.
BATCH_WINDOW = MAX_LINES


@dataclass
class _Waiting:
    """A request the engine is waiting on, and what its earlier tries cost."""

    messages: list[dict[str, str]]
    json_mode: bool
    max_tokens: int | None
    text_messages: Callable[[], list[dict[str, str]]] | None
    may_retry_billed: Callable[[Usage], bool] | None
    future: asyncio.Future
    started: float
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    wasted: Usage = field(default_factory=Usage)
    sent_json: bool = False
    sent_messages: list[dict[str, str]] | None = None


@dataclass
class _Batch:
    """One submitted batch: its input file, its lines, and what the server last said of it."""

    id: str
    file_id: str
    request_ids: list[str]
    status: str = "validating"
    counts: dict = field(default_factory=dict)
    collected: bool = False
    failure: str = ""


def retryable_status(code: int) -> bool:
    return code in (408, 409, 425, 429) or code >= 500


class BatchTransport:
    """The engine's transport over the Batch API: complete() waits for the request's line in its batch's output."""

    def __init__(self, client: BatchClient, settings: TeacherSettings, engine, *, poll_interval: float = 5.0,
                 discount: float | None = None, notify: Callable[[str], None] | None = None,
                 max_lines: int = MAX_LINES, max_bytes: int = MAX_BYTES, quiet_seconds: float = QUIET_SECONDS,
                 route: str = "teacher") -> None:
        self.client = client
        # The engine route this transport serves: its notes carry it, so two batch routes never collect each other's batches.
        self.route = route
        self.settings = settings
        self.engine = engine
        self.poll_interval = poll_interval
        self.discount = discount
        self.notify = notify or (lambda message: None)
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.quiet_seconds = quiet_seconds
        self.json_mode_error: str | None = None
        self.token_param = "max_tokens"
        self.waiting: dict[str, _Waiting] = {}
        self.queue: list[str] = []
        self.batches: dict[str, _Batch] = {}
        # Input files uploaded whose batch was never created (a kill in between): created on start.
        self.orphans: dict[str, list[str]] = {}
        # Where each unfinished request was last submitted: a batch id, or "file:<id>" for an orphan file.
        self.holder: dict[str, str] = {}
        # Lines of requests not asked (again) yet, from batches collected on resume.
        self.ready: dict[str, tuple[dict | None, _Batch]] = {}
        self._last_enqueue = 0.0
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._recover([n for n in engine.notes if n.get("route", "teacher") == route])

    # ---- resume -------------------------------------------------------------------------

    def _recover(self, notes: list[dict]) -> None:
        """Rebuild files, batches and who holds each unfinished request from the ledger's notes."""
        files: dict[str, list[str]] = {}
        ended: dict[str, dict] = {}
        for note in notes:
            kind = note.get("status")
            if kind == "batch-file":
                files[note["file_id"]] = list(note.get("request_ids") or ())
                for rid in files[note["file_id"]]:
                    self.holder[rid] = f"file:{note['file_id']}"
            elif kind == "batch":
                ids = files.get(note["file_id"], [])
                self.batches[note["batch_id"]] = _Batch(note["batch_id"], note["file_id"], ids)
                for rid in ids:
                    self.holder[rid] = note["batch_id"]
            elif kind == "batch-end":
                ended[note["batch_id"]] = note
        made = {b.file_id for b in self.batches.values()}
        done = self.engine.replies
        for file_id, ids in files.items():
            if file_id not in made and any(self.holder.get(rid) == f"file:{file_id}" and rid not in done for rid in ids):
                self.orphans[file_id] = ids
        for batch in self.batches.values():
            if batch.id in ended:
                batch.status = ended[batch.id].get("batch_status", batch.status)
                batch.counts = ended[batch.id].get("request_counts") or {}
            # Nothing left to collect when every line finished or went into a later batch.
            batch.collected = not any(self.holder.get(rid) == batch.id and rid not in done for rid in batch.request_ids)
        for rid in list(self.holder):
            if rid in done:
                del self.holder[rid]

    # ---- the engine's side --------------------------------------------------------------

    async def complete(self, messages: list[dict[str, str]], json_mode: bool = False, max_tokens: int | None = None,
                       text_messages: Callable[[], list[dict[str, str]]] | None = None,
                       may_retry_billed: Callable[[Usage], bool] | None = None, request_id: str | None = None) -> Completion:
        """Queue the request (or wait for the batch that already holds it) and return its reply."""
        if request_id is None:
            raise ValueError("a batch request needs its request_id (the batch line's custom_id)")
        if self._stopping:
            raise RequestCancelled(0, Usage(), [])
        self._start()
        waiting = _Waiting(messages, json_mode, max_tokens, text_messages, may_retry_billed,
                           asyncio.get_running_loop().create_future(), time.monotonic())
        self.waiting[request_id] = waiting
        try:
            if request_id in self.ready:
                self._settle(request_id, *self.ready.pop(request_id))
            elif request_id not in self.holder:
                self._enqueue(request_id)
            # else a live batch (or an uploaded file) holds it: it is never sent twice
            return await waiting.future
        finally:
            self.waiting.pop(request_id, None)

    def stop_retrying(self) -> None:
        """Submit nothing more; requests waiting end now (their batches run on and resume collects them)."""
        self._stopping = True
        unsent = [rid for rid in self.queue if rid in self.waiting]
        if unsent:  # never uploaded, so never billed: the engine must not count them as possibly billed
            try:
                self._note({"status": "batch-unsent", "unsent_ids": unsent})
            except Exception:  # the run is stopping anyway; they are then counted as possibly billed, the safe side
                pass
        for waiting in self.waiting.values():
            if not waiting.future.done():
                waiting.future.set_exception(RequestCancelled(waiting.attempts, waiting.wasted, waiting.errors))

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.client.aclose()

    def live(self) -> list[str]:
        """Batches submitted and not yet collected."""
        return [b.id for b in self.batches.values() if not b.collected]

    def describe(self, manifest: dict) -> None:
        """The manifest's batch section: every batch with its status and counts."""
        price = self.engine.routes[self.route].price
        source = price.source if price else None
        # The share off the online price: --batch-discount, else half, unless the table named a batch price.
        discount = self.discount if self.discount is not None else (None if (source or "").startswith("prices.toml:batch.") else BATCH_DISCOUNT)
        batches = [{"id": b.id, "input_file_id": b.file_id, "requests": len(b.request_ids), "status": b.status,
                    "request_counts": b.counts} | ({"route": self.route} if self.route != "teacher" else {}) for b in self.batches.values()]
        if self.route != "teacher" and "batch" in manifest:  # another route's batches join the teacher's list
            manifest["batch"]["batches"].extend(batches)
            return
        manifest["batch"] = {"discount": discount, "price_source": source, "poll_interval": self.poll_interval, "batches": batches}

    # ---- queue --------------------------------------------------------------------------

    def _note(self, entry: dict) -> None:
        self.engine.note(entry if self.route == "teacher" else {**entry, "route": self.route})

    def _start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.ensure_future(self._run())

    def _enqueue(self, request_id: str) -> None:
        self.holder.pop(request_id, None)
        self.queue.append(request_id)
        self._last_enqueue = time.monotonic()
        if self._wake is not None:
            self._wake.set()

    def _fail_all(self, exc: BaseException) -> None:
        for waiting in self.waiting.values():
            if not waiting.future.done():
                waiting.future.set_exception(exc)

    async def _run(self) -> None:
        """Send the queue when it is quiet, poll live batches with backoff, collect the finished ones."""
        delay = self.poll_interval
        next_poll = 0.0
        try:
            while True:
                now = time.monotonic()
                changed = False
                try:
                    for file_id in list(self.orphans):
                        if self._stopping:
                            break
                        # A kill between create and its note leaves a batch the ledger does not name: look first.
                        await self._create(file_id, self.orphans[file_id], look_first=True)
                        changed = True
                    if self.queue and not self._stopping and (now - self._last_enqueue >= self.quiet_seconds or len(self.queue) >= self.max_lines):
                        await self._submit()
                        changed = True
                    if now >= next_poll:
                        for batch in [b for b in self.batches.values() if not b.collected]:
                            changed = await self._check(batch) or changed
                        delay = self.poll_interval if changed else min(delay * 1.5, max(MAX_POLL_SECONDS, self.poll_interval))
                        next_poll = time.monotonic() + delay
                except BatchCallFailed as failed:
                    if not failed.transient:
                        raise
                    self.notify(f"batch API: {failed.message}; trying again in {delay:.0f} s")
                    delay = min(delay * 2, max(MAX_POLL_SECONDS, self.poll_interval))
                    next_poll = time.monotonic() + delay
                    self._last_enqueue = time.monotonic() + delay  # the queue waits as long
                wait = next_poll - time.monotonic()
                if self.queue and not self._stopping:
                    wait = min(wait, self._last_enqueue + self.quiet_seconds - time.monotonic())
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=max(wait, 0.01))
                except asyncio.TimeoutError:
                    pass
        except asyncio.CancelledError:
            raise
        except TeacherError as exc:
            self._fail_all(exc)
        except BatchCallFailed as failed:
            self._fail_all(TeacherError(failed.message, "check the teacher's Batch API, or run without --batch"))
        except Exception as exc:  # a bug must not leave every request waiting forever
            self._fail_all(exc)

    def _line(self, request_id: str) -> bytes:
        waiting = self.waiting[request_id]
        messages, json_mode = waiting.messages, waiting.json_mode
        if json_mode and self.json_mode_error and waiting.text_messages is not None:
            messages, json_mode = waiting.text_messages(), False
        waiting.sent_messages, waiting.sent_json = messages, json_mode
        body = chat_params(self.settings, messages, json_mode, waiting.max_tokens, self.token_param)
        line = {"custom_id": request_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
        return json.dumps(line, ensure_ascii=False).encode() + b"\n"

    async def _submit(self) -> None:
        """Send the queue as input files of at most max_lines lines and max_bytes bytes, a batch each."""
        while self.queue and not self._stopping:
            chunk: list[str] = []
            parts: list[bytes] = []
            size = 0
            for rid in self.queue:
                if rid not in self.waiting:  # given up meanwhile (a stop): not sent
                    chunk.append(rid)
                    continue
                line = self._line(rid)
                if parts and (len(parts) >= self.max_lines or size + len(line) > self.max_bytes):
                    break
                chunk.append(rid)
                parts.append(line)
                size += len(line)
            ids = [rid for rid in chunk if rid in self.waiting]
            if not ids:
                del self.queue[: len(chunk)]
                continue
            file_id = await self.client.upload(b"".join(parts), f"selfinstruct-{secrets.token_hex(4)}.jsonl")
            # The file's lines reach the ledger before the batch exists: a kill now finds the file, not a second upload.
            self._note({"status": "batch-file", "file_id": file_id, "request_ids": ids})
            del self.queue[: len(chunk)]
            for rid in ids:
                self.holder[rid] = f"file:{file_id}"
            self.orphans[file_id] = ids
            await self._create(file_id, ids)

    async def _create(self, file_id: str, ids: list[str], look_first: bool = False) -> None:
        try:
            made = await self.client.find(file_id) if look_first else None
            if made is None:
                made = await self.client.create(file_id, {"selfinstruct": self.engine.run.path.name[:500]})
        except BatchCallFailed as failed:
            if failed.transient:
                raise
            del self.orphans[file_id]
            for rid in ids:
                self._fail(rid, "batch-rejected", failed.message, None)
            return
        self._note({"status": "batch", "batch_id": made["id"], "file_id": file_id})
        del self.orphans[file_id]
        batch = _Batch(made["id"], file_id, ids, made.get("status") or "validating", made.get("request_counts") or {})
        self.batches[batch.id] = batch
        for rid in ids:
            if self.holder.get(rid) == f"file:{file_id}":
                self.holder[rid] = batch.id
        self.notify(f"batch {batch.id}: {len(ids):,} requests submitted")

    # ---- polling ------------------------------------------------------------------------

    async def _check(self, batch: _Batch) -> bool:
        """Retrieve a batch; collect it once it ended. Whether its status changed (counts alone do not reset the backoff)."""
        info = await self.client.retrieve(batch.id)
        status, counts = info.get("status") or batch.status, info.get("request_counts") or {}
        changed = status != batch.status
        if (status, counts) != (batch.status, batch.counts):
            self.notify(f"batch {batch.id}: {status}, {counts.get('completed', 0):,}/{counts.get('total', len(batch.request_ids)):,} "
                        f"done, {counts.get('failed', 0):,} failed")
        batch.status, batch.counts = status, counts
        if status in TERMINAL:
            await self._collect(batch, info)
            return True
        return changed

    async def _collect(self, batch: _Batch, info: dict) -> None:
        """Download the output and error files and settle every line of the batch by its custom_id."""
        lines: dict[str, dict] = {}
        for key in ("output_file_id", "error_file_id"):
            if info.get(key):
                for raw in (await self.client.content(info[key])).splitlines():
                    if raw.strip():
                        obj = json.loads(raw)
                        lines[str(obj.get("custom_id"))] = obj
        if batch.status == "failed":
            errors = ((info.get("errors") or {}).get("data") or [])
            batch.failure = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors[:3]) or "the batch failed"
        for rid in batch.request_ids:
            if self.holder.get(rid) != batch.id or rid in self.engine.replies:
                continue
            if rid in self.waiting:
                self._settle(rid, lines.get(rid), batch)
            else:
                self.ready[rid] = (lines.get(rid), batch)
        batch.collected = True
        self._note({"status": "batch-end", "batch_id": batch.id, "batch_status": batch.status, "request_counts": batch.counts})

    # ---- one line -----------------------------------------------------------------------

    def _settle(self, rid: str, line: dict | None, batch: _Batch) -> None:
        """Resolve a waiting request from its batch line, or queue it for the next batch."""
        waiting = self.waiting[rid]
        self.holder.pop(rid, None)
        if line is None or (line.get("error") and not line.get("response")):
            code = (line or {}).get("error", {}).get("code") if line else None
            if batch.status == "failed" and line is None:
                return self._fail(rid, "batch-failed", batch.failure, None)
            if code in NOT_RUN or line is None:
                return self._enqueue(rid)  # never ran (expired, cancelled): the same line goes again
            waiting.attempts += 1
            waiting.errors.append(str(code))
            return self._retry_or_fail(rid, str(code), f"{code}: {line['error'].get('message')}", None)
        waiting.attempts += 1
        response = line["response"]
        status_code = int(response.get("status_code") or 0)
        body = response.get("body") or {}
        if status_code == 200:
            limit = waiting.max_tokens or self.settings.max_tokens
            try:
                content, finish, usage = read_completion(body, waiting.sent_messages or waiting.messages, limit)
            except MalformedReply as exc:
                kind = "oversized" if isinstance(exc, OversizedReply) else "malformed"
                waiting.errors.append(kind)
                if exc.usage:
                    waiting.wasted.add(exc.usage)
                    if waiting.may_retry_billed is not None and not waiting.may_retry_billed(exc.usage):
                        return self._fail(rid, kind, f"not retried: another attempt could pass --max-cost ({exc})", None)
                if isinstance(exc, OversizedReply):
                    return self._fail(rid, kind, str(exc), None)
                return self._retry_or_fail(rid, kind, str(exc), None)
            waiting.future.set_result(Completion(
                content=content, finish_reason=finish, usage=usage, response_id=body.get("id"), attempts=waiting.attempts,
                latency=time.monotonic() - waiting.started, wasted=waiting.wasted, errors=waiting.errors, json_mode=waiting.sent_json))
            return None
        error = body.get("error") if isinstance(body, dict) else None
        message = f"HTTP {status_code}: {(error or {}).get('message') or body}"[:300]
        waiting.errors.append(f"http-{status_code}")
        text = message.lower()
        if status_code in (400, 422) and waiting.sent_json and waiting.text_messages is not None and (
                "response_format" in text or "json_object" in text or "json mode" in text):
            self.json_mode_error = message  # no JSON mode: this and later lines go as text
            return self._enqueue(rid)
        if status_code in (400, 422) and self.token_param == "max_tokens" and "max_completion_tokens" in text:
            self.token_param = "max_completion_tokens"
            return self._enqueue(rid)
        if retryable_status(status_code):
            return self._retry_or_fail(rid, f"http-{status_code}", message, status_code)
        return self._fail(rid, "APIStatusError", message, status_code)

    def _retry_or_fail(self, rid: str, kind: str, message: str, status: int | None) -> None:
        """An error line goes into the next batch while --retries allows."""
        if self.waiting[rid].attempts <= self.settings.retries and not self._stopping:
            self._enqueue(rid)
        else:
            self._fail(rid, kind, message, status)

    def _fail(self, rid: str, kind: str, message: str, status: int | None) -> None:
        waiting = self.waiting.get(rid)
        if waiting is None or waiting.future.done():
            return
        waiting.future.set_exception(RequestFailed(kind, message, max(waiting.attempts, 1), status, waiting.wasted, waiting.errors))


def transport_factory(cfg, settings: TeacherSettings, api_key: str | None, engine, route: str = "teacher"):
    """What drives a route's requests (engine.add_route's make, or the run's teacher): the online Teacher, or with --batch this module's transport."""
    from selfinstruct.teacher import online_transport

    if not cfg.batch:
        # --base-url repeated: the run's teacher is a pool of the replicas (a judge route has its own endpoint).
        replicas = getattr(cfg, "replicas", ()) if route == "teacher" else ()
        return lambda: online_transport(settings, replicas, api_key)

    def notify(message: str) -> None:
        if not cfg.quiet:
            engine.notify(message)

    return lambda: BatchTransport(BatchClient(settings, api_key), settings, engine, poll_interval=cfg.poll_interval,
                                  discount=cfg.batch_discount, notify=notify, route=route)


def run_price_for(cfg, price):
    """The price a run is charged: with --batch, the batch price."""
    return batch_price(price, cfg.model, cfg.batch_discount) if cfg.batch else price


def interrupted_note(command: str) -> str:
    """What a stopped batch run says: its batches run on at the provider."""
    return (f"batches keep running at the provider and are collected when you resume: {command}  "
            f"(to cancel them instead: {command} --cancel-batches)")


def cancel_batches(run, cfg, api_key: str | None, echo: Callable[[str], None]) -> int:
    """--cancel-batches: cancel every batch of the run that has not ended; finished lines stay in the ledger."""
    from selfinstruct.engine import teacher_settings
    from selfinstruct.rundir import LEDGER

    notes = [e for e in run.load(LEDGER) if e.get("status") in ("batch", "batch-end")]
    ended = {e["batch_id"] for e in notes if e["status"] == "batch-end"}
    live = [e["batch_id"] for e in notes if e["status"] == "batch" and e["batch_id"] not in ended]

    async def cancel_all() -> None:
        client = BatchClient(teacher_settings(cfg), api_key)
        try:
            for batch_id in live:
                info = await client.retrieve(batch_id)
                if info.get("status") in TERMINAL:
                    echo(f"batch {batch_id}: already {info['status']}")
                    continue
                info = await client.cancel(batch_id)
                echo(f"batch {batch_id}: {info.get('status')}")
        finally:
            await client.aclose()

    if not live:
        echo(f"{run.path}: no batch is running")
        return 0
    from selfinstruct.dirlock import DirectoryLock

    # A run still going would send the lines a cancel leaves unrun again: it must be stopped first.
    with DirectoryLock(run.path, "--cancel-batches"):
        asyncio.run(cancel_all())
    echo("re-run the command without --cancel-batches to resume: lines the batches finished are kept, the rest go again")
    return 0


def check_batches(engine, cfg) -> None:
    """Refuse to resume online a run whose batches still run: their lines would be paid twice."""
    if cfg.batch:
        return
    ended = {n["batch_id"] for n in engine.notes if n.get("status") == "batch-end"}
    live = [n["batch_id"] for n in engine.notes if n.get("status") == "batch" and n["batch_id"] not in ended]
    if live:
        from selfinstruct.errors import OutputError

        raise OutputError(f"{engine.run.path}: {len(live)} batches of this run may still be running at the provider ({', '.join(live[:3])})",
                          "add --batch to resume and collect them, or cancel them first with --cancel-batches")
