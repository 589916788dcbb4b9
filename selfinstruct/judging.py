"""The quality gate: a teacher rates each record 1-5 on a published rubric, and moderation screens what it keeps.

A stage on the engine like generate and evolve: one job a record, each verdict a ledgered request
(`rate:1:<id>`, and `rate:2:<id>` for the one retry of an unreadable verdict), so a resumed run
replays paid verdicts instead of buying them again. Used stand-alone (`selfinstruct judge`) and
after generate / evolve (`--judge`, `--moderate`), where it gates the run's own records.jsonl.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from selfinstruct.batch import BATCH_WINDOW
from selfinstruct.config import GenerateConfig
from selfinstruct.engine import Engine, Tally, one_line, public_url
from selfinstruct.errors import ConfigError, OutputError, RunStopped
from selfinstruct.pricing import Price, endpoint_kind, resolve_price
from selfinstruct.prompts import Template, load_template
from selfinstruct.rundir import RECORDS, REJECTED, RunDir, write_jsonl_atomic
from selfinstruct.teacher import ModerationUnavailable, RequestFailed, Teacher, TeacherSettings

STAGE = "judge"
# The online route moderation takes in a --batch run (the judge's own route then batches).
MODERATION_ROUTE = "moderation"
# Rejection reasons the gate writes.
REASONS = ("low-score", "judge-failed", "moderation")
SCORES = (1, 2, 3, 4, 5)
# A verdict is a score and a sentence; reasoning models may think first, so leave them room.
JUDGE_MAX_TOKENS = 1024
# The judge's decoding: the same record should get the same score.
JUDGE_TEMPERATURE = 0.0

_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.DOTALL)
_OBJECT = re.compile(r"\{.*\}", re.DOTALL)
# "Score: 4", "**评分**：4", "得分 = 4", "score 4"; then "4/5", "4 / 5"; then "4分".
_LABELLED = re.compile(r"(?:score|rating|评分|評分|得分|分数|分數|打分)\s*[*_]*\s*[:：=]?\s*[*_]*\s*([1-5](?:\.\d+)?)(?![\d.])"
                       r"(?!\s*(?:/|out of)\s*(?:10|100))", re.IGNORECASE)
_FRACTION = re.compile(r"(?<![\d.])([1-5](?:\.\d+)?)\s*(?:/|out of)\s*5(?![\d])", re.IGNORECASE)
# "4分", but not the scale ("满分5分", "总分 5 分").
_POINTS = re.compile(r"(?<![\d.])(?<!满分)(?<!滿分)(?<!总分)(?<!總分)\s*([1-5])\s*分(?!之)")
_BARE = re.compile(r"^\s*[*_]*([1-5])[*_]*\s*[.。]?\s*$")
_REASON = re.compile(r"(?:reason|理由|原因|说明|說明)\s*[*_]*\s*[:：]\s*[*_]*\s*(.+)", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Verdict:
    """What the judge said about one record."""

    score: int
    reason: str
    safe: bool | None = None


def _score(value: object) -> int | None:
    """A 1-5 score from a JSON value ("4", 4, 4.0, 4.5 → 5), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip().split("/")[0].strip()
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and 1 <= value <= 5:
        return int(value + 0.5)
    return None


def _safe(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "是", "否"):
        return value.strip().lower() in ("true", "yes", "是")
    return None


def _from_json(text: str) -> Verdict | None:
    match = _OBJECT.search(text)
    if not match:
        return None
    try:
        data = json.loads(match.group(0))
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    folded = {str(k).strip().lower(): v for k, v in data.items()}
    score = next((_score(folded[k]) for k in ("score", "rating", "评分", "評分", "得分", "分数") if k in folded), None)
    if score is None:
        return None
    reason = next((str(folded[k]) for k in ("reason", "理由", "原因", "explanation") if k in folded and folded[k] is not None), "")
    return Verdict(score, reason.strip(), _safe(folded.get("safe", folded.get("安全"))))


