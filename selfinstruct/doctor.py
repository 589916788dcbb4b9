"""The teacher check-up: a few requests that show what a run will meet, and the fix for each problem."""

from __future__ import annotations

import asyncio
import difflib
import json
import math
import re
import time
import urllib.request
from dataclasses import asdict, dataclass
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from selfinstruct.errors import TeacherError
from selfinstruct.parsing import CONTEXT_FIX, context_cut, parse_reply
from selfinstruct.pricing import Price, endpoint_kind
from selfinstruct.prompts import generation_template_name, load_template
from selfinstruct.teacher import Completion, JsonModeUnsupported, RequestFailed, Teacher, TeacherSettings

# Tasks asked for by the JSON-mode probe: enough to see the reply parse, few enough to answer in seconds.
PROBE_TASKS = 2
PROBE_MAX_TOKENS = 1024
# The parallelism probe: short replies, one alone then two at once. A parallel server turns out nearly
# twice the tokens per second for two; one that answers a request at a time, the same. Below this gain
# it is serial (tokens, not seconds: a reply that stops early would pass for parallelism).
PARALLEL_PROBE_TOKENS = 32
SERIAL_GAIN = 1.4
# Below this a request is too quick to tell a queue from noise.
PARALLEL_MIN_SECONDS = 0.05
# The --timeout doctor suggests leaves this much room over the full-size request's latency (replies vary in length).
TIMEOUT_HEADROOM = 3.0


@dataclass(frozen=True)
class RunShape:
    """What the run being prepared will send: full-size requests, how many at once, how long each may take."""

    per_request: int = 10
    max_tokens: int = 3072
    concurrency: int = 16
    timeout: float = 120.0
    context: int | None = None  # known when --local started the server; else read from the server

# Two example tasks per language, shown in the probe prompt the way a run shows seed tasks.
EXAMPLES = {
    "zh": [
        {"instruction": "解释为什么天空是蓝色的", "input": "", "output": "阳光穿过大气时，波长较短的蓝光被散射得更多，所以天空看起来是蓝色的。"},
        {"instruction": "把下面的句子翻译成英文", "input": "我喜欢在周末读书。", "output": "I like reading on weekends."},
    ],
    "zh-Hant": [
        {"instruction": "解釋為什麼天空是藍色的", "input": "", "output": "陽光穿過大氣時，波長較短的藍光被散射得更多，所以天空看起來是藍色的。"},
        {"instruction": "把下面的句子翻譯成英文", "input": "我喜歡在週末讀書。", "output": "I like reading on weekends."},
    ],
    "en": [
        {"instruction": "Explain why the sky is blue.", "input": "", "output": "Air scatters short blue wavelengths of sunlight more than red ones."},
        {"instruction": "Translate the sentence into French.", "input": "I like reading on weekends.", "output": "J'aime lire le week-end."},
    ],
}


@dataclass
class Check:
    """One row of the report: what was checked, how it went, what was seen, what to do."""

    name: str
    status: str  # ok, warn, fail or skip
    detail: str
    fix: str = ""


@dataclass
class Report:
    """Every check, in order, and how long the whole check-up took."""

    checks: list[Check]
    seconds: float
    flags: str = ""  # the run flags the measurements call for, e.g. "--concurrency 1 --timeout 240"

    @property
    def ok(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "seconds": round(self.seconds, 2), "flags": self.flags, "checks": [asdict(c) for c in self.checks]}


