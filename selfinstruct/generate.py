"""The generate run: seeds → prompts → teacher → parse → rules → dedup → run directory."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import math
import random
import shlex
import time
from dataclasses import dataclass, field
from typing import Callable

from selfinstruct import __version__
from selfinstruct.config import GenerateConfig
from selfinstruct.errors import OutputError, RunStopped
from selfinstruct.parsing import ParsedItem, parse_reply
from selfinstruct.pricing import Price, endpoint_kind, estimate_prompt_tokens, estimate_tokens
from selfinstruct.prompts import Template
from selfinstruct.rules import RuleSettings, check
from selfinstruct.rundir import LEDGER, RECORDS, REJECTED, RunDir
from selfinstruct.seeds import SeedSet, SeedTask
from selfinstruct.similarity import DedupIndex
from selfinstruct.teacher import Completion, RequestFailed, Teacher, Usage

# Until a few requests are back, assume half the asked-for tasks survive the filters.
PRIOR_YIELD = 0.5
# Stop when this many requests in a row failed after retries: the teacher is down.
MAX_CONSECUTIVE_FAILURES = 20


def request_rng(seed: int, request_no: int) -> random.Random:
    """The rng of one request, derived from the run seed so sampling survives resume and reordering."""
    return random.Random(f"{seed}:{request_no}")


def sample_examples(seeds: SeedSet, k: int, rng: random.Random) -> list[SeedTask]:
    """k distinct seed tasks for one prompt."""
    return rng.sample(list(seeds.tasks), min(k, len(seeds.tasks)))


def render_prompt(
    template: Template, examples: list[SeedTask], cfg: GenerateConfig, rng: random.Random, json_mode: bool | None = None
) -> list[dict[str, str]]:
    """Chat messages asking for cfg.per_request new tasks, showing one instance of each example."""
    shown = []
    for task in examples:
        inst = rng.choice(task.instances)
        shown.append({"instruction": task.instruction, "input": inst.input, "output": inst.output})
    json_mode = cfg.json_mode if json_mode is None else json_mode
    return template.render(examples=shown, num_tasks=cfg.per_request, start_index=1, json_mode=json_mode)


def apply_rules(item: ParsedItem, settings: RuleSettings) -> tuple[str, str] | None:
    """The rejection (reason, detail) for a parsed item, or None when it passes."""
    if item.problem:
        return item.problem, item.detail
    return check(item.instruction, item.input, item.output, settings)


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


class Generation:
    """One generate run over a run directory; owns the counters, the dedup index and the files."""

    def __init__(
        self,
        cfg: GenerateConfig,
        seeds: SeedSet,
        template: Template,
        run: RunDir,
        price: Price | None,
        command: str,
        on_progress: Callable[["Generation"], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.seeds = seeds
        self.template = template
        self.run = run
        self.price = price
        self.command = command
        self.on_progress = on_progress
        self.lang = cfg.lang or "zh"
        self.rules = RuleSettings(lang=self.lang, enabled=frozenset(r for r in RuleSettings().enabled if r not in cfg.no_rule))
        self.index = DedupIndex(cfg.similarity)
        self.tally = Tally()
        self.next_request = 1
        self.status = "running"
        self.stop_reason: str | None = None
        self.started = time.monotonic()
        self.created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.recent: collections.deque[int] = collections.deque(maxlen=cfg.yield_window)
        self.consecutive_failures = 0
        self.sample_reply = ""
        self.sample_finish: str | None = None
        self.last_error = ""
        # The server's refusal of response_format, once seen: the run then asks in the text template.
        self.json_fallback: str | None = None
        # In-flight requests and the most each can still cost; billed-but-unusable replies of
        # requests still retrying (not in the tally yet). Both count against --max-cost.
        self._pending: dict[asyncio.Task, float] = {}
        self._billed_in_flight: dict[int, float] = {}
        self._stop_requested: str | None = None
        self._last_manifest = 0.0

    # ---- resume -------------------------------------------------------------------------

    def load(self) -> int:
        """Reload an earlier attempt: index seeds and kept records, finish half-processed replies."""
        for task in self.seeds.tasks:
            self.index.add(f"seed:{task.id}", task.instruction)
        previous = self.run.load_manifest()
        if previous:
            self.created = previous.get("created", self.created)
            self.json_fallback = (previous.get("teacher") or {}).get("json_mode_fallback")
        # generate --evol-rounds shares these files; evolved records and evol requests are the evolution's to count.
        ledger = [e for e in self.run.load(LEDGER) if e.get("stage", "generate") == "generate"]
        kept = self.run.load(RECORDS)
        rejected = [r for r in self.run.load(REJECTED) if (r.get("meta") or {}).get("stage", "generate") == "generate"]
        done = set()
        for rec in kept:
            self.index.add(rec["id"], rec["instruction"])
            if (rec.get("meta") or {}).get("stage", "generate") == "generate":
                done.add(rec["id"])
        self.tally.kept = len(done)
        for rec in rejected:
            self.tally.rejected[rec.get("reason", "unknown")] += 1
            done.add(rec["id"])
        self.tally.items = len(done)
        replayed = 0
        for entry in ledger:
            self.next_request = max(self.next_request, int(entry["request_no"]) + 1)
            self.tally.requests += 1
            self.tally.add_usage(entry)
            self.tally.add_attempts(entry)
            if entry.get("status") != "ok":
                self.tally.failed_requests += 1
                rid = entry["request_id"]
                if f"{rid}.0" not in done:
                    self._write([], [self._failed_record(entry)])
                continue
            # A reply logged before a kill but not fully written: finish it from the ledger.
            replayed += self._process(entry, skip=done)
        return replayed

    # ---- one reply ----------------------------------------------------------------------

    def _failed_record(self, entry: dict) -> dict:
        """A failed request, kept in rejected.jsonl so nothing it cost goes unseen."""
        return {
            "id": f"{entry['request_id']}.0",
            "instruction": "",
            "input": "",
            "output": "",
            "reason": "request-failed",
            "detail": entry.get("error", ""),
            "meta": self._meta(entry, None, 1),
        }

    def _meta(self, entry: dict, item: ParsedItem | None, share: int) -> dict:
        usage = entry.get("usage") or {}
        return {
            "seed_ids": entry.get("seed_ids", []),
            "template": self.template.name,
            "template_sha256": self.template.sha256,
            "model": self.cfg.model,
            "request_id": entry["request_id"],
            "response_id": entry.get("response_id"),
            "finish_reason": entry.get("finish_reason"),
            "usage": {
                "prompt_tokens": round(usage.get("prompt_tokens", 0) / share, 3),
                "completion_tokens": round(usage.get("completion_tokens", 0) / share, 3),
                "estimated": bool(usage.get("estimated", False)),
            },
            "round": 0,
            "stage": "generate",
            "raw": item.raw if item else "",
        }

    def _process(self, entry: dict, skip: set[str] | frozenset = frozenset()) -> int:
        """Parse, filter and deduplicate one logged reply; append what is new. Returns items written."""
        items = parse_reply(entry.get("content", ""), entry.get("finish_reason"), entry.get("json_mode", self.cfg.json_mode))
        share = max(1, len(items))
        kept, rejected = [], []
        for item in items:
            rid = f"{entry['request_id']}.{item.index}"
            if rid in skip:
                continue
            record = {
                "id": rid,
                "instruction": item.instruction,
                "input": item.input,
                "output": item.output,
                "meta": self._meta(entry, item, share),
            }
            verdict = apply_rules(item, self.rules)
            if verdict is None and self.tally.kept + len(kept) >= self.cfg.n:
                verdict = ("surplus", f"--n {self.cfg.n} already reached")
            if verdict is None and "near-duplicate" not in self.cfg.no_rule:
                match = self.index.add_if_novel(rid, item.instruction)
                if match is not None:
                    verdict = ("near-duplicate", f"ROUGE-L {match.score:.3f} with {match.key}")
                    record["duplicate_of"] = match.key
                    record["duplicate_text"] = match.text
                    record["score"] = round(match.score, 4)
            if verdict is None:
                kept.append(record)
            else:
                record["reason"], record["detail"] = verdict
                rejected.append(record)
        self._write(kept, rejected)
        return len(kept) + len(rejected)

    def _write(self, kept: list[dict], rejected: list[dict]) -> None:
        if kept:
            self.run.append(RECORDS, kept)
        if rejected:
            self.run.append(REJECTED, rejected)
        self.tally.kept += len(kept)
        self.tally.items += len(kept) + len(rejected)
        for rec in rejected:
            self.tally.rejected[rec["reason"]] += 1

    def handle(self, request_no: int, seed_ids: list[str], result: Completion | RequestFailed) -> None:
        """Log a finished request to the ledger first (the source of truth), then its records."""
        rid = f"r{request_no:06d}"
        entry: dict = {"request_id": rid, "request_no": request_no, "seed_ids": seed_ids, "stage": "generate"}
        if isinstance(result, RequestFailed):
            entry.update(
                status="failed",
                error=result.message,
                error_kind=result.kind,
                http_status=result.status,
                attempts=result.attempts,
                errors=result.errors,
                usage={"prompt_tokens": 0, "completion_tokens": 0, "estimated": False},
                wasted=vars(result.wasted),
            )
        else:
            entry.update(
                status="ok",
                response_id=result.response_id,
                finish_reason=result.finish_reason,
                usage=vars(result.usage),
                wasted=vars(result.wasted),
                attempts=result.attempts,
                errors=result.errors,
                json_mode=result.json_mode,
                latency=round(result.latency, 3),
                content=result.content,
            )
        self.run.append(LEDGER, [entry])
        self._billed_in_flight.pop(request_no, None)  # its wasted tokens are in the tally from here on
        self.tally.requests += 1
        self.tally.add_usage(entry)
        self.tally.add_attempts(entry)
        kept_before = self.tally.kept
        if isinstance(result, RequestFailed):
            self.tally.failed_requests += 1
            self.consecutive_failures += 1
            self.last_error = result.message
            self._write([], [self._failed_record(entry)])
        else:
            self.consecutive_failures = 0
            self._process(entry)
            if self.tally.kept == kept_before:
                self.sample_reply, self.sample_finish = result.content, result.finish_reason
        self.recent.append(self.tally.kept - kept_before)

    # ---- money --------------------------------------------------------------------------

    @property
    def usd(self) -> float:
        return self.price.usd(self.tally.prompt_tokens, self.tally.completion_tokens) if self.price else 0.0

    def worst_case_usd(self, messages: list[dict[str, str]]) -> float:
        """The most one request can cost: its prompt plus a full max_tokens reply, on every retry's last try."""
        if not self.price:
            return 0.0
        completion = self.cfg.max_tokens or 4096
        # Estimates can undershoot real tokenisers on CJK text; pad the prompt by half.
        return self.price.usd(estimate_prompt_tokens(messages) * 1.5, completion)

    # ---- stopping -----------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ask the run to stop dispatching (signal handlers call this)."""
        self._stop_requested = reason

    def yield_estimate(self) -> float:
        ok = self.tally.requests - self.tally.failed_requests
        if ok < 5:
            return self.cfg.per_request * PRIOR_YIELD
        return max(self.tally.kept / ok, 0.05)

    def check_health(self) -> None:
        """Stop a run that only spends: collapsed yield or a dead teacher."""
        window = self.cfg.yield_window
        if len(self.recent) >= window and self.tally.kept < self.cfg.n:
            useful = sum(1 for k in self.recent if k > 0)
            if useful < self.cfg.min_yield * window:
                sample = (self.sample_reply or "").strip().replace("\n", "⏎")[:300]
                hint = "check the model, --template and --json-mode, then re-run to resume"
                if not sample and self.sample_finish == "length":
                    # Typical of reasoning models: the whole token budget went to <think>.
                    hint = "the teacher used all of --max-tokens before answering; raise --max-tokens, then re-run to resume"
                raise RunStopped(
                    "low-yield",
                    f"only {useful} of the last {window} requests gave a usable record; stopping instead of spending on. "
                    f"A sample reply (finish_reason {self.sample_finish}): {sample!r} (hint: {hint})",
                    exit_code=1,
                )
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            raise RunStopped(
                "teacher-unavailable",
                f"the last {self.consecutive_failures} requests failed (each after the retries its error allows), the last with: {self.last_error[:300]} "
                f"(hint: check the teacher at --base-url, or run `selfinstruct doctor`; re-run the same command to resume)",
                exit_code=1,
            )

    def max_requests(self) -> int:
        """A hard cap on requests, so no run loops without bound."""
        if self.cfg.max_requests:
            return self.cfg.max_requests
        return math.ceil(self.cfg.n / self.cfg.per_request) * 10 + 100

    # ---- the loop -----------------------------------------------------------------------

    async def run_async(self, teacher: Teacher) -> None:
        """Dispatch requests until --n records are kept, the budget is spent or a stop is asked."""
        pending = self._pending
        self.save_manifest(force=True)
        try:
            while True:
                self.check_health()
                self._fill(teacher, pending)
                if not pending:
                    break
                done, _ = await asyncio.wait(list(pending), timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
                landed = [(task, pending.pop(task)) for task in done]
                # Refill before handling: the new requests wait on the teacher while these replies are
                # parsed and deduplicated, instead of the teacher idling that long every cycle.
                self._fill(teacher, pending, len(landed), sum(worst for _, worst in landed))
                self._handle_landed([task for task, _ in landed])
                self.save_manifest()
                if self.on_progress:
                    self.on_progress(self)
            if self._stop_requested:
                raise RunStopped(self._stop_requested, "stopped on request")
            if teacher.json_mode_error:
                self.json_fallback = teacher.json_mode_error
            self.status = "completed" if self.tally.kept >= self.cfg.n else "stopped"
            if self.status == "stopped":
                raise RunStopped(
                    "max-requests",
                    f"stopped after {self.tally.requests:,} requests (the --max-requests cap) with {self.tally.kept:,} of "
                    f"{self.cfg.n:,} records kept (hint: raise --max-requests and re-run the same command to resume)",
                    exit_code=3,
                )
        except RunStopped as stop:
            self.status = "stopped"
            self.stop_reason = stop.reason
            await self._drain(pending)
            raise
        except BaseException:
            self.status = "failed"
            await self._drain(pending, cancel=True)
            raise
        finally:
            self.save_manifest(force=True)

    def _fill(self, teacher: Teacher, pending: dict[asyncio.Task, float], landed: int = 0, landed_usd: float = 0.0) -> None:
        """Dispatch requests up to --concurrency, the target, the request cap and the budget.

        `landed` replies (worth at most `landed_usd`) are back but not handled yet: they still count.
        """
        while self._can_dispatch(len(pending), landed):
            request_no = self.next_request
            if teacher.json_mode_error:
                self.json_fallback = teacher.json_mode_error
            json_mode = self.cfg.json_mode and not self.json_fallback
            examples, messages = self._prompt(request_no, json_mode)
            # Only --max-cost needs the worst case (it costs a pass over the prompt).
            worst = self.worst_case_usd(messages) if self.cfg.max_cost is not None else 0.0
            if self.cfg.max_cost is not None and self._committed_usd(landed_usd) + worst > self.cfg.max_cost:
                if not pending and not landed:
                    raise RunStopped(
                        "budget",
                        f"stopped at ${self.usd:.4f}: one more request could pass --max-cost ${self.cfg.max_cost:g} "
                        f"(hint: raise --max-cost and re-run the same command to resume)",
                        exit_code=3,
                    )
                return
            self.next_request += 1
            task = asyncio.ensure_future(self._call(teacher, request_no, [t.id for t in examples], messages, json_mode))
            pending[task] = worst

    def _committed_usd(self, landed_usd: float = 0.0) -> float:
        """Spent, plus what in-flight and landed-but-unhandled requests may still cost."""
        return self.usd + landed_usd + sum(self._pending.values()) + sum(self._billed_in_flight.values())

    def _may_retry_billed(self, request_no: int, usage: Usage) -> bool:
        """Record a billed but unusable reply; another attempt only if the budget still holds it."""
        self._billed_in_flight[request_no] = self._billed_in_flight.get(request_no, 0.0) + self.price.usd(usage.prompt_tokens, usage.completion_tokens)
        # The request's own reservation stays in _pending: it covers the next attempt.
        return self._committed_usd() <= self.cfg.max_cost

    def _handle_landed(self, tasks: list[asyncio.Task]) -> None:
        """Handle every landed reply, then raise the first error among them (all are retrieved, none left to asyncio)."""
        errors = [task.exception() for task in tasks]
        for task, error in zip(tasks, errors):
            if error is None:
                self.handle(*task.result())
        failure = next((error for error in errors if error is not None), None)
        if failure is not None:
            raise failure

    async def _drain(self, pending: dict[asyncio.Task, float], cancel: bool = False, grace: float = 10.0) -> None:
        """Let in-flight requests land (their replies are paid for) for a few seconds, then cancel the rest."""
        if not pending:
            return
        if not cancel:
            done, _ = await asyncio.wait(list(pending), timeout=grace)
            for task in done:
                pending.pop(task)
                if not task.cancelled() and task.exception() is None:
                    self.handle(*task.result())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        pending.clear()

    def _can_dispatch(self, in_flight: int, landed: int = 0) -> bool:
        if self._stop_requested or self.tally.kept >= self.cfg.n:
            return False
        if in_flight >= self.cfg.concurrency or self.tally.requests + in_flight + landed >= self.max_requests():
            return False
        # Don't launch requests whose records the target can no longer use.
        return self.tally.kept + (in_flight + landed) * self.yield_estimate() < self.cfg.n

    def _prompt(self, request_no: int, json_mode: bool) -> tuple[list[SeedTask], list[dict[str, str]]]:
        """The examples and messages of one request, the same on every call (the rng is the request's)."""
        rng = request_rng(self.cfg.seed, request_no)
        examples = sample_examples(self.seeds, self.cfg.num_examples, rng)
        return examples, render_prompt(self.template, examples, self.cfg, rng, json_mode)

    async def _call(self, teacher: Teacher, request_no: int, seed_ids: list[str], messages: list[dict[str, str]], json_mode: bool):
        # A server without JSON mode gets the same request rendered as text (same seeds, same rng).
        text = (lambda: self._prompt(request_no, False)[1]) if json_mode else None
        guard = (lambda usage: self._may_retry_billed(request_no, usage)) if self.cfg.max_cost is not None and self.price else None
        try:
            result: Completion | RequestFailed = await teacher.complete(messages, json_mode=json_mode, text_messages=text, may_retry_billed=guard)
        except RequestFailed as failed:
            result = failed
        return request_no, seed_ids, result

    # ---- manifest -----------------------------------------------------------------------

    def manifest(self) -> dict:
        t = self.tally
        usage = {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens, "estimated": t.estimated_requests > 0,
                 "estimated_requests": t.estimated_requests}
        cost = {
            "usd": round(self.usd, 6),
            "priced": self.price is not None,
            "price_in_per_1m": self.price.input if self.price else None,
            "price_out_per_1m": self.price.output if self.price else None,
            "price_source": self.price.source if self.price else None,
        }
        return {
            "selfinstruct_version": __version__,
            "command": self.command,
            "created": self.created,
            "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "status": self.status,
            "stop_reason": self.stop_reason,
            "config": self.cfg.to_dict() | {"lang": self.lang, "base_url": public_url(self.cfg.base_url)},
            "seeds": {"path": self.seeds.path.name, "count": len(self.seeds.tasks), "sha256": self.seeds.sha256, "license": self.seeds.license},
            "templates": {"generate": {"name": self.template.name, "sha256": self.template.sha256}},
            "teacher": {"model": self.cfg.model, "endpoint_kind": endpoint_kind(self.cfg.base_url), "json_mode_fallback": self.json_fallback},
            "filters": {"similarity": self.cfg.similarity, "rules": sorted(self.rules.enabled), "lang": self.lang},
            "counts": {"kept": t.kept, "rejected": dict(sorted(t.rejected.items())), "requests": t.requests, "failed_requests": t.failed_requests,
                       "attempts": t.attempts, "attempt_errors": dict(sorted(t.attempt_errors.items()))},
            "usage": usage,
            "cost": cost,
            "stages": {"generate": {"requests": t.requests, "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens, "usd": cost["usd"]}},
            "elapsed_seconds": round(time.monotonic() - self.started, 1),
        }

    def save_manifest(self, force: bool = False) -> None:
        """Rewrite the manifest atomically, at most once a second unless forced."""
        now = time.monotonic()
        if force or now - self._last_manifest >= 1.0:
            self.run.write_manifest(self.manifest())
            self._last_manifest = now


def public_url(base_url: str | None) -> str | None:
    """A base URL without credentials or query strings (which sometimes carry keys)."""
    if not base_url:
        return None
    from urllib.parse import urlparse

    parts = urlparse(base_url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def project(cfg: GenerateConfig, seeds: SeedSet, template: Template, price: Price | None) -> dict:
    """The --dry-run projection: requests, tokens and dollars for --n, without calling the teacher."""
    rng = request_rng(cfg.seed, 1)
    messages = render_prompt(template, sample_examples(seeds, cfg.num_examples, rng), cfg, rng)
    prompt_tokens = estimate_prompt_tokens(messages)
    per_task = sum(
        estimate_tokens(t.instruction + t.instances[0].input + t.instances[0].output) + 12 for t in seeds.tasks
    ) / len(seeds.tasks)
    completion_tokens = per_task * cfg.per_request
    if cfg.max_tokens:
        completion_tokens = min(completion_tokens, cfg.max_tokens)
    requests = math.ceil(cfg.n / (cfg.per_request * PRIOR_YIELD * 1.4))  # assumes ~70% of items kept
    totals = {"prompt_tokens": int(requests * prompt_tokens), "completion_tokens": int(requests * completion_tokens)}
    return {
        "requests": requests,
        "prompt_tokens_per_request": prompt_tokens,
        "completion_tokens_per_request": int(completion_tokens),
        **totals,
        "usd": price.usd(totals["prompt_tokens"], totals["completion_tokens"]) if price else None,
        "assumed_yield": PRIOR_YIELD * 1.4,
    }


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


def check_resumable(run: RunDir, cfg: GenerateConfig, seeds: SeedSet, template: Template, price: Price | None) -> None:
    """Refuse to resume into a directory made from other seeds, template, language, model or prices."""
    previous = run.load_manifest()
    if not previous:
        return
    old = previous.get("config", {})
    mismatches, flags = teacher_mismatches(previous, cfg.model, price)
    if previous.get("seeds", {}).get("sha256") not in (None, seeds.sha256):
        mismatches.append("seed file contents")
    if previous.get("templates", {}).get("generate", {}).get("sha256") not in (None, template.sha256):
        mismatches.append("template")
    for key in ("lang", "json_mode", "similarity"):
        if key in old and old[key] != getattr(cfg, key) and not (key == "lang" and cfg.lang is None):
            mismatches.append(f"--{key.replace('_', '-')}")
    if mismatches:
        # The exact flags only when they are all that differs; otherwise the original command.
        hint = f"resume with {' '.join(flags)}" if len(flags) == len(mismatches) else "re-run with the original settings to resume"
        raise OutputError(f"{run.path}: holds a run made with a different {', '.join(mismatches)}", f"{hint}, or choose a new --out")