def parse_verdict(content: str) -> Verdict | None:
    """A score and a reason from a judge's reply: JSON, or `Score: 4`, `评分：4`, `4/5`, in code fences, after <think>; None if unreadable."""
    text = _THINK.sub("", content or "").strip()
    fenced = _FENCE.search(text)
    candidates = [fenced.group(1).strip(), text] if fenced else [text]
    for candidate in candidates:
        verdict = _from_json(candidate)
        if verdict is not None:
            return verdict
    for pattern in (_LABELLED, _FRACTION, _POINTS, _BARE):
        match = pattern.search(text)
        if match:
            score = _score(match.group(1))
            if score is None:
                continue
            reason = _REASON.search(text)
            shown = reason.group(1) if reason else text
            safe = False if re.search(r"\"?safe\"?\s*[:：]\s*false|不安全", text, re.IGNORECASE) else None
            return Verdict(score, " ".join(shown.split())[:500], safe)
    return None


# ---- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeSettings:
    """Who judges (model, endpoint, price), on which rubric, with which threshold; resolved once from the config."""

    model: str
    base_url: str | None
    api_key_env: str
    price: Price | None
    min_score: float
    judge: bool
    moderate: bool
    lang: str
    template: Template | None

    def teacher(self, cfg: GenerateConfig) -> TeacherSettings:
        """How the judge route drives its endpoint: the run's limits, the judge's model, a deterministic decoding."""
        limit = min(JUDGE_MAX_TOKENS, cfg.max_tokens or JUDGE_MAX_TOKENS)
        return TeacherSettings(model=self.model, base_url=self.base_url, timeout=cfg.timeout, retries=cfg.retries,
                               concurrency=cfg.concurrency, adaptive=getattr(cfg, "adaptive_concurrency", False), rpm=cfg.rpm,
                               tpm=cfg.tpm, temperature=JUDGE_TEMPERATURE, top_p=None, max_tokens=limit)

    def manifest(self) -> dict:
        return {"model": self.model, "endpoint_kind": endpoint_kind(self.base_url), "base_url": public_url(self.base_url),
                "price_in_per_1m": self.price.input if self.price else None,
                "price_out_per_1m": self.price.output if self.price else None,
                "template": {"name": self.template.name, "sha256": self.template.sha256} if self.template else None,
                "min_score": self.min_score, "judge": self.judge, "moderate": self.moderate}


def rubric_name(lang: str, conversation: bool = False) -> str:
    """The rubric template: judge_* rates an instruction record, conversation_* every turn of a `messages` record (chat)."""
    return f"judge/{'conversation' if conversation else 'judge'}_{'zh' if lang.startswith('zh') else 'en'}.jinja"


def judge_settings(cfg: GenerateConfig, lang: str, console=None, conversation: bool = False) -> JudgeSettings:
    """The judge of a run: --judge-model / --judge-base-url / --judge-price-* when given, else the run's own teacher and price.

    With --batch the verdicts go through the Batch API too, so the judge's price is its batch price.
    """
    from selfinstruct.batch import run_price_for

    own = cfg.judge_model is None and cfg.judge_base_url is None
    model = cfg.judge_model or cfg.model
    base_url = cfg.judge_base_url if cfg.judge_base_url is not None else cfg.base_url
    price_in = cfg.judge_price_in if cfg.judge_price_in is not None or not own else cfg.price_in
    price_out = cfg.judge_price_out if cfg.judge_price_out is not None or not own else cfg.price_out
    price = run_price_for(cfg, resolve_price(model, endpoint_kind(base_url), price_in, price_out))
    if price is None and cfg.max_cost is not None:
        raise ConfigError(f"--max-cost needs the judge's price, and {model!r} is not in the price table",
                          "pass --judge-price-in and --judge-price-out (USD per 1M tokens)")
    if price is None and console is not None and not own:
        console.print(f"[yellow]warning:[/] no price known for the judge {model!r}; its cost will be reported as unknown "
                      "(pass --judge-price-in/--judge-price-out)")
    template = load_template(rubric_name(lang, conversation)) if cfg.judge else None
    return JudgeSettings(model=model, base_url=base_url, api_key_env=cfg.judge_api_key_env or cfg.api_key_env, price=price,
                         min_score=cfg.min_score, judge=cfg.judge, moderate=cfg.moderate, lang=lang, template=template)


