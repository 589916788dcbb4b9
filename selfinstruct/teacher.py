"""The teacher client: the only module that talks to the OpenAI-compatible API."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import importlib
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlparse

import openai
from openai import AsyncOpenAI
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from selfinstruct.errors import NoCredit, TeacherError
from selfinstruct.pricing import estimate_prompt_tokens, estimate_tokens

# asyncio.timeout where the Python has it (3.11+).
_DEADLINE = getattr(asyncio, "timeout", None)
# Longest we will sleep on a server's Retry-After before trying again.
MAX_RETRY_AFTER = 120.0
# --tpm spends at most this share of a window's tokens at once: a minute's allowance is spread
# over the minute (5 s worth at a time), not spent in one burst then 57 s idle, which servers
# that enforce their limit per second answer with 429s.
TPM_BURST_SHARE = 1 / 12
# A reply whose content runs past --max-tokens by this much is malformed (a server that ignores the
# limit, or loops): rejected as oversized, so no ledger or rejected.jsonl line ever holds megabytes.
MAX_CHARS_PER_TOKEN = 8
OVERSIZE_SLACK_CHARS = 4096
# Whatever --max-tokens says, a body this large is no chat completion.
MAX_REPLY_BYTES = 8 * 1024 * 1024
# How much of an unusable reply an error message quotes.
QUOTE_CHARS = 200


@dataclass(frozen=True)
class TeacherSettings:
    """How to reach and drive the teacher; the key travels separately and is never stored."""

    model: str
    base_url: str | None = None
    timeout: float = 120.0
    retries: int = 6
    concurrency: int = 16  # the most requests in flight: fixed, or the ceiling of an adaptive limit
    adaptive: bool = False  # --concurrency auto: start low, move between 1 and `concurrency` (ConcurrencyLimit)
    rpm: int | None = None
    tpm: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    max_tokens: int | None = 3072


@dataclass
class Usage:
    """Token counts of one request; `estimated` when the server did not report them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False

    def add(self, other: "Usage") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.estimated = self.estimated or other.estimated


@dataclass
class Completion:
    """A reply the teacher sent, with what it cost and how hard it was to get."""

    content: str
    finish_reason: str | None
    usage: Usage
    response_id: str | None
    attempts: int
    latency: float
    # Tokens of earlier attempts that came back unusable (billed all the same).
    wasted: Usage = field(default_factory=Usage)
    # What went wrong on each failed attempt before this one (error_kind), for the manifest.
    errors: list[str] = field(default_factory=list)
    # False when the server has no JSON mode and the request went out as the text template.
    json_mode: bool = False