def shown_url(base_url: str | None) -> str | None:
    """The base URL fit to print: a user name, password or query string (some gateways take the key there) as ***."""
    if not base_url:
        return None
    parts = urlsplit(base_url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def _url_secrets(base_url: str | None) -> list[str]:
    """What of the base URL must never be printed, longest first."""
    if not base_url:
        return []
    parts = urlsplit(base_url)
    found = [parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else "", parts.query, parts.password or "", parts.username or ""]
    found += [value for _, value in parse_qsl(parts.query)]
    return sorted({f for f in found if f}, key=len, reverse=True)


def _masked(report: "Report", base_url: str | None) -> "Report":
    """Every check with the URL's credentials cut out, as the run manifest keeps them out."""
    for secret in _url_secrets(base_url):
        for check in report.checks:
            check.detail = check.detail.replace(secret, "***")
            check.fix = check.fix.replace(secret, "***")
    return report


def _messages(lang: str, json_mode: bool, tasks: int = PROBE_TASKS) -> list[dict[str, str]]:
    template = load_template(generation_template_name(lang))
    return template.render(examples=EXAMPLES[lang], num_tasks=tasks, start_index=1, json_mode=json_mode)


def _sample(text: str) -> str:
    return repr(text.strip().replace("\n", "⏎")[:120])


def _failure(name: str, exc: BaseException, settings: TeacherSettings) -> Check:
    """A failed request as a check row with the fix for its kind."""
    if isinstance(exc, TeacherError):
        return Check(name, "fail", exc.message, exc.hint)
    assert isinstance(exc, RequestFailed)
    kind = exc.errors[-1] if exc.errors else exc.kind
    if kind == "timeout":
        fix = f"the teacher did not answer within --timeout {settings.timeout:g} s: raise --timeout, or check the server's load"
    elif kind == "connection":
        fix = "start the server, or fix --base-url (host, port, and a path that usually ends in /v1)"
    elif kind == "no-credit":
        fix = "the account behind the key has no credit: check its billing and plan (runs stop at once on this)"
    elif kind == "http-429":
        fix = "the key is rate-limited now: lower --concurrency or set --rpm/--tpm to the account's limits"
    elif kind.startswith("http-5"):
        fix = "the server is failing: check its logs; runs retry 5xx with backoff, but not forever"
    elif kind == "http-400":
        fix = "the server rejected the request: check --model and --max-tokens against what it supports"
    else:
        fix = "check --base-url and --model"
    return Check(name, "fail", exc.message, fix)


def _quirks(reply: Completion, teacher: Teacher) -> list[str]:
    seen = []
    if teacher.token_param != "max_tokens":
        seen.append("wants max_completion_tokens (used automatically)")
    if "<think>" in reply.content.lower():
        seen.append("reasoning blocks <think>…</think> (stripped; budget --max-tokens for them)")
    if re.sub(r"(?is)<think>.*?</think>", "", reply.content).lstrip().startswith("```"):
        seen.append("code fences (stripped)")
    return seen


async def diagnose(
    settings: TeacherSettings, api_key: str | None, price: Price | None, lang: str = "zh", key_env: str = "OPENAI_API_KEY",
    shape: RunShape | None = None,
) -> Report:
    """Probe a teacher: list models, a full-size generation, parallelism, context, one JSON-mode request. Never raises for the teacher's faults."""
    report = await _diagnose(settings, api_key, price, lang, key_env, shape or RunShape(timeout=settings.timeout))
    return _masked(report, settings.base_url)


async def _diagnose(settings: TeacherSettings, api_key: str | None, price: Price | None, lang: str, key_env: str,
                    shape: RunShape) -> Report:
    started = time.monotonic()
    url = shown_url(settings.base_url) or "https://api.openai.com/v1"
    kind = endpoint_kind(settings.base_url)
    checks: list[Check] = []
    parts = urlsplit(settings.base_url or "")
    if parts.username or parts.password:  # refused by generate too; the SDK would send them beside the key
        checks.append(Check("reachable", "fail", f"{url}: --base-url carries a user name or password",
                            "drop the user:password@ part; the key goes in the variable named by --api-key-env"))
        names = ("model listed", "chat works", "usage reported", "JSON mode", "latency", "tokens/s")
        checks += [Check(n, "skip", "the base URL is refused") for n in names]
        checks.append(_price_check(settings.model, price, kind))
        return Report(checks, time.monotonic() - started)
    teacher = Teacher(settings, api_key)
    try:
        # 1. reachable, model listed
        models: list[str] | None = None
        key_refused: TeacherError | None = None
        try:
            models = await teacher.list_models()
            checks.append(Check("reachable", "ok", f"{url} answered"))
        except TeacherError as exc:
            key_refused = exc
            checks.append(Check("reachable", "ok", f"{url} answered, but refused the key"))
        except RequestFailed as exc:
            if exc.errors[-1:] in (["connection"], ["timeout"]):  # no HTTP answer at all
                row = _failure("reachable", exc, settings)
                checks.append(Check("reachable", "fail", f"{url}: {exc.message}", row.fix))
                names = ("model listed", "chat works", "usage reported", "JSON mode", "latency", "tokens/s")
                checks += [Check(n, "skip", "the teacher is not reachable") for n in names]
                checks.append(_price_check(settings.model, price, kind))
                return Report(checks, time.monotonic() - started)
            if exc.status is None:  # an answer that was no model list (an HTML page, say): never "ok (HTTP None)"
                checks.append(Check("reachable", "warn", f"{url}: GET /models gave no model list: {exc.message}",
                                    "check --base-url (it usually ends in /v1); nothing to do if the chat check passes"))
            else:
                checks.append(Check("reachable", "ok", f"{url} answered (GET /models: HTTP {exc.status})"))
        if key_refused is not None:
            fix = key_refused.hint if api_key or kind == "local" else f"${key_env} is not set: export {key_env}=..., or pass --api-key-env NAME"
            checks.append(Check("model listed", "fail", key_refused.message, fix))
            names = ("chat works", "usage reported", "JSON mode", "latency", "tokens/s")
            checks += [Check(n, "skip", "needs a key the teacher accepts") for n in names]
            checks.append(_price_check(settings.model, price, kind))
            return Report(checks, time.monotonic() - started)
        if models is None:
            checks.append(Check("model listed", "warn", "the server does not list its models", "nothing to do if the chat check passes"))
        elif settings.model in models:
            checks.append(Check("model listed", "ok", f"{settings.model} is one of {len(models)} models"))
        else:
            close = difflib.get_close_matches(settings.model, models, n=3, cutoff=0.3) or models[:5]
            checks.append(Check("model listed", "fail", f"{settings.model!r} is not among the {len(models)} models listed",
                                f"pass --model with one of: {', '.join(close)}"))

        # 2. a full-size generation request, as a run sends it: parsed, usage, latency, tokens/s
        reply: Completion | None = None
        prompt = _messages(lang, False, shape.per_request)
        try:
            reply = await teacher.complete(prompt, max_tokens=shape.max_tokens)
        except (RequestFailed, TeacherError) as exc:
            checks.append(_failure("chat works", exc, settings))
        context, slots, source = await _server_context(settings.base_url, api_key, shape)
        if reply is not None:
            checks += _chat_checks(reply, teacher, shape)
            timing = await _parallel_timing(teacher, prompt)
            checks.append(_parallel_check(timing, slots, shape))
            serial = slots == 1 or (timing is not None and _is_serial(timing))
            checks.append(_latency_check(reply, serial, slots, shape))
            checks.append(_context_check(reply, context, source, shape))
        else:
            checks += [Check(n, "skip", "no reply to measure") for n in ("usage reported", "parallel", "latency", "context", "tokens/s")]
            serial = False

        # 3. JSON mode: supported, rejected (runs fall back to text), or silently ignored
        if reply is None:
            checks.append(Check("JSON mode", "skip", "chat does not work"))
        else:
            checks.append(await _json_check(teacher, lang, shape.max_tokens))
        checks.append(_price_check(settings.model, price, kind))
        flags = _flags(reply, serial, slots, context, shape) if reply is not None else ""
        if flags:
            checks.append(Check("flags", "ok", flags))
        order = ["reachable", "model listed", "chat works", "quirks", "usage reported", "JSON mode", "parallel", "latency",
                 "context", "tokens/s", "price known", "flags"]
        checks.sort(key=lambda c: order.index(c.name) if c.name in order else len(order))
        return Report(checks, time.monotonic() - started, flags)
    finally:
        await teacher.aclose()


def _get_json(url: str, api_key: str | None, timeout: float) -> dict | None:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = json.load(response)
            return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


async def _server_context(base_url: str | None, api_key: str | None, shape: RunShape) -> tuple[int | None, int | None, str]:
    """The context (tokens) and parallel slots where the server tells them: llama.cpp's GET /props, vLLM's max_model_len."""
    if shape.context:
        return shape.context, 1, "the --local server"
    if not base_url:
        return None, None, ""
    root = base_url.rstrip("/").removesuffix("/v1")
    wait = min(shape.timeout, 10.0)
    props = await asyncio.to_thread(_get_json, f"{root}/props", api_key, wait)
    settings = (props or {}).get("default_generation_settings") or {}
    if isinstance(settings.get("n_ctx"), int) and settings["n_ctx"] > 0:
        slots = props.get("total_slots")
        return settings["n_ctx"], slots if isinstance(slots, int) and slots > 0 else None, "llama.cpp /props"
    models = await asyncio.to_thread(_get_json, f"{base_url.rstrip('/')}/models", api_key, wait)
    for model in (models or {}).get("data") or []:
        if isinstance(model, dict) and isinstance(model.get("max_model_len"), int):
            return model["max_model_len"], None, "vLLM max_model_len"
    return None, None, ""


async def _parallel_timing(teacher: Teacher, prompt: list[dict[str, str]]) -> tuple[float, int, float, int] | None:
    """Seconds and completion tokens of one short request alone, then of two sent at once; None if one failed."""
    async def timed(n: int) -> tuple[float, int]:
        started = time.monotonic()
        replies = await asyncio.gather(*(teacher.complete(prompt, max_tokens=PARALLEL_PROBE_TOKENS) for _ in range(n)))
        return time.monotonic() - started, sum(max(r.usage.completion_tokens, 1) for r in replies)

    try:
        return (*await timed(1), *await timed(2))
    except (RequestFailed, TeacherError):
        return None


def _is_serial(timing: tuple[float, int, float, int]) -> bool:
    one, one_tokens, two, two_tokens = timing
    return one >= PARALLEL_MIN_SECONDS and (two_tokens / max(two, 1e-6)) < SERIAL_GAIN * (one_tokens / one)


def _parallel_check(timing: tuple[float, int, float, int] | None, slots: int | None, shape: RunShape) -> Check:
    if timing is None:
        return Check("parallel", "skip", "a short request failed")
    one, one_tokens, two, two_tokens = timing
    seen = f"one request {one:.2f} s ({one_tokens} tokens), two at once {two:.2f} s ({two_tokens} tokens)"
    if one < PARALLEL_MIN_SECONDS and slots != 1:
        return Check("parallel", "ok", f"{seen}: too quick to tell" + (f"; the server has {slots} slots" if slots else ""))
    if slots == 1 or _is_serial(timing):
        status = "warn" if shape.concurrency > 1 else "ok"
        return Check("parallel", status, f"{seen}: the server answers one request at a time",
                     "use --concurrency 1 (more only queue in the server and count against --timeout), or start it with more slots" if status == "warn" else "")
    return Check("parallel", "ok", f"{seen}: runs requests in parallel" + (f" ({slots} slots)" if slots else ""))


def _effective_slots(serial: bool, slots: int | None, shape: RunShape) -> int:
    """Requests the server works on at once during the run."""
    if serial:
        return 1
    return min(shape.concurrency, slots) if slots else shape.concurrency


def _latency_check(reply: Completion, serial: bool, slots: int | None, shape: RunShape) -> Check:
    latency = max(reply.latency, 1e-6)
    working = _effective_slots(serial, slots, shape)
    # A request waits for those ahead of it in the server's queue before its own turn.
    waits = math.ceil(shape.concurrency / working)
    rate = working / latency
    seen = (f"{latency:.2f} s for a full request ({shape.per_request} tasks, {reply.usage.completion_tokens:,} completion tokens); "
            f"at --concurrency {shape.concurrency} ≈ {rate:.3g} requests/s")
    if latency * waits > shape.timeout:
        fix_concurrency = max(1, math.floor(shape.timeout / latency)) * working if latency < shape.timeout else working
        return Check("latency", "warn", f"{seen}, and a request waits ≈ {waits} × {latency:.1f} s = {latency * waits:.0f} s, over --timeout {shape.timeout:g} s",
                     f"lower --concurrency to {min(fix_concurrency, shape.concurrency)} or raise --timeout to {math.ceil(latency * waits * 1.5)}")
    return Check("latency", "ok", seen)


def _context_check(reply: Completion, context: int | None, source: str, shape: RunShape) -> Check:
    cut = context_cut(reply.finish_reason, vars(reply.usage), shape.max_tokens)
    if cut:
        return Check("context", "fail", cut + (f" (context {context:,}, {source})" if context else ""), CONTEXT_FIX)
    if context is None:
        return Check("context", "ok", "not reported by the server")
    needed = reply.usage.prompt_tokens + shape.max_tokens
    if not reply.usage.estimated and needed > context:
        return Check("context", "warn", f"{context:,} tokens ({source}): prompt {reply.usage.prompt_tokens:,} + --max-tokens "
                     f"{shape.max_tokens:,} = {needed:,} does not fit, so long replies will be cut",
                     f"--max-tokens {max(context - reply.usage.prompt_tokens - 64, 1)}, or {CONTEXT_FIX}")
    return Check("context", "ok", f"{context:,} tokens ({source})")


def _flags(reply: Completion, serial: bool, slots: int | None, context: int | None, shape: RunShape) -> str:
    """The run flags the measurements call for."""
    working = _effective_slots(serial, slots, shape)
    concurrency = working if serial or slots else shape.concurrency
    waits = math.ceil(concurrency / working)
    timeout = max(shape.timeout, math.ceil(reply.latency * waits * TIMEOUT_HEADROOM))
    flags = [f"--concurrency {concurrency}", f"--timeout {timeout:g}"]
    if context and not reply.usage.estimated and reply.usage.prompt_tokens + shape.max_tokens > context:
        flags.append(f"--max-tokens {max(context - reply.usage.prompt_tokens - 64, 1)}")
    return " ".join(flags)


def _chat_checks(reply: Completion, teacher: Teacher, shape: RunShape) -> list[Check]:
    checks = []
    items = parse_reply(reply.content, reply.finish_reason)
    usable = [i for i in items if i.problem is None]
    cut = context_cut(reply.finish_reason, vars(reply.usage), shape.max_tokens)
    if not reply.content.strip() and reply.finish_reason == "length":
        fix = CONTEXT_FIX if cut else "the model spends its budget before answering (reasoning?): raise --max-tokens"
        checks.append(Check("chat works", "fail", cut or f"empty reply cut by the token limit ({shape.max_tokens} tokens)", fix))
    elif usable:
        checks.append(Check("chat works", "ok", f"{len(usable)} of {shape.per_request} asked tasks parsed (finish_reason {reply.finish_reason})"))
    else:
        # "ready" means a run's request gave tasks; a reply nothing parses from would reject every record.
        checks.append(Check("chat works", "fail", f"answered, but no task parsed from {_sample(reply.content)}",
                            "check the model follows instructions; try --json-mode or your own --template"))
    quirks = _quirks(reply, teacher)
    checks.append(Check("quirks", "ok", "; ".join(quirks) if quirks else "none seen"))
    if reply.usage.estimated:
        checks.append(Check("usage reported", "warn", "missing or implausible (0 tokens, or 1 completion token)",
                            "nothing to do: tokens are estimated offline and the manifest marks them estimated"))
    else:
        checks.append(Check("usage reported", "ok", f"{reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens"))
    latency = max(reply.latency, 1e-6)
    approx = "≈ " if reply.usage.estimated else ""
    checks.append(Check("tokens/s", "ok", f"{approx}{reply.usage.completion_tokens / latency:.0f} completion tokens/s for one request"))
    return checks


async def _json_check(teacher: Teacher, lang: str, max_tokens: int = PROBE_MAX_TOKENS) -> Check:
    try:
        reply = await teacher.complete(_messages(lang, True), json_mode=True, max_tokens=min(PROBE_MAX_TOKENS, max_tokens))
    except JsonModeUnsupported as exc:
        return Check("JSON mode", "warn", f"not supported ({exc.message})",
                     "leave --json-mode off; a run with --json-mode falls back to the text template by itself")
    except (RequestFailed, TeacherError) as exc:
        row = _failure("JSON mode", exc, teacher.settings)
        return Check("JSON mode", "warn", row.detail, row.fix)
    text = reply.content.strip()
    items = parse_reply(reply.content, reply.finish_reason, json_mode=True)
    is_json = "{" in text[:200] and any(i.problem is None for i in items)
    if is_json:
        return Check("JSON mode", "ok", "supported (--json-mode asks for {\"tasks\": [...]})")
    return Check("JSON mode", "warn", f"accepted but the reply is not JSON: {_sample(reply.content)}", "leave --json-mode off")


def _price_check(model: str, price: Price | None, kind: str) -> Check:
    if price is None:
        return Check("price known", "warn", f"no price for {model!r}",
                     "pass --price-in and --price-out (USD per 1M tokens); --max-cost needs them")
    if kind == "local" and price.source == "local server":
        return Check("price known", "ok", "local server: $0")
    return Check("price known", "ok", f"${price.input:g} in / ${price.output:g} out per 1M tokens ({price.source})")


def run_doctor(settings: TeacherSettings, api_key: str | None, price: Price | None, lang: str, key_env: str,
               shape: RunShape | None = None) -> Report:
    """Synchronous entry point for the CLI."""
    return asyncio.run(diagnose(settings, api_key, price, lang, key_env, shape))


def local_probe_prompts(lang: str, per_request: int) -> list[list[dict[str, str]]]:
    """The prompts doctor sends, for sizing a --local server's context."""
    return [_messages(lang, False, per_request), _messages(lang, True, PROBE_TASKS)]