def check_judgeable(previous: dict | None, settings: JudgeSettings) -> None:
    """Refuse to resume a gate with another judge, rubric, threshold or moderation: kept verdicts would mix two gates."""
    old = (previous or {}).get("judge")
    if not isinstance(old, dict):
        return
    now = settings.manifest()
    mismatches = []
    for key, flag in (("model", "--judge-model"), ("min_score", "--min-score"), ("judge", "--judge"), ("moderate", "--moderate"),
                      ("price_in_per_1m", "--judge-price-in"), ("price_out_per_1m", "--judge-price-out")):
        if key in old and old[key] != now[key]:
            mismatches.append(f"{flag} (was {old[key]!r})")
    if (old.get("template") or {}).get("sha256") not in (None, (now["template"] or {}).get("sha256")):
        mismatches.append(f"rubric template {old['template'].get('name')}")
    if mismatches:
        raise OutputError(f"judge: this run was gated with a different {', '.join(mismatches)}",
                          "re-run with the original judge settings to resume, or choose a new --out")


# ---- the stage ---------------------------------------------------------------------------------


def text_of(record: dict) -> str:
    """What moderation screens: every turn of a conversation, else instruction, input and output."""
    if isinstance(record.get("messages"), list):
        return "\n\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict) and m.get("content"))
    return "\n\n".join(t for t in (record.get("instruction", ""), record.get("input", ""), record.get("output", "")) if t)