class RequestFailed(Exception):
    """A request that still failed after all retries; the run records it and goes on."""

    def __init__(
        self, kind: str, message: str, attempts: int, status: int | None, wasted: Usage, errors: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.attempts = attempts
        self.status = status
        self.wasted = wasted
        self.errors = errors or []


class RequestCancelled(Exception):
    """A request given up because the run is stopping: no retry was started; resume sends it again."""

    def __init__(self, attempts: int, wasted: Usage, errors: list[str]) -> None:
        super().__init__("cancelled: the run is stopping")
        self.attempts = attempts
        self.wasted = wasted
        self.errors = errors


class RequestTimeout(Exception):
    """One attempt passed --timeout, counted from connect to the last byte (a trickling reply cannot hold it open)."""


class MalformedReply(Exception):
    """A 200 reply without usable choices; worth another try."""

    def __init__(self, message: str, usage: Usage | None = None) -> None:
        super().__init__(message)
        self.usage = usage


class OversizedReply(MalformedReply):
    """A reply far beyond --max-tokens: billed, not retried, kept only as its size and a bounded prefix."""

    kind = "oversized"

    def __init__(self, message: str, usage: Usage | None, size: int, prefix: str) -> None:
        super().__init__(message, usage)
        self.size = size  # bytes of the body
        self.prefix = prefix  # its first QUOTE_CHARS characters


class UnexpectedReply(MalformedReply):
    """A 200 whose body is an HTML page or an event stream: the same would come back, so not retried."""


def _response_class() -> type:
    """The HTTP response class the SDK hands back as is for cast_to: httpx2's in openai 3, httpx's before."""
    client = next(c for c in openai.DefaultAsyncHttpxClient.__mro__ if c.__name__ == "AsyncClient")
    return importlib.import_module(client.__module__.split(".")[0]).Response


# The raw response, not bytes: its content type says what a reply that is not JSON is. Same cost.
_HTTP_RESPONSE = _response_class()


def _quote(data: bytes | str, limit: int = QUOTE_CHARS) -> str:
    """The start of a reply on one line, for an error message."""
    text = data[: limit * 4].decode("utf-8", "replace") if isinstance(data, bytes) else data[:limit]
    text = text[:limit]
    return repr(text + "…") if len(data) > len(text) else repr(text)


def _no_credit(exc: BaseException) -> bool:
    """A 402, or a 429 whose error is insufficient_quota: the account is out of money, not rate-limited."""
    if not isinstance(exc, openai.APIStatusError):
        return False
    if exc.status_code == 402:
        return True
    return exc.status_code == 429 and "insufficient_quota" in (str(getattr(exc, "code", "")), str(getattr(exc, "type", "")))


def _not_json(raw, exc: ValueError) -> MalformedReply:
    """What a 200 that is not JSON was, with the likely fix: an HTML page and an event stream are named."""
    body = raw.content
    ctype = raw.headers.get("content-type", "") or "no content type"
    head = body.lstrip()[:32].lower()
    if "html" in ctype or head.startswith((b"<!doctype html", b"<html")):
        # The fix before the quote: whoever shortens the message cuts the page, not the advice.
        return UnexpectedReply(
            f"the teacher answered HTTP 200 with an HTML page ({ctype}), not JSON: check --base-url (it usually ends "
            f"in /v1), a web UI, proxy or login page answered in the API's place; it began {_quote(body.lstrip(), 120)}"
        )
    if "event-stream" in ctype or head.startswith((b"data:", b"event:")):
        return UnexpectedReply(
            f"the teacher streamed its reply ({ctype}) although no stream was asked: point --base-url at the server "
            f"itself, or turn off the streaming a proxy in between forces; it began {_quote(body.lstrip(), 120)}"
        )
    return MalformedReply(f"the reply is not JSON ({ctype}, {len(body):,} bytes: {exc}); it began {_quote(body, 120)}")


def _oversized(body: bytes, content: str | None, limit: int | None, messages: list[dict[str, str]], response: dict | None) -> OversizedReply:
    """A reply too large to use or to store, with what it was billed (reported, else estimated)."""
    usage = response.get("usage") if isinstance(response, dict) else None
    if isinstance(usage, dict) and type(usage.get("completion_tokens")) is int:
        billed = Usage(int(usage.get("prompt_tokens") or 0), usage["completion_tokens"])
    else:
        billed = Usage(estimate_prompt_tokens(messages), estimate_tokens(content) if content is not None else len(body) // 4, True)
    size = f"{len(content):,} characters of content, {len(body):,} bytes" if content is not None else f"{len(body):,} bytes"
    allowed = f"--max-tokens {limit} (at most {limit * MAX_CHARS_PER_TOKEN + OVERSIZE_SLACK_CHARS:,} characters)" if limit else "any reply"
    prefix = _quote(content if content is not None else body)
    return OversizedReply(f"oversized reply: {size}, far beyond {allowed}; it began {prefix}", billed, len(body), prefix)


class ModerationUnavailable(Exception):
    """The endpoint has no /v1/moderations (404 or 405, as most local servers answer)."""


class ParameterRejected(Exception):
    """A 400 for a parameter this server spells differently; the request is resent at once without it."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class JsonModeUnsupported(ParameterRejected):
    """The server rejected `response_format`: it has no JSON mode, so the text template must be used."""


def _rejects_json_mode(exc: BaseException) -> bool:
    """A 400/422 that blames response_format (llama.cpp, older vLLM, many proxies)."""
    if not isinstance(exc, (openai.BadRequestError, openai.UnprocessableEntityError)):
        return False
    text = str(exc).lower()
    return "response_format" in text or "json_object" in text or "json mode" in text


def _timed_out(exc: BaseException) -> bool:
    """Whether a timeout error really is one: the aiohttp transport also reports refused and dropped
    connections as connect timeouts, and only the chain of causes tells them apart."""
    chain = []
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    if any(isinstance(c, (TimeoutError, asyncio.TimeoutError)) for c in chain):
        return True
    return not any(isinstance(c, OSError) or type(c).__module__.startswith("aiohttp") for c in chain[1:])


def error_kind(exc: BaseException) -> str:
    """A short name for why one attempt failed: timeout, connection, http-<status> or malformed."""
    if isinstance(exc, RequestTimeout):
        return "timeout"
    if isinstance(exc, openai.APITimeoutError):
        return "timeout" if _timed_out(exc) else "connection"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, NoCredit) or _no_credit(exc):
        return "no-credit"
    if isinstance(exc, openai.APIStatusError):
        return f"http-{exc.status_code}"
    if isinstance(exc, ParameterRejected):
        return f"http-{exc.status}"
    if isinstance(exc, OversizedReply):
        return "oversized"
    return "malformed"


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, JsonModeUnsupported):
        return False  # only with a text rendering to fall back to; see Teacher.complete
    if isinstance(exc, (NoCredit, OversizedReply, UnexpectedReply)) or _no_credit(exc):
        return False  # the same answer would come back (and an oversized one is billed again)
    if isinstance(exc, (RequestTimeout, openai.APITimeoutError, openai.APIConnectionError, MalformedReply, ParameterRejected)):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 425, 429) or exc.status_code >= 500
    # A 200 whose body is not JSON surfaces as a decode error from the SDK.
    return isinstance(exc, ValueError)


def retry_after(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait (`retry-after-ms` or `Retry-After`), if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000.0
        if headers.get("retry-after"):
            return float(headers["retry-after"])
    except ValueError:
        return None  # an HTTP date; fall back to our own backoff
    return None


class _Backoff:
    """Exponential backoff with jitter, replaced by the server's Retry-After when it sends one."""

    def __init__(self) -> None:
        self._exp = wait_exponential_jitter(initial=1.0, max=60.0, jitter=1.0)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ParameterRejected):
            return 0.0  # not a fault of the moment: resend at once, spelled the way the server wants
        asked = retry_after(exc)
        if asked is not None:
            return min(max(asked, 0.0), MAX_RETRY_AFTER)
        return self._exp(state)


class RateLimiter:
    """Keeps requests per minute and tokens per minute under their caps over any 60 s window."""

    def __init__(self, rpm: int | None, tpm: int | None, window: float = 60.0) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.window = window
        self._next_start = 0.0
        self._tokens: collections.deque[list] = collections.deque()  # [time, tokens, limiter]
        self._lock = asyncio.Lock()
        # Token pacing: credit refills at tpm per window up to a burst; a request may overdraw it.
        self._burst = (tpm or 0) * TPM_BURST_SHARE
        self._credit = self._burst
        self._credit_at = time.monotonic()

    def _refill(self, now: float) -> None:
        self._credit = min(self._burst, self._credit + (now - self._credit_at) * self.tpm / self.window)
        self._credit_at = now

    async def acquire(self, tokens: int) -> list[float] | None:
        """Wait for a slot; returns the token entry so the real count can replace the estimate."""
        if not self.rpm and not self.tpm:
            return None
        async with self._lock:
            now = time.monotonic()
            if self.rpm:
                # Even spacing, not bursts: 60/rpm seconds between request starts.
                wait = self._next_start - now
                if wait > 0:
                    await asyncio.sleep(wait)
                    now = time.monotonic()
                self._next_start = max(now, self._next_start) + self.window / self.rpm
            entry = None
            if self.tpm:
                tokens = min(tokens, self.tpm)
                self._refill(now)
                if self._credit < 0:
                    await asyncio.sleep(-self._credit * self.window / self.tpm)
                    now = time.monotonic()
                    self._refill(now)
                while True:
                    while self._tokens and self._tokens[0][0] <= now - self.window:
                        self._tokens.popleft()
                    used = sum(e[1] for e in self._tokens)
                    if used + tokens <= self.tpm or not self._tokens:
                        break
                    await asyncio.sleep(max(0.01, self._tokens[0][0] + self.window - now))
                    now = time.monotonic()
                self._credit -= tokens
                entry = [now, float(tokens), self]
                self._tokens.append(entry)
            return entry

    @staticmethod
    def settle(entry: list | None, tokens: int) -> None:
        """Replace a request's estimated tokens by the real count (and give back what was over-reserved)."""
        if entry is not None:
            entry[2]._credit += entry[1] - tokens
            entry[1] = float(tokens)


def _usage_from(response: dict, messages: list[dict[str, str]], content: str) -> Usage:
    """The server's usage, or an offline estimate when it is missing or clearly wrong."""
    usage = response.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    prompt_ok = type(prompt) is int and prompt > 0
    # Some local servers report completion_tokens 0 or 1 for any reply.
    completion_ok = type(completion) is int and completion >= 0 and not (completion <= 1 and len(content) > 8)
    if prompt_ok and completion_ok:
        return Usage(prompt, completion, False)
    return Usage(
        prompt if prompt_ok else estimate_prompt_tokens(messages),
        completion if completion_ok else estimate_tokens(content),
        True,
    )


def _http_client(settings: TeacherSettings):
    """The SDK's aiohttp transport, sized to --concurrency; None (the SDK default) without aiohttp.

    The default httpx pool polls every pooled connection on each request, O(concurrency) syscalls:
    at 64 in flight that was ~1.8 ms of CPU per request, more than parsing and rules together.
    """
    transport = getattr(openai, "DefaultAioHttpClient", None)
    try:
        import aiohttp  # noqa: F401 - the transport needs it
        from openai._base_client import DEFAULT_CONNECTION_LIMITS
    except ImportError:  # pragma: no cover - aiohttp is a dependency; keep working without it
        return None
    if transport is None:  # pragma: no cover - openai older than the aiohttp transport
        return None
    size = max(settings.concurrency, 1)
    limits = type(DEFAULT_CONNECTION_LIMITS)(max_connections=size, max_keepalive_connections=size, keepalive_expiry=30.0)
    return transport(timeout=settings.timeout, limits=limits)


# --concurrency auto: where the limit starts. One request alone measures the teacher's unloaded latency;
# a server that runs one request at a time then never sees a queue it has to work off.
ADAPTIVE_START = 1
# A round's median latency over the unloaded one: below HOLD there is room (grow), above CUT requests
# queue in the server (cut to what it really works on at once, Little's law: limit / ratio).
LATENCY_HOLD = 1.3
LATENCY_CUT = 2.5
# A timeout, 429, 5xx or dropped connection halves the limit (at most once per round of requests).
DECREASE = 0.5
# Error kinds that mean "too much at once" to the limiter.
OVERLOAD = ("timeout", "connection", "http-429")


class ConcurrencyLimit:
    """How many requests may be in flight: a fixed number, or adaptive between 1 and `most`.

    Adaptive is TCP's congestion control on latency: slow start doubles the limit each round (one
    round = as many replies as the limit) while latency holds, then additive increase (+1 a round);
    a timeout, 429, 5xx or dropped connection halves it, a round whose latency grew past LATENCY_CUT
    times the unloaded latency cuts it to limit / ratio. The first cut ends slow start.
    """

    def __init__(self, most: int, adaptive: bool = False) -> None:
        self.most = max(1, most)
        self.adaptive = adaptive
        self.limit = float(min(ADAPTIVE_START, self.most) if adaptive else self.most)
        self.in_flight = 0
        self.peak = int(self.limit)  # the highest limit reached
        self.timeouts = 0  # attempts that ran past --timeout
        self.overloads = 0  # timeouts, 429s, 5xx and dropped connections
        self.retries = 0  # attempts after a request's first
        self.slow_start = True
        self.baseline: float | None = None  # median latency of a round run alone (limit 1), or the lowest seen
        self._round: list[float] = []
        self._round_full = False  # the limit was reached during this round: more demand than room
        self._cut_at = 0.0  # replies to requests sent before the last cut tell of the old load
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def current(self) -> int:
        """Requests allowed in flight now."""
        return max(1, int(self.limit))

    @property
    def room(self) -> int:
        return self.current - self.in_flight

    async def acquire(self) -> None:
        while self.in_flight >= self.current:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled: pass the slot on
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise
        self.in_flight += 1
        if self.in_flight >= self.current:
            self._round_full = True

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        free = self.current - self.in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    async def __aenter__(self) -> "ConcurrencyLimit":
        """A slot that tells the limiter nothing (a moderation call is no chat request)."""
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    @contextlib.asynccontextmanager
    async def hold(self, retry: bool = False):
        """A slot for one chat attempt: its latency, or why it failed, steers an adaptive limit."""
        await self.acquire()
        self.retries += retry
        started = time.monotonic()
        try:
            yield
        except BaseException as exc:
            self.failed(error_kind(exc) if isinstance(exc, Exception) else "cancelled", started)
            raise
        else:
            self.succeeded(time.monotonic() - started, started)
        finally:
            self.release()

    def failed(self, kind: str, started: float) -> None:
        """An attempt that failed: an overload cuts the limit, once per round."""
        self.timeouts += kind == "timeout"
        overload = kind in OVERLOAD or (kind.startswith("http-5") and kind[5:].isdigit())
        self.overloads += overload
        if overload and self.adaptive and started >= self._cut_at:
            self._cut(self.limit * DECREASE)

    def succeeded(self, latency: float, started: float) -> None:
        """A reply: at the end of each round of them, grow, hold or cut by how latency moved."""
        if not self.adaptive or started < self._cut_at:
            return
        self._round.append(latency)
        if len(self._round) < max(2, self.current):
            return
        median = statistics.median(self._round)
        full, alone = self._round_full, self.current == 1
        self._round, self._round_full = [], self.in_flight >= self.current
        if self.baseline is None or alone or median < self.baseline:
            self.baseline = median  # alone, no request of ours waits behind another
        ratio = median / self.baseline if self.baseline > 0 else 1.0
        if ratio > LATENCY_CUT:
            self._cut(self.limit / ratio)
        elif ratio < LATENCY_HOLD and full:
            self._set(self.limit * 2 if self.slow_start else self.limit + 1)

    def _cut(self, limit: float) -> None:
        self.slow_start = False
        self._cut_at = time.monotonic()
        self._round, self._round_full = [], False
        self._set(limit)

    def _set(self, limit: float) -> None:
        self.limit = min(float(self.most), max(1.0, limit))
        self.peak = max(self.peak, self.current)
        self._wake()

    def summary(self) -> dict:
        """For the manifest: how the limit moved and what pushed it down."""
        return {"adaptive": self.adaptive, "concurrency": self.current, "peak": self.peak, "max": self.most,
                "timeouts": self.timeouts, "overloads": self.overloads, "retries": self.retries}


class Teacher:
    """Sends chat requests with bounded concurrency, rate limits, retries and usage capture."""

    def __init__(self, settings: TeacherSettings, api_key: str | None) -> None:
        self.settings = settings
        self._secret = api_key
        self._client = AsyncOpenAI(
            api_key=api_key or "not-needed",  # local servers ignore it; the SDK insists on one
            base_url=settings.base_url,
            timeout=settings.timeout,
            max_retries=0,  # retries are ours: the SDK's would hide attempts and ignore our budget
            http_client=_http_client(settings),
        )
        self._slots = ConcurrencyLimit(settings.concurrency, settings.adaptive)
        self._limiter = RateLimiter(settings.rpm, settings.tpm)
        # Newer hosted models reject max_tokens; learned once, then used for every request.
        self.token_param = "max_tokens"
        # The server's answer when it rejected response_format; later requests go out as text.
        self.json_mode_error: str | None = None
        self.in_flight = 0
        # Set when the run stops: no new attempt starts, and backoff sleeps end at once.
        self._stopping = asyncio.Event()

    def stop_retrying(self) -> None:
        """Start no more attempts: requests between attempts end as RequestCancelled, those in flight may land."""
        self._stopping.set()

    @property
    def capacity(self) -> int:
        """Requests this teacher takes at once now (an adaptive limit moves; a stage's window follows it)."""
        return self._slots.current

    def concurrency(self) -> dict:
        """The limit now, its peak and ceiling, and the timeouts and retries so far (progress line, manifest)."""
        return self._slots.summary()

    def describe(self, manifest: dict) -> None:
        """The manifest's `concurrency`: where each teacher's limit stands, its peak, timeouts and retries."""
        url = _shown_url(self.settings.base_url) if self.settings.base_url else None
        manifest.setdefault("concurrency", []).append({"model": self.settings.model, "base_url": url, **self._slots.summary()})

    async def _backoff_sleep(self, seconds: float) -> None:
        """Sleep between attempts, cut short when the run stops."""
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    async def _attempt_within_deadline(self, messages: list[dict[str, str]], json_mode: bool, max_tokens: int | None) -> tuple[dict, str]:
        """One attempt bounded as a whole by --timeout: the HTTP client's read timeout restarts on every byte."""
        try:
            if _DEADLINE is not None:  # asyncio.timeout (3.11+) cancels in place; wait_for costs a task per attempt
                async with _DEADLINE(self.settings.timeout):
                    return await self._attempt(messages, json_mode, max_tokens)
            return await asyncio.wait_for(self._attempt(messages, json_mode, max_tokens), timeout=self.settings.timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise RequestTimeout(f"no complete reply within --timeout {self.settings.timeout:g} s") from None

    async def aclose(self) -> None:
        await self._client.close()

    def _params(self, messages: list[dict[str, str]], json_mode: bool, max_tokens: int | None) -> dict:
        return chat_params(self.settings, messages, json_mode, max_tokens, self.token_param)

    async def _attempt(self, messages: list[dict[str, str]], json_mode: bool, max_tokens: int | None) -> tuple[dict, str]:
        params = self._params(messages, json_mode, max_tokens)
        try:
            # The raw POST, not chat.completions.create(): the typed path spends ~2 ms of CPU per
            # request transforming params and building models, a core at the speeds runs reach.
            # Errors (status codes, timeouts, connections) come out of the SDK exactly the same.
            raw = await self._client.post("/chat/completions", body=params, cast_to=_HTTP_RESPONSE)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            # Judged on what this request sent, not on self.token_param: requests already in
            # flight when the first 400 taught us the new name come back with the same 400.
            if "max_tokens" in params and "max_completion_tokens" in str(exc):
                self.token_param = "max_completion_tokens"
                raise ParameterRejected(self._describe(exc), exc.status_code) from None
            if "response_format" in params and _rejects_json_mode(exc):
                self.json_mode_error = self._describe(exc)
                raise JsonModeUnsupported(self.json_mode_error, exc.status_code) from None
            raise
        except openai.APIStatusError as exc:
            if _no_credit(exc):
                raise NoCredit(
                    f"the teacher's account has no credit ({self._describe(exc)})",
                    "check the billing and plan of the account behind the key, then re-run the same command to resume",
                ) from None
            raise
        body = raw.content
        limit = params.get(self.token_param)
        if len(body) > MAX_REPLY_BYTES:
            raise _oversized(body, None, limit, messages, None)
        try:
            response = json.loads(body)
        except ValueError as exc:  # cut short (retried), or a page or stream that is no completion
            raise _not_json(raw, exc) from None
        choices = response.get("choices") if isinstance(response, dict) else None
        if not choices or not isinstance(choices[0], dict) or not isinstance(choices[0].get("message"), dict):
            usage = response.get("usage") if isinstance(response, dict) else None
            wasted = None
            if isinstance(usage, dict):
                wasted = Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
            raise MalformedReply("reply has no choices", wasted)
        content = choices[0]["message"].get("content") or ""
        if isinstance(content, list):  # content parts, as some servers send them
            content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        content = str(content)
        if limit and len(content) > limit * MAX_CHARS_PER_TOKEN + OVERSIZE_SLACK_CHARS:
            raise _oversized(body, content, limit, messages, response)
        return response, content

    async def complete(
        self,
        messages: list[dict[str, str]],
        json_mode: bool = False,
        max_tokens: int | None = None,
        text_messages: Callable[[], list[dict[str, str]]] | None = None,
        may_retry_billed: Callable[[Usage], bool] | None = None,
        request_id: str | None = None,  # the ledger's id; a batch uses it as custom_id, online it is not needed
    ) -> Completion:
        """One chat completion, retried on transient failures; raises RequestFailed or TeacherError.

        `text_messages` renders the same request without JSON mode, for a server that has none;
        without it a server that rejects response_format raises JsonModeUnsupported.
        `may_retry_billed` is told the tokens of each billed but unusable reply and says whether
        the budget still allows another attempt.
        """
        wasted = Usage()
        attempts = 0
        errors: list[str] = []
        over_budget = False
        started = time.monotonic()
        # Only a --tpm cap needs the estimate (it costs a pass over the prompt).
        estimate = estimate_prompt_tokens(messages) + (max_tokens or self.settings.max_tokens or 1024) // 2 if self.settings.tpm else 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.retries + 1),
            wait=_Backoff(),
            sleep=self._backoff_sleep,
            retry=retry_if_exception(
                lambda e: not over_budget and (_retryable(e) or (isinstance(e, JsonModeUnsupported) and text_messages is not None))
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                if self._stopping.is_set():
                    raise RequestCancelled(attempts, wasted, errors)
                with attempt:
                    entry = await self._limiter.acquire(estimate)
                    async with self._slots.hold(retry=attempts > 0):
                        if self._stopping.is_set():  # stopped while this request queued for a slot: it never left
                            raise RequestCancelled(attempts, wasted, errors)
                        attempts += 1
                        # Checked once a slot is ours: a refusal may have come back while we waited.
                        if json_mode and self.json_mode_error and text_messages is not None:
                            messages, json_mode = text_messages(), False
                        self.in_flight += 1
                        try:
                            response, content = await self._attempt_within_deadline(messages, json_mode, max_tokens)
                        except Exception as exc:
                            errors.append(error_kind(exc))
                            if isinstance(exc, MalformedReply) and exc.usage:
                                wasted.add(exc.usage)
                                # Only when a retry is still allowed: after the last one "not retried" would be false.
                                if may_retry_billed is not None and attempts <= self.settings.retries and not may_retry_billed(exc.usage):
                                    over_budget = True
                            raise
                        finally:
                            self.in_flight -= 1
                    usage = _usage_from(response, messages, content)
                    RateLimiter.settle(entry, usage.prompt_tokens + usage.completion_tokens)
        except TeacherError:
            raise  # no credit (see _attempt): the whole run stops, like a refused key
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise TeacherError(
                f"the teacher refused the API key (HTTP {exc.status_code})",
                "check the key in the environment variable named by --api-key-env and its access to --model",
            ) from None
        except openai.NotFoundError as exc:
            raise TeacherError(
                f"the teacher does not know model {self.settings.model!r} or the URL path (HTTP {exc.status_code})",
                "check --model and --base-url (it usually ends in /v1)",
            ) from None
        except RequestCancelled:
            raise
        except Exception as exc:  # every other failure is recorded in the ledger, not raised
            if isinstance(exc, JsonModeUnsupported) and text_messages is None:
                raise  # nothing to fall back to: the caller (doctor) wants to know
            status = getattr(exc, "status_code", None) or getattr(exc, "status", None)
            message = self._describe(exc)
            if over_budget:
                message = f"not retried: another attempt could pass --max-cost (the last reply was billed but unusable: {message})"
            # A failure that names its kind (an oversized reply) keeps it: the run rejects by it.
            raise RequestFailed(getattr(exc, "kind", type(exc).__name__), message, attempts, status, wasted, errors) from None
        choice = response["choices"][0]
        return Completion(
            content=content,
            finish_reason=choice.get("finish_reason"),
            usage=usage,
            response_id=response.get("id"),
            attempts=attempts,
            latency=time.monotonic() - started,
            wasted=wasted,
            errors=errors,
            json_mode=json_mode,
        )

    async def moderate(self, text: str) -> tuple[bool, list[str]]:
        """(flagged, categories) from POST /moderations, retried like a chat request; ModerationUnavailable where there is none."""
        retrying = AsyncRetrying(stop=stop_after_attempt(self.settings.retries + 1), wait=_Backoff(), sleep=self._backoff_sleep,
                                 retry=retry_if_exception(lambda e: not isinstance(e, openai.NotFoundError) and _retryable(e)),
                                 reraise=True)
        attempts = 0
        errors: list[str] = []
        try:
            async for attempt in retrying:
                if self._stopping.is_set():
                    raise RequestCancelled(attempts, Usage(), errors)
                with attempt:
                    async with self._slots:
                        attempts += 1
                        try:
                            raw = await self._client.post("/moderations", body={"input": text}, cast_to=_HTTP_RESPONSE)
                            response = json.loads(raw.content)
                        except Exception as exc:
                            errors.append(error_kind(exc))
                            raise
        except (openai.NotFoundError, openai.APIStatusError) as exc:
            if getattr(exc, "status_code", None) in (404, 405):
                raise ModerationUnavailable(f"HTTP {exc.status_code}") from None
            raise RequestFailed(type(exc).__name__, self._describe(exc), attempts, exc.status_code, Usage(), errors) from None
        except RequestCancelled:
            raise
        except Exception as exc:
            raise RequestFailed(type(exc).__name__, self._describe(exc), attempts, None, Usage(), errors) from None
        results = response.get("results") if isinstance(response, dict) else None
        if not results or not isinstance(results[0], dict):
            raise RequestFailed("MalformedReply", f"the moderation reply has no results: {_quote(raw.content)}", attempts, None, Usage(), errors)
        categories = results[0].get("categories") or {}
        flagged_names = sorted(name for name, on in categories.items() if on is True) if isinstance(categories, dict) else []
        return bool(results[0].get("flagged")), flagged_names

    async def list_models(self) -> list[str]:
        """The model ids the server lists (GET /models); raises RequestFailed or TeacherError like complete()."""
        try:
            # Raw, like a chat request: a page that is no model list is named (an HTML page for a
            # --base-url without /v1), where the typed call failed inside the SDK.
            raw = await self._client.get("/models", cast_to=_HTTP_RESPONSE)
            try:
                listed = json.loads(raw.content)
            except ValueError as exc:
                raise _not_json(raw, exc) from None
            data = listed.get("data") if isinstance(listed, dict) else None
            if not isinstance(data, list):
                raise MalformedReply(f"GET /models answered without a `data` list: {_quote(raw.content, 120)}")
            return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise TeacherError(
                f"the teacher refused the API key (HTTP {exc.status_code})",
                "check the key in the environment variable named by --api-key-env",
            ) from None
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            raise RequestFailed(type(exc).__name__, self._describe(exc), 1, status, Usage(), [error_kind(exc)]) from None

    def _describe(self, exc: BaseException) -> str:
        """A short description of a failure, with the key cut out should a server echo it."""
        status = getattr(exc, "status_code", None)
        if isinstance(exc, openai.APITimeoutError) and not _timed_out(exc) and exc.__cause__ is not None:
            exc = exc.__cause__.__cause__ or exc.__cause__  # "Request timed out" hides a refused connection
            status = None
        # Messages that quote a reply bound their own length (a prefix, on one line).
        text = str(exc).splitlines()[0][: 700 if isinstance(exc, MalformedReply) else 300] if str(exc) else type(exc).__name__
        if self._secret:
            text = text.replace(self._secret, "***")
        return f"HTTP {status}: {text}" if status else text


# --base-url repeated: an endpoint whose attempts fail this many times in a row (timeouts, 5xx) rests;
# a refused or dropped connection rests it at once. It rests PAUSE_FIRST s, doubled after each failed probe.
PAUSE_AFTER = 2
PAUSE_FIRST = 2.0
PAUSE_MAX = 60.0


def _shown_url(url: str) -> str:
    """An endpoint for the manifest: no user, password or query string (some gateways take the key there)."""
    parts = urlparse(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def _worth_another(failed: RequestFailed, text_messages) -> bool:
    """Whether a request that failed on one endpoint may be tried again (there, or on another)."""
    if failed.message.startswith("not retried") or failed.kind in ("oversized", "UnexpectedReply"):
        return False
    if failed.kind == "JsonModeUnsupported":
        return text_messages is not None
    kind = failed.errors[-1] if failed.errors else ""
    if kind.startswith("http-") and kind[5:].isdigit():
        return int(kind[5:]) in (408, 409, 425, 429) or int(kind[5:]) >= 500 or failed.kind == "ParameterRejected"
    return kind in ("timeout", "connection", "malformed")


class Endpoint:
    """One replica in a pool: its own Teacher (and adaptive limit), what the pool sent it, and its health."""

    def __init__(self, url: str, teacher: "Teacher") -> None:
        self.url = url
        self.teacher = teacher
        self.in_flight = 0
        self.failing = 0  # failed attempts in a row
        self.resting_until = 0.0
        self.rest = PAUSE_FIRST
        self.probing = False  # back from a rest: one request at a time until one succeeds
        self.counts: collections.Counter = collections.Counter()  # attempts, ok, failed attempts, pauses
        self.errors: collections.Counter = collections.Counter()

    def room(self, now: float) -> int:
        """Requests it may take now: none while it rests, one while probed, else its limit's free slots."""
        if now < self.resting_until:
            return 0
        return (1 if self.probing else self.teacher.capacity) - self.in_flight

    def succeeded(self) -> None:
        self.counts["ok"] += 1
        self.failing, self.probing, self.rest = 0, False, PAUSE_FIRST

    def failed(self, kind: str) -> None:
        """An attempt that failed here; a dead or failing endpoint rests (and is probed when the rest ends)."""
        self.counts["failed_attempts"] += 1
        self.errors[kind] += 1
        if kind == "http-429" or not (kind in ("timeout", "connection") or kind.startswith("http-5")):
            return  # a 429 asks for less, which its limit gives; a bad reply says nothing of the endpoint's health
        self.failing += 1
        if time.monotonic() < self.resting_until:
            return  # requests that were in flight when it failed: one failure, one rest
        if kind == "connection" or self.failing >= PAUSE_AFTER or self.probing:
            self.resting_until = time.monotonic() + self.rest
            self.rest = min(self.rest * 2, PAUSE_MAX)
            self.probing = True
            self.counts["pauses"] += 1

    def summary(self) -> dict:
        state = "resting" if time.monotonic() < self.resting_until else "probing" if self.probing else "up"
        return {"base_url": _shown_url(self.url), "state": state, "attempts": self.counts["attempts"], "ok": self.counts["ok"],
                "failed_attempts": self.counts["failed_attempts"], "pauses": self.counts["pauses"],
                "errors": dict(sorted(self.errors.items())), "concurrency": self.teacher.concurrency()}


class TeacherPool:
    """Several endpoints of one model (--base-url repeated) as one transport with Teacher's interface.

    Each attempt goes to the endpoint with the most free room under its own adaptive limit; a failed
    attempt is tried again at once on another endpoint while --retries allows; a failing endpoint rests
    and is probed with one request when the rest ends, while the run goes on with the others.
    """

    def __init__(self, settings: TeacherSettings, urls: tuple[str, ...] | list[str], api_key: str | None) -> None:
        self.settings = settings
        # Each endpoint tries once; the pool retries, on another endpoint when there is one.
        once = dataclasses.replace(settings, retries=0)
        self.endpoints = [Endpoint(url, Teacher(dataclasses.replace(once, base_url=url), api_key)) for url in urls]
        self.retries = 0
        self._changed = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()

    @property
    def json_mode_error(self) -> str | None:
        return next((e.teacher.json_mode_error for e in self.endpoints if e.teacher.json_mode_error), None)

    @property
    def capacity(self) -> int:
        """Requests the pool takes at once now: the endpoints' limits, those resting left out (at least 1)."""
        now = time.monotonic()
        return max(1, sum(e.room(now) + e.in_flight for e in self.endpoints if now >= e.resting_until))

    def concurrency(self) -> dict:
        each = [e.teacher.concurrency() for e in self.endpoints]
        return {"adaptive": self.settings.adaptive, "concurrency": self.capacity, "peak": sum(c["peak"] for c in each),
                "max": sum(c["max"] for c in each), "timeouts": sum(c["timeouts"] for c in each),
                "overloads": sum(c["overloads"] for c in each), "retries": self.retries}

    def describe(self, manifest: dict) -> None:
        """Per-endpoint counts in the manifest: requests, replies, failed attempts by kind, rests, limits."""
        manifest["endpoints"] = [e.summary() for e in self.endpoints]

    def stop_retrying(self) -> None:
        self._stopping = True
        self._stopped.set()
        for endpoint in self.endpoints:
            endpoint.teacher.stop_retrying()
        self._wake()

    async def aclose(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.teacher.aclose()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _choose(self, avoid: Endpoint | None = None) -> Endpoint | None:
        """The endpoint with the most free room (another than `avoid` if one has room), waiting for one; None once the run stops."""
        while not self._stopping:
            now = time.monotonic()
            best = max(self.endpoints, key=lambda e: (e.room(now) > 0 and e is not avoid, e.room(now), -e.in_flight))
            if best.room(now) > 0:
                return best
            rests = [e.resting_until - now for e in self.endpoints if e.resting_until > now]
            changed = self._changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=min(rests) if rests else None)
        return None

    async def complete(self, messages: list[dict[str, str]], json_mode: bool = False, max_tokens: int | None = None,
                       text_messages: Callable[[], list[dict[str, str]]] | None = None,
                       may_retry_billed: Callable[[Usage], bool] | None = None, request_id: str | None = None) -> Completion:
        """One chat completion from whichever endpoint has room; raises RequestFailed, RequestCancelled or TeacherError as Teacher does."""
        attempts, wasted, errors = 0, Usage(), []
        started = time.monotonic()
        failed_on: Endpoint | None = None
        while True:
            endpoint = await self._choose(avoid=failed_on)
            if endpoint is None:
                raise RequestCancelled(attempts, wasted, errors)
            self.retries += attempts > 0
            endpoint.in_flight += 1
            endpoint.counts["attempts"] += 1
            try:
                done = await endpoint.teacher.complete(messages, json_mode, max_tokens, text_messages, None, request_id)
            except RequestFailed as exc:
                failed = exc
            except RequestCancelled as cancelled:
                wasted.add(cancelled.wasted)
                raise RequestCancelled(attempts + cancelled.attempts, wasted, errors + cancelled.errors) from None
            else:
                endpoint.succeeded()
                done.wasted.add(wasted)
                return dataclasses.replace(done, attempts=attempts + done.attempts, errors=errors + done.errors,
                                           latency=time.monotonic() - started)
            finally:
                endpoint.in_flight -= 1
                self._wake()
            attempts, errors = attempts + failed.attempts, errors + failed.errors
            wasted.add(failed.wasted)
            endpoint.failed(failed.errors[-1] if failed.errors else failed.kind)
            failed_on = endpoint
            if failed.kind == "JsonModeUnsupported":  # replicas run the same server: none of them has it
                for other in self.endpoints:
                    other.teacher.json_mode_error = other.teacher.json_mode_error or endpoint.teacher.json_mode_error
            if not (_worth_another(failed, text_messages) and attempts <= self.settings.retries and not self._stopping):
                raise RequestFailed(failed.kind, failed.message, attempts, failed.status, wasted, errors)
            billed = failed.wasted.prompt_tokens or failed.wasted.completion_tokens
            if billed and may_retry_billed is not None and not may_retry_billed(failed.wasted):
                raise RequestFailed(failed.kind, f"not retried: another attempt could pass --max-cost (the last reply was billed "
                                    f"but unusable: {failed.message})", attempts, failed.status, wasted, errors)
            now = time.monotonic()
            if not any(e is not endpoint and e.room(now) > 0 for e in self.endpoints):
                # No other endpoint to turn to: back off as Teacher does, cut short by a stop.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), timeout=min(60.0, 2.0 ** (attempts - 1)) * random.uniform(0.5, 1.0))


def online_transport(settings: TeacherSettings, replicas: tuple[str, ...], api_key: str | None) -> "Teacher | TeacherPool":
    """The online transport of a run: one Teacher, or a pool when --base-url was given more than once."""
    if replicas:
        return TeacherPool(settings, (settings.base_url, *replicas), api_key)
    return Teacher(settings, api_key)


def chat_params(settings: TeacherSettings, messages: list[dict[str, str]], json_mode: bool, max_tokens: int | None,
                token_param: str = "max_tokens") -> dict:
    """The body of one chat completion request, online or as a batch line."""
    params: dict = {"model": settings.model, "messages": messages}
    if settings.temperature is not None:
        params["temperature"] = settings.temperature
    if settings.top_p is not None:
        params["top_p"] = settings.top_p
    limit = max_tokens or settings.max_tokens
    if limit:
        params[token_param] = limit
    if json_mode:
        params["response_format"] = {"type": "json_object"}
    return params


def read_completion(response: dict, messages: list[dict[str, str]], limit: int | None) -> tuple[str, str | None, Usage]:
    """Content, finish_reason and usage of a completion body (a batch output line's); raises MalformedReply as online."""
    choices = response.get("choices") if isinstance(response, dict) else None
    if not choices or not isinstance(choices[0], dict) or not isinstance(choices[0].get("message"), dict):
        usage = response.get("usage") if isinstance(response, dict) else None
        wasted = Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)) if isinstance(usage, dict) else None
        raise MalformedReply("reply has no choices", wasted)
    content = choices[0]["message"].get("content") or ""
    if isinstance(content, list):
        content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    content = str(content)
    if limit and len(content) > limit * MAX_CHARS_PER_TOKEN + OVERSIZE_SLACK_CHARS:
        raise _oversized(json.dumps(response, ensure_ascii=False).encode(), content, limit, messages, response)
    return content, choices[0].get("finish_reason"), _usage_from(response, messages, content)


class BatchCallFailed(Exception):
    """A Batch API call (upload, create, retrieve, download) that failed; `transient` when trying again may help."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


class BatchClient:
    """The Batch API's calls, as plain dicts: upload a JSONL file, create, retrieve, list and cancel batches, download files."""

    def __init__(self, settings: TeacherSettings, api_key: str | None) -> None:
        self._secret = api_key
        # No SDK retries: a create retried after a lost reply would submit the same lines twice (see create()).
        self._client = AsyncOpenAI(api_key=api_key or "not-needed", base_url=settings.base_url,
                                   timeout=max(settings.timeout, 300.0), max_retries=0)

    async def aclose(self) -> None:
        await self._client.close()

    async def _call(self, what: str, make):
        try:
            return await make()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise TeacherError(f"the teacher refused the API key for {what} (HTTP {exc.status_code})",
                               "check the key in the environment variable named by --api-key-env and its access to the Batch API") from None
        except openai.NotFoundError as exc:
            raise TeacherError(f"{what}: not found (HTTP {exc.status_code}): {self._describe(exc)}",
                               "check --base-url: the server must offer the Batch API (/files and /batches), or run without --batch") from None
        except openai.APIStatusError as exc:
            transient = exc.status_code in (408, 409, 425, 429) or exc.status_code >= 500
            raise BatchCallFailed(f"{what}: HTTP {exc.status_code}: {self._describe(exc)}", transient) from None
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise BatchCallFailed(f"{what}: {error_kind(exc)}: {self._describe(exc)}", True) from None

    def _describe(self, exc: BaseException) -> str:
        text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        return text.replace(self._secret, "***") if self._secret else text

    async def upload(self, data: bytes, filename: str) -> str:
        """Upload a JSONL input file (purpose batch); its file id."""
        made = await self._call("uploading a batch file", lambda: self._client.files.create(file=(filename, data, "application/jsonl"), purpose="batch"))
        return made.id

    async def create(self, file_id: str, metadata: dict[str, str]) -> dict:
        """Submit a batch of an uploaded file; after a lost reply, the batch the server made from it is found, never a second one."""
        try:
            made = await self._call("creating a batch", lambda: self._client.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", metadata=metadata))
            return made.model_dump()
        except BatchCallFailed as failed:
            if not failed.transient:
                raise
            found = await self.find(file_id)
            if found is None:
                raise
            return found

    async def find(self, file_id: str) -> dict | None:
        """The batch made from an input file, if any (among the most recent ones)."""
        page = await self._call("listing batches", lambda: self._client.batches.list(limit=100))
        for batch in page.data:
            if batch.input_file_id == file_id:
                return batch.model_dump()
        return None

    async def retrieve(self, batch_id: str) -> dict:
        made = await self._call(f"checking batch {batch_id}", lambda: self._client.batches.retrieve(batch_id))
        return made.model_dump()

    async def cancel(self, batch_id: str) -> dict:
        made = await self._call(f"cancelling batch {batch_id}", lambda: self._client.batches.cancel(batch_id))
        return made.model_dump()

    async def content(self, file_id: str) -> bytes:
        """A file's bytes (a batch's output or error file)."""
        made = await self._call(f"downloading {file_id}", lambda: self._client.files.content(file_id))
        return made.content