class Judging:
    """The judge stage: a verdict request (and its one retry) per record, then moderation of what the judge keeps.

    `in_place`: the records are the run's own records.jsonl (after generate / evolve); rejections are
    appended as they come and records.jsonl is rewritten once at the end. Otherwise the records come
    from elsewhere and each is appended to records.jsonl or rejected.jsonl as its verdict lands.
    """

    name = STAGE
    ledger_stages = (STAGE,)

    def __init__(self, settings: JudgeSettings, engine: Engine, cfg: GenerateConfig, records: Sequence[dict] | None = None, *,
                 in_place: bool = False, source: dict | None = None, own_manifest: bool = False) -> None:
        self.settings = settings
        self.engine = engine
        self.run = engine.run
        self.cfg = cfg
        # A batch judge hands out every verdict at once: they go as one batch, not --concurrency at a time.
        self.window = BATCH_WINDOW if cfg.batch else cfg.concurrency
        self.in_place = in_place
        self.records = list(records) if records is not None else None
        self.source = source or {}
        self.own_manifest = own_manifest
        self.tally = Tally()
        self.histogram: collections.Counter = collections.Counter()
        self.judged: dict[str, dict] = {}  # in place: kept records with their verdicts, written at the end
        self.gone: set[str] = set()  # in place: ids the gate rejected
        self.total = 0
        self.done = 0
        self.completed = False
        # endpoint: /v1/moderations; judge-safety: the endpoint has none, so the judge's "safe" decides; None: off.
        self.moderation: str | None = "endpoint" if settings.moderate else None
        self._moderation_note = False
        self._moderation_probe = asyncio.Lock()
        self._moderation_seen = False
        self.json_fallback: str | None = None
        self.sample_reply = ""
        self._queue = iter(())

    # ---- resume -------------------------------------------------------------------------

    def load(self) -> None:
        """What earlier attempts finished (from the run's files); every record not finished is queued."""
        previous = (self.engine.previous or {}).get("judge") or {}
        if self.moderation and previous.get("moderation") == "judge-safety":
            self.moderation = "judge-safety"  # learned on an earlier attempt: the endpoint has no moderation
        self.json_fallback = previous.get("json_mode_fallback")
        rejected = [r for r in self.run.load(REJECTED) if (r.get("meta") or {}).get("stage") == STAGE]
        finished: set[str] = set()
        for rec in rejected:
            finished.add(rec["id"])
            self.gone.add(rec["id"])
            self._count(rec, rec.get("reason", "unknown"))
        if self.in_place:
            # Every record still in records.jsonl is judged (paid verdicts replay from the ledger): the file is
            # rewritten only when the gate completes, and a completed gate never runs again (gated_before). A
            # meta.judge a record already has came with the input (an earlier judge) and is replaced.
            self.records = self.run.load(RECORDS)
        else:
            for rec in self.run.load(RECORDS):
                finished.add(rec["id"])
                self._count(rec, None)
        todo = [r for r in self.records or [] if r["id"] not in finished]
        self.total = len(self.records or [])
        self.done = self.total - len(todo)
        self._queue = iter(todo)

    def _count(self, rec: dict, reason: str | None) -> None:
        verdict = (rec.get("meta") or {}).get("judge")
        if isinstance(verdict, dict) and verdict.get("score") in SCORES:
            self.histogram[int(verdict["score"])] += 1
        if reason is None:
            self.tally.kept += 1
        else:
            self.tally.rejected[reason] += 1

    # ---- jobs ---------------------------------------------------------------------------

    def next_job(self, running: int) -> Callable[[], Awaitable[None]] | None:
        record = next(self._queue, None)
        if record is None:
            return None
        return lambda: self._gate(record)

    async def _gate(self, record: dict) -> None:
        meta = dict(record.get("meta") or {}) if isinstance(record.get("meta"), dict) else {}
        meta.pop("judge_request_ids", None)  # an earlier gate's (a grown textbook run is gated again): the verdicts replay
        record = {**record, "meta": meta}
        verdict = None
        if self.settings.judge:
            verdict, problem = await self._judge(record)
            self.engine.outcome(0 if verdict is None else 1)
            if problem:
                return self._reject(record, *problem)
            meta["judge"] = {"score": verdict.score, "reason": verdict.reason, "model": self.settings.model}
            if verdict.safe is not None:
                meta["judge"]["safe"] = verdict.safe
            self.histogram[verdict.score] += 1
            if verdict.score < self.settings.min_score:
                return self._reject(record, "low-score", f"{verdict.score}/5 < --min-score {self.settings.min_score:g}: {verdict.reason}")
        if self.moderation:
            problem = await self._moderate(record, verdict)
            if problem:
                return self._reject(record, *problem)
        self._keep(record)

    async def _judge(self, record: dict) -> tuple[Verdict | None, tuple[str, str] | None]:
        """The verdict (asked once, and once more if unreadable), or why there is none."""
        transport = self.engine.routes["judge"].transport
        previous = None
        for attempt in (1, 2):
            # A conversation rubric reads `messages`; the instruction rubric leaves it unused.
            messages = self.settings.template.render(instruction=record.get("instruction", ""), input=record.get("input", ""),
                                                     output=record.get("output", ""), messages=record.get("messages") or [],
                                                     lang=self.settings.lang, previous=previous)
            if transport is not None and transport.json_mode_error:
                self.json_fallback = transport.json_mode_error
            # JSON mode where the server has it; the same messages as plain text where it refuses response_format.
            json_mode = not self.json_fallback
            entry = await self.engine.ask(
                STAGE, f"rate:{attempt}:{record['id']}", messages, max_tokens=min(JUDGE_MAX_TOKENS, self.cfg.max_tokens or JUDGE_MAX_TOKENS),
                json_mode=json_mode, text_messages=(lambda m=messages: m) if json_mode else None,
                fields={"record_id": record["id"], "attempt": attempt}, route="judge",
            )
            record["meta"].setdefault("judge_request_ids", []).append(entry["request_id"])
            if entry["status"] != "ok":
                return None, ("judge-failed", f"the judge request failed: {entry.get('error', '')}")
            content = entry.get("content", "")
            verdict = parse_verdict(content)
            if verdict is not None:
                return verdict, None
            self.sample_reply = content
            previous = content[:2000] or "(empty reply)"
        shown = " ".join(previous.split())[:200]
        return None, ("judge-failed", f"no score could be read from the judge's reply, twice (the last began {shown!r})")

    async def _moderate(self, record: dict, verdict: Verdict | None) -> tuple[str, str] | None:
        """Why moderation rejects a kept record, or None: the endpoint's flags, else the judge's safety verdict."""
        if self.moderation == "endpoint" and not self._moderation_seen:
            # One request finds out whether the endpoint has moderation; the others wait for its answer.
            async with self._moderation_probe:
                if not self._moderation_seen:
                    try:
                        return await self._screen(record, verdict)
                    finally:
                        self._moderation_seen = True
        return await self._screen(record, verdict)

    async def _screen(self, record: dict, verdict: Verdict | None) -> tuple[str, str] | None:
        if self.moderation == "endpoint":
            # The Batch API has no moderation: a batch judge screens through the online route add_judge_route made for it.
            transport = self.engine.routes.get(MODERATION_ROUTE, self.engine.routes["judge"]).transport
            try:
                flagged, categories = await transport.moderate(text_of(record))
            except ModerationUnavailable as exc:
                if not self.settings.judge:
                    # Nothing else could screen the records: stop rather than reject (or keep) them all unscreened.
                    raise RunStopped("moderation-unavailable", f"the endpoint has no /v1/moderations ({exc}) (hint: add --judge to "
                                     "screen kept records with the judge's safety verdict, or drop --moderate)", exit_code=1) from None
                self._no_moderation(str(exc))
            except RequestFailed as exc:
                return "moderation", f"the moderation request failed: {exc.message}"
            else:
                record["meta"]["moderation"] = {"source": "endpoint", "flagged": flagged, "categories": categories}
                return ("moderation", f"flagged: {', '.join(categories) or 'no category given'}") if flagged else None
        if self.moderation == "judge-safety":
            if verdict is None:
                return "moderation", "the endpoint has no /v1/moderations and --judge is off, so nothing could screen the record"
            if verdict.safe is False:
                record["meta"]["moderation"] = {"source": "judge-safety", "flagged": True, "categories": ["unsafe (judge)"]}
                return "moderation", f"flagged: unsafe (judge): {verdict.reason}"
        return None

    def _no_moderation(self, why: str) -> None:
        """Say once that the endpoint has no moderation; from then on the judge's safety verdict decides."""
        if self.moderation != "endpoint":
            return
        self.moderation = "judge-safety"
        if not self._moderation_note:
            self._moderation_note = True
            fallback = "the judge's safety verdict screens kept records instead" if self.settings.judge else \
                "add --judge to screen them with the judge's safety verdict"
            self.engine.notify(f"note: the endpoint has no /v1/moderations ({why}); {fallback}")

    def _keep(self, record: dict) -> None:
        self.done += 1
        self.tally.kept += 1
        if self.in_place:
            self.judged[record["id"]] = record
        else:
            self.run.append(RECORDS, [record])

    def _reject(self, record: dict, reason: str, detail: str) -> None:
        record["meta"]["gated_stage"] = record["meta"].get("stage")
        record["meta"]["stage"] = STAGE  # the stage that rejected it: generate and evolve do not count it as theirs
        record["reason"], record["detail"] = reason, detail
        self.run.append(REJECTED, [record])
        self.gone.add(record["id"])
        self.done += 1
        self.tally.rejected[reason] += 1

    # ---- the end ------------------------------------------------------------------------

    def finish(self) -> None:
        """In place: rewrite records.jsonl as the gated dataset (kept records with their verdicts, rejected ones gone)."""
        transport = self.engine.routes["judge"].transport
        if transport is not None and transport.json_mode_error:
            self.json_fallback = transport.json_mode_error
        if self.in_place:
            rewrite_records(self.run, self.judged, self.gone)
        self.completed = True

    def low_yield(self, useful: int, window: int) -> str | None:
        sample = one_line(self.sample_reply)
        return (f"only {useful} of the last {window} judge replies held a readable score; stopping instead of spending on. "
                f"A sample reply: {sample!r} (hint: check --judge-model and its endpoint, then re-run to resume)")

    def progress(self) -> tuple[str, int, int]:
        return "judged", self.done, self.total

    def counts(self) -> tuple[int, collections.Counter]:
        # In place the records were counted kept by the stage that made them: the gate takes its rejections off.
        if self.in_place:
            return -sum(self.tally.rejected.values()), self.tally.rejected
        return self.tally.kept, self.tally.rejected

    def summary(self) -> dict:
        return {**self.settings.manifest(), "moderation": self.moderation, "json_mode_fallback": self.json_fallback,
                "completed": self.completed, "judged": sum(self.histogram.values()), "kept": self.tally.kept,
                "rejected": dict(sorted(self.tally.rejected.items())),
                "histogram": {str(s): self.histogram.get(s, 0) for s in SCORES},
                "batch": bool(self.cfg.batch)}

    def describe(self, m: dict) -> None:
        if self.own_manifest:
            keys = ("model", "base_url", "api_key_env", "concurrency", "rpm", "tpm", "timeout", "retries", "max_tokens", "max_cost",
                    "price_in", "price_out", "min_yield", "yield_window", "grace", "judge_model", "judge_base_url",
                    "judge_api_key_env", "judge_price_in", "judge_price_out", "min_score", "moderate")
            m["config"] = {k: v for k, v in self.cfg.to_dict().items() if k in keys} | {
                "lang": self.settings.lang, "base_url": public_url(self.cfg.base_url), "judge_base_url": public_url(self.cfg.judge_base_url)}
            m["input"] = self.source
        if self.settings.template is not None:
            m["templates"] = dict(m.get("templates") or {}) | {
                "judge-rubric": {"name": self.settings.template.name, "sha256": self.settings.template.sha256}}
        m["filters"] = dict(m.get("filters") or {}) | {"judge_min_score": self.settings.min_score if self.settings.judge else None,
                                                         "moderation": self.moderation}
        m["judge"] = self.summary()


def rewrite_records(run: RunDir, judged: dict[str, dict], gone: set[str]) -> None:
    """Replace records.jsonl by the gated dataset atomically (a kill leaves the old file or the new one, never half)."""
    run.close()  # the append handle points at the file about to be replaced
    path = run.path / RECORDS
    rows = []
    for rec in run.load(RECORDS):
        if rec["id"] in gone:
            continue
        rows.append(judged.get(rec["id"], rec))
    write_jsonl_atomic(path, rows)


def gated_before(run: RunDir, cfg: GenerateConfig) -> bool:
    """Whether the gate already rewrote this run's records.jsonl (so generating again would refill what it took out).

    A gated run re-run without --judge / --moderate is refused: it would refill records.jsonl with unjudged records.
    """
    gate = (run.load_manifest() or {}).get("judge") if run.manifest_path.exists() else None
    if not isinstance(gate, dict):
        return False
    if not (cfg.judge or cfg.moderate):
        flags = " ".join(f for f, on in (("--judge", gate.get("judge")), ("--moderate", gate.get("moderate"))) if on)
        raise OutputError(f"{run.path}: this run was gated by {flags or 'the judge'}; without it, a re-run would refill records.jsonl "
                          "with records nobody judged", f"re-run with {flags or '--judge'}, or choose a new --out")
    if gate.get("completed"):
        return True
    # A kill between the rewrite and the manifest: every record carries the gate's mark.
    records = run.load(RECORDS)
    return bool(records) and all(isinstance(r.get("meta"), dict) and ("judge" in r["meta"] or "moderation" in r["meta"]) for r in records)


# A planning prior for --dry-run: a verdict is a score and a sentence.
VERDICT_TOKENS = 60


def project_gate(cfg: GenerateConfig, lang: str, records: int, samples: Sequence[tuple[str, str, str]]) -> str:
    """The --dry-run line of the gate: verdict requests, tokens and dollars for `records` records like the samples."""
    from selfinstruct.pricing import estimate_prompt_tokens

    settings = judge_settings(cfg, lang)
    prompt = 0.0
    if settings.template is not None and samples:
        prompt = sum(estimate_prompt_tokens(settings.template.render(instruction=i, input=x, output=o, lang=lang, previous=None))
                     for i, x, o in samples) / len(samples)
    tokens = (int(records * prompt), records * VERDICT_TOKENS if settings.judge else 0)
    usd = f"${settings.price.usd(*tokens):.2f}" if settings.price else "unknown (no price for the judge)"
    what = f"≈ {records:,} verdicts by {settings.model} (retries not counted), ≈ {tokens[0]:,} prompt + {tokens[1]:,} completion tokens, ≈ {usd}"
    moderation = "; moderation requests are free at OpenAI" if settings.moderate else ""
    return f"then the gate: {what if settings.judge else 'moderation only'}{moderation}"


# ---- running -----------------------------------------------------------------------------------


def add_judge_route(engine: Engine, settings: JudgeSettings, cfg: GenerateConfig, api_key: str | None) -> None:
    """The judge's teacher on the engine: its own model, endpoint, price and decoding (the run's teacher when not named); with --batch, batched."""
    from selfinstruct.batch import transport_factory

    teacher = settings.teacher(cfg)
    engine.add_route("judge", settings.model, settings.base_url, settings.price, transport_factory(cfg, teacher, api_key, engine, route="judge"))
    if cfg.batch and settings.moderate:
        # /v1/moderations has no batch form: moderation stays online, on the judge's endpoint (it bills no tokens).
        engine.add_route(MODERATION_ROUTE, settings.model, settings.base_url, settings.price, lambda: Teacher(teacher, api_key))


def gate_run(engine: Engine, cfg: GenerateConfig, lang: str, api_key: str | None, console, conversation: bool = False) -> int:
    """After a stage on the same engine: judge and moderate the run's records.jsonl in place (conversation: on the conversation rubric). Returns the exit code."""
    from selfinstruct.batch import transport_factory
    from selfinstruct.engine import teacher_settings
    from selfinstruct.progress import run_displayed

    settings = judge_settings(cfg, lang, console, conversation)
    check_judgeable(engine.previous, settings)
    check_key(settings, api_key)
    add_judge_route(engine, settings, cfg, api_key)
    gate = Judging(settings, engine, cfg, in_place=True)
    gate.load()
    try:
        # The engine opens a transport for its own teacher too; the gate sends only on the "judge" route. The teacher's is
        # the run's own kind (with --batch a batch transport that sends nothing), so the manifest keeps the teacher's batches.
        exit_code = run_displayed(engine, gate, transport_factory(cfg, teacher_settings(cfg), api_key, engine), console, cfg.quiet)
    finally:
        engine.run.close()
    print_gate_summary(engine, gate, console, cfg.quiet or False, exit_code)
    return exit_code


def finish_gated(run: RunDir, cfg: GenerateConfig, license: str | None, console) -> int:
    """A re-run of a finished, gated run: nothing to generate or judge again; push when asked (a failed push is retried so)."""
    if not cfg.quiet:
        console.print(f"{run.path}: already made and judged; nothing to do", highlight=False, markup=False, soft_wrap=True)
    if cfg.push_to:
        from selfinstruct.hub import push_run

        push_run(run.path, cfg.push_to, private=True, license=license,
                 echo=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    return 0


def judge_key(cfg: GenerateConfig, api_key: str | None, judge_api_key: str | None) -> str | None:
    """The judge's key: from --judge-api-key-env when named (never the teacher's instead: it may be another provider), else the teacher's."""
    if cfg.judge_api_key_env:
        return judge_api_key
    return api_key if judge_api_key is None else judge_api_key


def check_key(settings: JudgeSettings, api_key: str | None) -> None:
    """The judge needs a key unless it is a local server and no variable was named."""
    if not api_key and (endpoint_kind(settings.base_url) != "local" or settings.api_key_env != "OPENAI_API_KEY"):
        raise ConfigError(f"no API key for the judge: ${settings.api_key_env} is not set for {settings.base_url or 'the OpenAI API'}",
                          f"export {settings.api_key_env}=..., or pass --judge-api-key-env NAME")


def print_gate_summary(engine: Engine, gate: Judging, console, quiet: bool, exit_code: int) -> None:
    """One line: verdicts, the score histogram, rejections, tokens and dollars of the judge stage."""
    if quiet and not exit_code:
        return
    usage = engine.usage.get(STAGE) or Tally()
    histogram = " ".join(f"{s}:{gate.histogram.get(s, 0):,}" for s in SCORES)
    rejected = ", ".join(f"{r} {n:,}" for r, n in sorted(gate.tally.rejected.items())) or "none"
    price = engine.routes["judge"].price
    cost = f"${engine.stage_usd(STAGE):.4f}" if price else "cost unknown (no price for the judge)"
    moderation = f"; moderation: {gate.moderation}" if gate.moderation else ""
    console.print(f"judge ({gate.settings.model}, --min-score {gate.settings.min_score:g}): {engine.status}; kept {gate.tally.kept:,}, "
                  f"rejected {rejected}; scores {histogram}{moderation}; {usage.requests:,} requests, "
                  f"{usage.prompt_tokens:,}+{usage.completion_tokens:,} tokens, {cost}; {engine.run.path}",
                  soft_wrap=True, highlight=False, markup=False)


def run_judge(cfg: GenerateConfig, inputs: Sequence[Path], limit: int | None, api_key: str | None, judge_api_key: str | None,
              command: str, console) -> int:
    """The judge command after its flags: any dataset → a gated run directory (resumed). Returns the exit code."""
    from selfinstruct.batch import cancel_batches, check_batches, interrupted_note, run_price_for, transport_factory
    from selfinstruct.dirlock import DirectoryLock
    from selfinstruct.engine import check_orphaned, make_engine
    from selfinstruct.inputs import stage_input
    from selfinstruct.pricing import run_price
    from selfinstruct.progress import run_displayed

    out = cfg.out
    records, lang, source = stage_input(inputs, out, limit, cfg.lang, "to judge", "write the judged records to a new directory")
    cfg = dataclasses.replace(cfg, lang=lang, judge=True)
    price = run_price_for(cfg, run_price(cfg, console))
    settings = judge_settings(cfg, lang, console)
    check_key(settings, judge_api_key)
    run = RunDir(out)
    if cfg.cancel_batches:
        # The verdicts' batches live at the judge's endpoint.
        return cancel_batches(run, dataclasses.replace(cfg, model=settings.model, base_url=settings.base_url), judge_api_key,
                              lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))
    run.prepare()
    with DirectoryLock(run.path, command):
        check_orphaned(run)
        engine = make_engine(run, cfg, price, command)
        previous = run.load_manifest()
        if previous and (previous.get("input") or {}).get("sha256") not in (None, source["sha256"]):
            raise OutputError(f"{run.path}: holds verdicts on other input records (files or --limit)", "choose a new --out")
        check_judgeable(previous, settings)
        add_judge_route(engine, settings, cfg, judge_api_key)
        gate = Judging(settings, engine, cfg, records, source=source, own_manifest=True)
        engine.load()
        check_batches(engine, cfg)
        gate.load()
        if gate.done and not cfg.quiet:
            console.print(f"resuming {run.path}: {gate.done:,} of {gate.total:,} records judged")
        try:
            exit_code = run_displayed(engine, gate, transport_factory(cfg, settings.teacher(cfg), api_key, engine), console, cfg.quiet)
        finally:
            run.close()
        print_gate_summary(engine, gate, console, cfg.quiet, exit_code)
        if exit_code in (130, 143):
            console.print(f"interrupted; everything finished is saved. Resume with: {command}", soft_wrap=True, highlight=False,
                          markup=False)
            if cfg.batch:
                console.print(interrupted_note(command), soft_wrap=True, highlight=False, markup=False)
        return exit_code
