"""Evol-Instruct: rewrite instructions harder (in depth) or rarer (in breadth), answer them, eliminate failed evolutions."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import hashlib
import json
import random
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from selfinstruct import __version__
from selfinstruct.card import file_name
from selfinstruct.config import GenerateConfig
from selfinstruct.errors import ConfigError, OutputError, RunStopped
from selfinstruct.export import prompt_text
from selfinstruct.generate import MAX_CONSECUTIVE_FAILURES, Tally, public_url, teacher_mismatches
from selfinstruct.parsing import clean_reply, normalise_input
from selfinstruct.pricing import Price, endpoint_kind, estimate_prompt_tokens, estimate_tokens
from selfinstruct.prompts import Template, load_template
from selfinstruct.rules import RULES, RuleSettings, check, fold, measure, same_text_key
from selfinstruct.rundir import LEDGER, RECORDS, REJECTED, RunDir
from selfinstruct.similarity import TOKEN_RE, DedupIndex, rouge_l
from selfinstruct.teacher import Completion, RequestFailed, Teacher, Usage

IN_DEPTH = ("add-constraints", "deepen", "concretize", "increase-reasoning", "complicate-input")
IN_BREADTH = ("mutate",)
OPS = IN_DEPTH + IN_BREADTH
STAGES = ("evolve", "judge", "respond")
# Rejection reasons only evolution writes (it also writes the generate rules' reasons).
REASONS = ("prompt-leak", "no-gain", "refusal-response", "stopword-response")

# WizardLM's elimination thresholds: an evolution this close to its parent added nothing, and a
# refusal this short is all refusal. Shorter is measured in characters for CJK, words otherwise.
NO_GAIN_SIMILARITY = 0.9
SHORT_CHARS = 160
SHORT_WORDS = 80
# A rewrite is one task, and the judge answers in a word; no need to reserve a full reply for either.
REWRITE_MAX_TOKENS = 2048
JUDGE_MAX_TOKENS = 256

# Words of the rewrite prompts; an instruction that contains one copied the prompt, not a task.
LEAK_MARKERS = (
    "#The Given Prompt#", "#Given Prompt#", "#Rewritten Prompt#", "#Created Prompt#",
    "given prompt", "rewritten prompt", "created prompt",
    "#给定指令#", "#改写后的指令#", "#新指令#", "给定指令", "改写后的指令", "改写后指令",
    "給定指令", "改寫後的指令", "改寫後指令",
)
_LEAKS = tuple(dict.fromkeys((fold(m), m) for m in LEAK_MARKERS))
_REFUSAL = re.compile(
    r"\b(?:sorry|apologi[sz]e|apologies|i cannot|i can't|i can not|i am unable|i'm unable|unable to|as an ai)\b"
    r"|抱歉|对不起|對不起|无法|無法|很遗憾|很遺憾|不能提供|不能回答",
    re.IGNORECASE,
)
EN_STOP_WORDS = frozenset(
    """a about above after again against ah ain all am an and any are aren as at be because been before being below
    between both but by can couldn d did didn do does doesn doing don down during each few for from further had hadn
    has hasn have haven having he her here hers herself him himself his hmm how i if in into is isn it its itself
    just ll m ma me mightn more most mustn my myself needn no nor not now o of off oh ok okay on once only or other
    our ours ourselves out over own re s same shan she should shouldn so some such t than that the their theirs them
    themselves then there these they this those through to too uh um under until up ve very was wasn we well were
    weren what when where which while who whom why will with won wouldn y yeah yes you your yours yourself
    yourselves""".split()
)
# Function characters (no word segmentation needed): particles, pronouns, copulas, conjunctions, fillers.
ZH_STOP_CHARS = frozenset(
    "的了着著过過和与與及或而是在有就都也很还還又把被让讓给給对對于於以之其这這那些个個我你他她它们們"
    "吗嗎呢吧啊呀哦嗯哈嘛么麼啦哇喔唉诶誒咯即则則但并並且所为為从從向到将將可能会會要不没沒儿兒得地哎呃喂噢哟喲嘿"
)
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL | re.IGNORECASE)
_FIELD = re.compile(
    r"^[ \t>*_#-]*[*_]*\s*(?P<label>指令|指示|instruction|输入|輸入|input|输出|輸出|回答|output|response|answer)\s*[*_]*\s*[:：]\s*[*_]*[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)


# ---- pure pieces ---------------------------------------------------------------------------------


def resolve_ops(names: Iterable[str]) -> tuple[str, ...]:
    """The ops a run draws from, in canonical order; names may be comma-separated; none given means all."""
    wanted = [n.strip().lower().replace("_", "-") for n in ",".join(names).split(",") if n.strip()]
    if not wanted:
        return OPS
    unknown = [n for n in wanted if n not in OPS]
    if unknown:
        raise ConfigError(f"--ops: unknown operation {unknown[0]!r}", f"choose from {', '.join(OPS)}")
    return tuple(op for op in OPS if op in wanted)


def draw_op(ops: Sequence[str], seed: int, round_no: int, parent_id: str) -> str:
    """The op of one step, from an rng derived from the run seed, round and parent, so a resumed run draws the same."""
    return random.Random(f"{seed}:evol:{round_no}:{parent_id}").choice(list(ops))


def template_suffix(lang: str) -> str:
    """Which shipped templates a language uses: zh (Simplified and Traditional) or en."""
    return "zh" if lang.startswith("zh") else "en"


def parse_rewrite(content: str, finish_reason: str | None) -> tuple[str, str, tuple[str, str] | None]:
    """(instruction, input, problem) from a rewrite reply; labels are optional, chatter before them is dropped."""
    if finish_reason == "length":
        return "", "", ("truncated", "the rewrite was cut by the token limit")
    text = clean_reply(content)
    spans: dict[str, tuple[int, int]] = {}
    order = {"instruction": 0, "input": 1, "output": 2}
    last = -1
    for m in _FIELD.finditer(text):
        label = m.group("label").lower()
        kind = "instruction" if label in ("指令", "指示", "instruction") else "input" if label in ("输入", "輸入", "input") else "output"
        if order[kind] <= last:
            continue  # a label-like line inside a field, not a new field
        spans[kind] = (m.start(), m.end())
        last = order[kind]
    if not spans:
        instruction, input_text = text, ""
    else:
        bounds = sorted(spans.values())

        def field(kind: str) -> str:
            if kind not in spans:
                return ""
            start, end = spans[kind]
            stop = min((s for s, _ in bounds if s > start), default=len(text))
            return text[end:stop].strip()

        first = bounds[0][0]
        instruction = field("instruction") or (text[:first].strip() if "instruction" not in spans else "")
        input_text = normalise_input(field("input"))
    if not instruction.strip():
        return "", "", ("unparseable", f"no instruction in the rewrite: {text[:200]!r}")
    return instruction.strip(), input_text, None


def leaked_marker(*texts: str) -> str | None:
    """The rewrite-prompt phrase a text copied, or None."""
    for text in texts:
        folded = fold(text)
        for pattern, marker in _LEAKS:
            if pattern in folded:
                return marker
    return None


def no_gain(parent: str, child: str) -> str | None:
    """Why an evolution added nothing (identical or ROUGE-L >= 0.9 to its parent), or None."""
    if same_text_key(parent) == same_text_key(child):
        return "identical to its parent"
    score = rouge_l(parent, child)
    return f"ROUGE-L {score:.3f} with its parent" if score >= NO_GAIN_SIMILARITY else None


def is_short(text: str) -> tuple[bool, int, str]:
    """Under 160 characters (CJK) or 80 words (other scripts), with the measured length and unit."""
    n, unit = measure(text)
    return n < (SHORT_CHARS if unit == "chars" else SHORT_WORDS), n, unit


def refusal_response(output: str) -> str | None:
    """Why an answer is a refusal (a refusal word in a short answer), or None."""
    m = _REFUSAL.search(unicodedata.normalize("NFKC", output).replace("’", "'"))
    if m is None:
        return None
    short, n, unit = is_short(output)
    return f"a {n}-{unit[:-1]} answer with {m.group(0)!r}" if short else None


def stopword_response(output: str) -> str | None:
    """Why an answer says nothing (only punctuation and stop words), or None."""
    tokens = TOKEN_RE.findall(unicodedata.normalize("NFKC", output).lower())
    if any(t not in EN_STOP_WORDS and t not in ZH_STOP_CHARS for t in tokens):
        return None
    if not tokens:
        return "the answer is only punctuation"
    return f"the answer is only punctuation and stop words ({' '.join(tokens[:8])})"


def judge_verdict(content: str) -> str:
    """equal, not-equal or unclear, from the judge's one-word reply."""
    text = fold(clean_reply(content))
    if re.search(r"notequal|unequal|不相同|不同|不一样|不一樣|不等同", text):
        return "not-equal"
    if re.search(r"equal|相同|一样|一樣|等同", text):
        return "equal"
    return "unclear"


def check_instruction(instruction: str, input_text: str, settings: RuleSettings) -> tuple[str, str] | None:
    """The generate rules that look only at the instruction, run before paying for an answer."""
    if not instruction.strip():
        return ("empty", "instruction is empty") if "empty" in settings.enabled else None
    for name in ("too-short", "too-long", "starts-with-punctuation", "wrong-language", "blacklist", "refusal"):
        if name in settings.enabled:
            detail = RULES[name](instruction, input_text, "", settings)
            if detail is not None:
                return name, detail
    return None


def strip_think(content: str) -> str:
    """An answer without the reasoning block some teachers put first."""
    return _THINK.sub("", content or "").strip()


def chain_of(record: dict) -> list[dict]:
    """The evol steps a record already carries."""
    meta = record.get("meta")
    steps = meta.get("evol") if isinstance(meta, dict) else None
    return [s for s in steps if isinstance(s, dict)] if isinstance(steps, list) else []


def stage_of(record: dict) -> str:
    meta = record.get("meta")
    return str(meta.get("stage") or "generate") if isinstance(meta, dict) else "generate"


def infer_lang(instructions: Iterable[str]) -> str:
    """zh when at least half the instructions are mainly Han, else en."""
    from selfinstruct.rules import script_of

    scripts = [script_of(t) for t in instructions]
    return "zh" if scripts and scripts.count("zh") * 2 >= len(scripts) else "en"


def records_sha256(records: Sequence[dict]) -> str:
    """A fingerprint of the parents a run evolves, so a resume into another input is refused."""
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps([rec["id"], rec["instruction"], rec["input"]], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def input_seeds(paths: Sequence[Path]) -> dict | None:
    """The seeds the input run directories' manifests record; None unless every input is a run that records them."""
    found: list[dict] = []
    for path in map(Path, paths):
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8")) if path.is_dir() else None
        except (OSError, ValueError):
            manifest = None
        seeds = manifest.get("seeds") if isinstance(manifest, dict) else None
        if not isinstance(seeds, dict) or not seeds.get("path"):
            return None  # records not made from seeds (or not recorded): claiming a seed file would mislead the card
        # Only the file name: a published card must not show where the seeds sat on the maker's disk.
        found.append({**seeds, "path": file_name(str(seeds["path"]))})
    unique = list({json.dumps(s, sort_keys=True): s for s in found}.values())
    if len(unique) <= 1:
        return unique[0] if unique else None
    # Runs from several seed files: name them all; a licence holds only if they all declare the same.
    counts = [s.get("count") for s in unique]
    licences = {s.get("license") for s in unique}
    return {"path": ", ".join(dict.fromkeys(s["path"] for s in unique)),
            "count": sum(counts) if all(isinstance(c, int) for c in counts) else None,
            "sha256": None, "license": licences.pop() if len(licences) == 1 else None}


def read_base(paths: Sequence[Path], limit: int | None = None) -> list[dict]:
    """Records of any dataset the project reads, in the run's record shape (meta kept when the input has one)."""
    from selfinstruct.corpus import read_records

    df = read_records(paths)
    if limit is not None:
        df = df.head(limit)
    base: list[dict] = []
    for row in df.to_dicts():
        meta = row.get("meta")
        if isinstance(meta, str):
            try:
                meta = json.loads(meta)
            except ValueError:
                meta = None
        meta = {k: v for k, v in meta.items() if v is not None} if isinstance(meta, dict) else {}
        base.append({"id": str(row["id"]), "instruction": row["instruction"] or "", "input": row["input"] or "",
                     "output": row["output"] or "", "meta": meta})
    return base


@dataclass(frozen=True)
class EvolTemplates:
    """The templates of one evolution: one per op, the answer template, and the judge if asked for."""

    ops: dict[str, Template]
    respond: Template
    judge: Template | None

    def manifest(self) -> dict[str, dict]:
        out = {f"evolve/{op}": {"name": t.name, "sha256": t.sha256} for op, t in self.ops.items()}
        out["respond"] = {"name": self.respond.name, "sha256": self.respond.sha256}
        if self.judge is not None:
            out["judge"] = {"name": self.judge.name, "sha256": self.judge.sha256}
        return out


def load_templates(lang: str, ops: Sequence[str], judge: bool) -> EvolTemplates:
    """The shipped prompts/evol templates for a language."""
    suffix = template_suffix(lang)
    return EvolTemplates(
        ops={op: load_template(f"evol/{op}_{suffix}.jinja") for op in ops},
        respond=load_template(f"evol/respond_{suffix}.jinja"),
        judge=load_template(f"evol/judge_{suffix}.jinja") if judge else None,
    )


# ---- the run -------------------------------------------------------------------------------------


@dataclass
class _OpCounts:
    kept: int = 0
    eliminated: collections.Counter = field(default_factory=collections.Counter)


class _Halted(Exception):
    """A step stopped before its next request (interrupt or budget elsewhere); resume finishes it."""


class Evolution:
    """Evol-Instruct rounds into a run directory: rewrite, judge, answer, eliminate; ledger first, resumable."""

    def __init__(
        self,
        cfg: GenerateConfig,
        run: RunDir,
        price: Price | None,
        lang: str,
        command: str,
        *,
        base: list[dict] | None = None,
        extra_index: Sequence[tuple[str, str]] = (),
        copy_base: bool = False,
        source: dict | None = None,
        seeds: dict | None = None,
        base_manifest: Callable[[], dict] | None = None,
        base_usd: Callable[[], float] = lambda: 0.0,
        on_progress: Callable[["Evolution"], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run = run
        self.price = price
        self.lang = lang
        self.command = command
        self.base = base
        self.extra_index = extra_index
        self.copy_base = copy_base
        self.source = source or {}
        # An evolved run directory's data still comes from its seeds: the card must name them and their licence.
        self.seeds = seeds
        self.base_manifest = base_manifest
        self.base_usd = base_usd
        self.on_progress = on_progress
        self.ops = resolve_ops(cfg.evol_ops)
        self.templates = load_templates(lang, self.ops, cfg.judge_equal)
        self.rules = RuleSettings(lang=lang, enabled=frozenset(r for r in RuleSettings().enabled if r not in cfg.no_rule))
        self.checks = frozenset(r for r in (*REASONS, "near-duplicate") if r not in cfg.no_rule)
        self.index = DedupIndex(cfg.similarity)
        self.tally = Tally()
        self.stage_tally = {s: Tally() for s in STAGES}
        self.by_op: dict[str, dict[int, _OpCounts]] = {}
        self.replies: dict[str, dict] = {}
        self.kept: dict[str, dict] = {}
        self.finished: set[str] = set()
        self.base_ids: set[str] = set()
        self.originals = 0
        self.round = 0
        self.round_size = 0
        self.round_done = 0
        self.rounds_completed = 0
        self.status = "running"
        self.stop_reason: str | None = None
        self.started = time.monotonic()
        self.created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.recent: collections.deque[int] = collections.deque(maxlen=cfg.yield_window)
        self.consecutive_failures = 0
        self.sample_reply = ""
        self._reserved = 0.0
        # Billed but unusable replies of requests still retrying: spent, not in the tally yet.
        self._billed = 0.0
        self._in_flight = 0
        self._stop_requested: str | None = None
        self._budget_hit = False
        self._last_manifest = 0.0

    # ---- resume -------------------------------------------------------------------------

    def load(self) -> None:
        """Read what earlier attempts wrote: kept and rejected records, and every paid reply in the ledger."""
        records = self.run.load(RECORDS)
        rejected = self.run.load(REJECTED)
        ledger = self.run.load(LEDGER)
        previous = self.run.load_manifest() or {}
        if self.base_manifest is None:
            self.created = previous.get("created", self.created)
        self.rounds_completed = int((previous.get("evol") or {}).get("rounds_completed", 0) or 0)
        if self.base is None:
            self.base = [r for r in records if stage_of(r) == "generate"]
        self.base_ids = {r["id"] for r in self.base}
        present = {r["id"] for r in records}
        for key, text in self.extra_index:
            self.index.add(key, text)
        for rec in self.base:
            if rec["id"] not in present:
                self.index.add(rec["id"], rec["instruction"])
        for rec in records:
            self.index.add(rec["id"], rec["instruction"])
            if self._ours(rec):
                self.kept[rec["id"]] = rec
                self.finished.add(rec["id"])
                self._count(rec, None)
        for rec in rejected:
            if self._ours(rec):
                self.finished.add(rec["id"])
                self._count(rec, rec.get("reason", "unknown"))
        for entry in ledger:
            if entry.get("stage") in STAGES:
                self.replies[entry["request_id"]] = entry
                self._add_usage(entry)
        if self.copy_base:
            missing = [self._original(r) for r in self.base if r["id"] not in present]
            if missing:
                self.run.append(RECORDS, missing)
            self.originals = len(self.base)

    def _ours(self, rec: dict) -> bool:
        return stage_of(rec) == "evolve" and rec["id"] not in self.base_ids and bool(chain_of(rec))

    @staticmethod
    def _original(rec: dict) -> dict:
        """An input record copied into the run, so records.jsonl is the whole dataset (WizardLM keeps the originals)."""
        meta = dict(rec.get("meta") or {})
        meta["evol"] = chain_of(rec)
        meta.setdefault("stage", "input")
        return {"id": rec["id"], "instruction": rec["instruction"], "input": rec["input"], "output": rec["output"], "meta": meta}

    def child_id(self, parent_id: str, round_no: int) -> str:
        """The id of a parent's evolution in a round; never one of the input's own ids."""
        cid = f"{parent_id}.e{round_no}"
        while cid in self.base_ids:
            cid += "'"
        return cid

    # ---- counters -----------------------------------------------------------------------

    def _count(self, rec: dict, reason: str | None) -> None:
        step = chain_of(rec)[-1]
        # Per round of this run (meta.round): an evolved input's steps sit deeper in the lineage than the run's round.
        round_no = (rec.get("meta") or {}).get("round", step.get("round", 0))
        counts = self.by_op.setdefault(str(step.get("op")), {}).setdefault(int(round_no), _OpCounts())
        if reason is None:
            counts.kept += 1
            self.tally.kept += 1
        else:
            counts.eliminated[reason] += 1
            self.tally.rejected[reason] += 1
        self.tally.items += 1

    def _add_usage(self, entry: dict) -> None:
        for tally in (self.tally, self.stage_tally[entry["stage"]]):
            tally.requests += 1
            tally.add_usage(entry)
            tally.add_attempts(entry)
            if entry.get("status") != "ok":
                tally.failed_requests += 1

    def stage_usd(self, stage: str) -> float:
        t = self.stage_tally[stage]
        return self.price.usd(t.prompt_tokens, t.completion_tokens) if self.price else 0.0

    @property
    def usd(self) -> float:
        """Dollars of the whole run so far, generation included."""
        return self.base_usd() + sum(self.stage_usd(s) for s in STAGES)

    def worst_case_usd(self, messages: list[dict[str, str]], max_tokens: int | None) -> float:
        if not self.price:
            return 0.0
        # Estimates can undershoot real tokenisers on CJK text; pad the prompt by half.
        return self.price.usd(estimate_prompt_tokens(messages) * 1.5, max_tokens or self.cfg.max_tokens or 4096)

    # ---- stopping -----------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ask the run to stop starting requests (signal handlers call this)."""
        self._stop_requested = reason

    def check_health(self) -> None:
        """Stop an evolution that only spends: almost nothing survives, or the teacher is down."""
        window = self.cfg.yield_window
        if len(self.recent) >= window and sum(self.recent) < self.cfg.min_yield * window:
            sample = (self.sample_reply or "").strip().replace("\n", "⏎")[:300]
            raise RunStopped(
                "low-yield",
                f"only {sum(self.recent)} of the last {window} evolutions survived; stopping instead of spending on. "
                f"A sample rewrite: {sample!r} (hint: check the model and rejected.jsonl, then re-run to resume)",
                exit_code=1,
            )
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            raise RunStopped(
                "teacher-unavailable",
                f"the last {self.consecutive_failures} requests failed after retries "
                f"(hint: check the teacher at --base-url; re-run the same command to resume)",
                exit_code=1,
            )

    # ---- the loop -----------------------------------------------------------------------

    async def run_async(self, teacher: Teacher) -> None:
        """Run the rounds: each evolves the survivors of the last; finished steps are skipped on resume."""
        self.save_manifest(force=True)
        try:
            parents = list(self.base or [])
            for round_no in range(1, self.cfg.evol_rounds + 1):
                parents = await self._round(teacher, round_no, parents)
                if self._stop_requested:
                    raise RunStopped(self._stop_requested, "stopped on request")
                self.rounds_completed = max(self.rounds_completed, round_no)
            self.status = "completed"
        except RunStopped as stop:
            self.status = "stopped"
            self.stop_reason = stop.reason
            raise
        except BaseException:
            self.status = "failed"
            raise
        finally:
            self.save_manifest(force=True)

    async def _round(self, teacher: Teacher, round_no: int, parents: list[dict]) -> list[dict]:
        """Evolve every parent once; return the survivors in parent order."""
        self.round, self.round_size, self.round_done = round_no, len(parents), 0
        children: dict[str, dict] = {}
        todo = []
        for parent in parents:
            cid = self.child_id(parent["id"], round_no)
            if cid in self.kept:
                children[parent["id"]] = self.kept[cid]
            if cid in self.finished:
                self.round_done += 1
            else:
                todo.append(parent)
        queue = iter(todo)
        pending: set[asyncio.Task] = set()
        window = self.cfg.concurrency * 2
        try:
            while True:
                self.check_health()
                while not self._stop_requested and not self._budget_hit and len(pending) < window:
                    parent = next(queue, None)
                    if parent is None:
                        break
                    pending.add(asyncio.ensure_future(self._step(teacher, round_no, parent)))
                if not pending:
                    break
                done, pending = await asyncio.wait(pending, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
                errors = [task.exception() for task in done if task.exception() is not None]
                for task in done:
                    if task.exception() is None:
                        self._collect(task.result(), children)
                if errors:
                    raise errors[0]
                self.save_manifest()
                if self.on_progress:
                    self.on_progress(self)
        except RunStopped:
            self._budget_hit = True
            await self._drain(pending, children)
            raise
        except BaseException:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        return [children[p["id"]] for p in parents if p["id"] in children]

    def _collect(self, result: tuple[str, dict | None, bool], children: dict[str, dict]) -> None:
        parent_id, child, finished = result
        if not finished:
            return
        self.round_done += 1
        self.recent.append(1 if child is not None else 0)
        if child is not None:
            children[parent_id] = child

    async def _drain(self, pending: set[asyncio.Task], children: dict[str, dict], grace: float = 10.0) -> None:
        """Let requests in flight land (they are paid for) for a few seconds, then cancel the rest."""
        if not pending:
            return
        done, rest = await asyncio.wait(pending, timeout=grace)
        for task in done:
            if not task.cancelled() and task.exception() is None:
                self._collect(task.result(), children)
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    # ---- one step: rewrite → checks → (judge) → answer → checks -------------------------

    async def _step(self, teacher: Teacher, round_no: int, parent: dict) -> tuple[str, dict | None, bool]:
        pid = parent["id"]
        try:
            return pid, await self._evolve(teacher, round_no, parent), True
        except _Halted:
            return pid, None, False

    async def _evolve(self, teacher: Teacher, round_no: int, parent: dict) -> dict | None:
        pid = parent["id"]
        op = draw_op(self.ops, self.cfg.seed, round_no, pid)
        prior = chain_of(parent)
        # Lineage depth, so evolving evolved data goes on 1, 2, …; meta.round, ids and ledger keys (resume) stay this run's.
        chain = [*prior, {"round": len(prior) + 1, "op": op, "parent_id": pid}]
        ancestors = {s["parent_id"] for s in chain}
        template = self.templates.ops[op]
        parent_meta = parent.get("meta") if isinstance(parent.get("meta"), dict) else {}
        record: dict = {"id": self.child_id(pid, round_no), "instruction": "", "input": "", "output": ""}
        meta: dict = {
            "seed_ids": list(parent_meta.get("seed_ids") or []),
            "template": template.name,
            "template_sha256": template.sha256,
            "respond_template": self.templates.respond.name,
            "model": self.cfg.model,
            "request_id": f"evolve:{round_no}:{pid}",
            "request_ids": {},
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "estimated": False},
            "round": round_no,
            "stage": "evolve",
            "op": op,
            "evol": chain,
            "raw": "",
        }
        record["meta"] = meta

        messages = template.render(instruction=parent["instruction"], input=parent["input"], lang=self.lang)
        entry = await self._ask(teacher, "evolve", round_no, pid, messages, min(REWRITE_MAX_TOKENS, self.cfg.max_tokens or REWRITE_MAX_TOKENS), op=op)
        self._note(meta, entry)
        if entry["status"] != "ok":
            return self._failed(record, parent, entry)
        meta["raw"] = entry.get("content", "")
        instruction, input_text, problem = parse_rewrite(entry.get("content", ""), entry.get("finish_reason"))
        record["instruction"], record["input"] = instruction, input_text
        if problem:
            return self._eliminate(record, parent, *problem)
        verdict = self._check_rewrite(record, parent, ancestors)
        if verdict:
            return self._eliminate(record, parent, *verdict)

        if self.templates.judge is not None:
            messages = self.templates.judge.render(
                first=prompt_text(parent["instruction"], parent["input"]), second=prompt_text(instruction, input_text), lang=self.lang
            )
            entry = await self._ask(teacher, "judge", round_no, pid, messages, min(JUDGE_MAX_TOKENS, self.cfg.max_tokens or JUDGE_MAX_TOKENS))
            self._note(meta, entry)
            if entry["status"] != "ok":
                # Unjudged is not judged: keeping it would pass off an unchecked evolution as one the judge let through.
                meta["judge"] = "failed"
                return self._failed(record, parent, entry)
            # An unclear judgement keeps the evolution: the judge answered, and the cheap checks already passed.
            meta["judge"] = judge_verdict(entry.get("content", ""))
            if meta["judge"] == "equal" and "no-gain" in self.checks:
                return self._eliminate(record, parent, "no-gain", "the teacher judged it equal to its parent")

        messages = self.templates.respond.render(instruction=instruction, input=input_text, lang=self.lang)
        entry = await self._ask(teacher, "respond", round_no, pid, messages, self.cfg.max_tokens)
        self._note(meta, entry)
        if entry["status"] != "ok":
            return self._failed(record, parent, entry)
        meta["response_id"] = entry.get("response_id")
        meta["finish_reason"] = entry.get("finish_reason")
        record["output"] = strip_think(entry.get("content", ""))
        verdict = self._check_answer(record, ancestors)
        if verdict:
            return self._eliminate(record, parent, *verdict)
        self.run.append(RECORDS, [record])
        self.kept[record["id"]] = record
        self.finished.add(record["id"])
        self._count(record, None)
        return record

    def _check_rewrite(self, record: dict, parent: dict, ancestors: set[str]) -> tuple[str, str] | None:
        """Checks before paying for an answer: leaked prompt, no gain, the instruction rules, near-duplicates."""
        ins, inp = record["instruction"], record["input"]
        marker = leaked_marker(ins, inp) if "prompt-leak" in self.checks else None
        if marker:
            return "prompt-leak", f"the rewrite contains {marker!r}"
        if "no-gain" in self.checks:
            detail = no_gain(prompt_text(parent["instruction"], parent["input"]), prompt_text(ins, inp))
            if detail:
                return "no-gain", detail
        verdict = check_instruction(ins, inp, self.rules)
        if verdict:
            return verdict
        return self._near_duplicate(record, ancestors, add=False)

    def _check_answer(self, record: dict, ancestors: set[str]) -> tuple[str, str] | None:
        """Checks on the answer, then the near-duplicate check again (a sibling may have been kept meanwhile)."""
        ins, inp, out = record["instruction"], record["input"], record["output"]
        if record["meta"].get("finish_reason") == "length":
            return "truncated", "the answer was cut by the token limit"
        if not out.strip() and "empty" in self.rules.enabled:
            return "empty", "output is empty"
        for name, rule in (("refusal-response", refusal_response), ("stopword-response", stopword_response)):
            if name in self.checks:
                detail = rule(out)
                if detail:
                    return name, detail
        verdict = check(ins, inp, out, self.rules)
        if verdict:
            return verdict
        return self._near_duplicate(record, ancestors, add=True)

    def _near_duplicate(self, record: dict, ancestors: set[str], add: bool) -> tuple[str, str] | None:
        if "near-duplicate" not in self.checks:
            if add:
                self.index.add(record["id"], record["instruction"])
            return None
        match = self.index.search(record["instruction"], exclude=ancestors)
        if match is not None:
            record["duplicate_of"] = match.key
            record["duplicate_text"] = match.text
            record["score"] = round(match.score, 4)
            return "near-duplicate", f"ROUGE-L {match.score:.3f} with {match.key}"
        if add:
            # No await since the search: nothing else can slip in between.
            self.index.add(record["id"], record["instruction"])
        return None

    def _eliminate(self, record: dict, parent: dict, reason: str, detail: str) -> None:
        """A failed evolution: kept in rejected.jsonl with its rule and its parent."""
        record["reason"], record["detail"] = reason, detail
        record["parent_id"] = parent["id"]
        record["parent_instruction"] = parent["instruction"]
        self.run.append(REJECTED, [record])
        self.finished.add(record["id"])
        self._count(record, reason)
        if record["meta"].get("raw"):
            self.sample_reply = record["meta"]["raw"]
        return None

    def _failed(self, record: dict, parent: dict, entry: dict) -> None:
        """A step whose request failed after retries: eliminated as request-failed, naming the stage that failed."""
        # A step stops at its first failed request, so each failed request in the ledger is exactly one request-failed
        # rejection (counts.failed_requests == counts.rejected["request-failed"]). Like every elimination it is final:
        # a re-run replays the failure from the ledger instead of resending it, whichever stage failed.
        stage = entry["stage"]
        record["meta"]["failed_stage"] = stage
        what = {"evolve": "rewrite", "judge": "judge (--judge-equal)", "respond": "answer"}[stage]
        return self._eliminate(record, parent, "request-failed", f"the {what} request failed: {entry.get('error', '')}")

    @staticmethod
    def _note(meta: dict, entry: dict) -> None:
        """Add a request's id and tokens to the record's lineage."""
        meta["request_ids"][entry["stage"]] = entry["request_id"]
        usage = entry.get("usage") or {}
        for key in ("prompt_tokens", "completion_tokens"):
            meta["usage"][key] += int(usage.get(key, 0))
        meta["usage"]["estimated"] = meta["usage"]["estimated"] or bool(usage.get("estimated"))

    # ---- requests -----------------------------------------------------------------------

    async def _ask(self, teacher: Teacher, stage: str, round_no: int, parent_id: str, messages: list[dict[str, str]],
                   max_tokens: int | None, op: str | None = None) -> dict:
        """One request of a step: replayed from the ledger if an earlier attempt paid for it, else sent and logged first."""
        rid = f"{stage}:{round_no}:{parent_id}"
        entry = self.replies.get(rid)
        if entry is not None:
            return entry
        worst = self.worst_case_usd(messages, max_tokens)
        while True:
            if self._stop_requested or self._budget_hit:
                raise _Halted()
            if self.cfg.max_cost is None or self.usd + self._reserved + self._billed + worst <= self.cfg.max_cost:
                break
            if self._in_flight == 0:
                self._budget_hit = True
                raise RunStopped(
                    "budget",
                    f"stopped at ${self.usd:.4f}: one more request could pass --max-cost ${self.cfg.max_cost:g} "
                    f"(hint: raise --max-cost and re-run the same command to resume)",
                    exit_code=3,
                )
            await asyncio.sleep(0.05)
        self._reserved += worst
        self._in_flight += 1
        billed = 0.0

        def may_retry_billed(usage: Usage) -> bool:
            # This request's reservation still covers its next attempt; the billed reply is extra.
            nonlocal billed
            cost = self.price.usd(usage.prompt_tokens, usage.completion_tokens)
            billed += cost
            self._billed += cost
            return self.usd + self._reserved + self._billed <= self.cfg.max_cost

        guard = may_retry_billed if self.cfg.max_cost is not None and self.price else None
        try:
            try:
                result: Completion | RequestFailed = await teacher.complete(messages, max_tokens=max_tokens, may_retry_billed=guard)
            except RequestFailed as failed:
                result = failed
        finally:
            self._in_flight -= 1
            self._reserved = max(0.0, self._reserved - worst) if self._in_flight else 0.0
            self._billed = max(0.0, self._billed - billed) if self._in_flight else 0.0
        return self._log(rid, stage, round_no, parent_id, op, result)

    def _log(self, rid: str, stage: str, round_no: int, parent_id: str, op: str | None, result: Completion | RequestFailed) -> dict:
        """Append a finished request to the ledger before anything acts on it."""
        entry: dict = {"request_id": rid, "stage": stage, "round": round_no, "parent_id": parent_id}
        if op:
            entry["op"] = op
        if isinstance(result, RequestFailed):
            entry.update(
                status="failed", error=result.message, error_kind=result.kind, http_status=result.status, attempts=result.attempts,
                errors=list(getattr(result, "errors", [])), usage={"prompt_tokens": 0, "completion_tokens": 0, "estimated": False}, wasted=vars(result.wasted),
            )
            self.consecutive_failures += 1
        else:
            entry.update(
                status="ok", response_id=result.response_id, finish_reason=result.finish_reason, usage=vars(result.usage),
                wasted=vars(result.wasted), attempts=result.attempts, errors=list(getattr(result, "errors", [])),
                latency=round(result.latency, 3), content=result.content,
            )
            self.consecutive_failures = 0
        self.run.append(LEDGER, [entry])
        self.replies[rid] = entry
        self._add_usage(entry)
        return entry

    # ---- manifest -----------------------------------------------------------------------

    def evol_summary(self) -> dict:
        ops = {
            op: {str(r): {"kept": c.kept, "eliminated": dict(sorted(c.eliminated.items()))} for r, c in sorted(rounds.items())}
            for op, rounds in sorted(self.by_op.items(), key=lambda kv: OPS.index(kv[0]) if kv[0] in OPS else len(OPS))
        }
        return {
            "rounds": self.cfg.evol_rounds,
            "rounds_completed": self.rounds_completed,
            "ops_enabled": list(self.ops),
            "judge_equal": self.cfg.judge_equal,
            "no_gain_similarity": NO_GAIN_SIMILARITY,
            "kept": self.tally.kept,
            "eliminated": dict(sorted(self.tally.rejected.items())),
            "ops": ops,
        }

    def _own_manifest(self) -> dict:
        """The manifest skeleton of a stand-alone `selfinstruct evolve` run."""
        cfg = self.cfg
        keys = ("model", "base_url", "api_key_env", "seed", "concurrency", "rpm", "tpm", "timeout", "retries", "temperature",
                "top_p", "max_tokens", "similarity", "max_cost", "price_in", "price_out", "no_rule", "evol_rounds", "evol_ops",
                "judge_equal", "min_yield", "yield_window")
        config = {k: v for k, v in cfg.to_dict().items() if k in keys}
        out = {
            "selfinstruct_version": __version__,
            "command": self.command,
            "created": self.created,
            "config": config | {"lang": self.lang, "base_url": public_url(cfg.base_url)},
            "input": self.source,
            "templates": {},
            "teacher": {"model": cfg.model, "endpoint_kind": endpoint_kind(cfg.base_url)},
            "filters": {"similarity": cfg.similarity, "rules": sorted(self.rules.enabled), "lang": self.lang},
            "counts": {"kept": self.originals, "rejected": {}, "requests": 0, "failed_requests": 0},
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "estimated": False, "estimated_requests": 0},
            "cost": {
                "usd": 0.0,
                "priced": self.price is not None,
                "price_in_per_1m": self.price.input if self.price else None,
                "price_out_per_1m": self.price.output if self.price else None,
                "price_source": self.price.source if self.price else None,
            },
            "stages": {},
        }
        if self.seeds:
            out["seeds"] = self.seeds
        return out

    def manifest(self) -> dict:
        """The run's manifest with evolution merged in: per-stage cost, totals across stages, counts per op and round."""
        m = self.base_manifest() if self.base_manifest else self._own_manifest()
        stages = dict(m.get("stages") or {})
        for name in STAGES:
            t = self.stage_tally[name]
            if name == "judge" and self.templates.judge is None and not t.requests:
                continue
            stages[name] = {"requests": t.requests, "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
                            "usd": round(self.stage_usd(name), 6)}
        m["stages"] = stages
        estimated = int((m.get("usage") or {}).get("estimated_requests", 0)) + self.tally.estimated_requests
        m["usage"] = {
            "prompt_tokens": sum(int(s.get("prompt_tokens", 0)) for s in stages.values()),
            "completion_tokens": sum(int(s.get("completion_tokens", 0)) for s in stages.values()),
            "estimated": estimated > 0,
            "estimated_requests": estimated,
        }
        # The total is the sum of the stage figures shown, so the card's table adds up.
        m["cost"] = dict(m.get("cost") or {}) | {"usd": round(sum(float(s.get("usd", 0.0)) for s in stages.values()), 6)}
        counts = dict(m.get("counts") or {})
        rejected = collections.Counter(counts.get("rejected") or {})
        rejected.update(self.tally.rejected)
        counts.update(
            kept=int(counts.get("kept", 0)) + self.tally.kept,
            rejected=dict(sorted(rejected.items())),
            requests=int(counts.get("requests", 0)) + self.tally.requests,
            failed_requests=int(counts.get("failed_requests", 0)) + self.tally.failed_requests,
            attempts=int(counts.get("attempts", 0)) + self.tally.attempts,
            attempt_errors=dict(sorted((collections.Counter(counts.get("attempt_errors") or {}) + self.tally.attempt_errors).items())),
        )
        m["counts"] = counts
        m["templates"] = dict(m.get("templates") or {}) | self.templates.manifest()
        m["filters"] = dict(m.get("filters") or {}) | {"evol_checks": sorted(self.checks)}
        m["evol"] = self.evol_summary()
        m["status"] = self.status
        m["stop_reason"] = self.stop_reason
        m["updated"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        m["elapsed_seconds"] = round(time.monotonic() - self.started, 1)
        return m

    def save_manifest(self, force: bool = False) -> None:
        """Rewrite the manifest atomically, at most once a second unless forced."""
        now = time.monotonic()
        if force or now - self._last_manifest >= 1.0:
            self.run.write_manifest(self.manifest())
            self._last_manifest = now


def check_evolvable(run: RunDir, cfg: GenerateConfig, lang: str, templates: EvolTemplates, source: dict | None = None,
                    price: Price | None = None) -> None:
    """Refuse to resume an evolution with other ops, judge, seed, templates, model, prices or (for `evolve`) other input records."""
    previous = run.load_manifest()
    if not previous:
        return
    if source is not None and "input" not in previous:
        raise OutputError(
            f"{run.path}: holds a generate run, not an evolve run",
            "evolve as part of that run with generate --evol-rounds, or choose a new --out",
        )
    old = previous.get("evol") or {}
    mismatches, flags = teacher_mismatches(previous, cfg.model, price)
    if source is not None and previous["input"].get("sha256") != source.get("sha256"):
        mismatches.append("input records (files or --limit)")
    if old:
        if old.get("ops_enabled") != list(resolve_ops(cfg.evol_ops)):
            mismatches.append("--ops")
        if bool(old.get("judge_equal")) != cfg.judge_equal:
            mismatches.append("--judge-equal")
    if (old or source is not None) and (previous.get("config") or {}).get("seed", cfg.seed) != cfg.seed:
        mismatches.append("--seed")
    if source is not None and (previous.get("config") or {}).get("lang", lang) != lang:
        mismatches.append("--lang")
    old_templates = previous.get("templates") or {}
    for key, t in templates.manifest().items():
        if key in old_templates and old_templates[key].get("sha256") != t["sha256"]:
            mismatches.append(f"template {t['name']}")
    if mismatches:
        hint = f"resume with {' '.join(flags)}" if flags and len(flags) == len(mismatches) else "re-run with the original settings to resume (only --rounds may change)"
        raise OutputError(f"{run.path}: holds an evolution made with a different {', '.join(mismatches)}", f"{hint}, or choose a new --out")


# A planning prior for --dry-run, not a measurement: the share of evolutions that survive a round.
PRIOR_SURVIVAL = 0.7


def project_evolution(cfg: GenerateConfig, lang: str, records: int, samples: Sequence[tuple[str, str, str]]) -> dict:
    """The --dry-run projection of --evol-rounds over `records` kept records, priced from sample (instruction, input, output)."""
    templates = load_templates(lang, resolve_ops(cfg.evol_ops), cfg.judge_equal)
    rewrite_prompt = rewrite_out = respond_prompt = respond_out = judge_prompt = 0.0
    for instruction, input_text, output in samples:
        child = instruction * 2  # an evolution adds a constraint, a step or a scenario: about twice as long
        rewrite_prompt += sum(estimate_prompt_tokens(t.render(instruction=instruction, input=input_text, lang=lang))
                              for t in templates.ops.values()) / len(templates.ops)
        rewrite_out += estimate_tokens(child + input_text) + 8
        respond_prompt += estimate_prompt_tokens(templates.respond.render(instruction=child, input=input_text, lang=lang))
        respond_out += min(estimate_tokens(output) * 2, cfg.max_tokens or 10**9)
        if templates.judge is not None:
            judge_prompt += estimate_prompt_tokens(templates.judge.render(
                first=prompt_text(instruction, input_text), second=prompt_text(child, input_text), lang=lang))
    k = max(len(samples), 1)
    steps = sum(records * PRIOR_SURVIVAL ** r for r in range(cfg.evol_rounds))  # each round evolves the last one's survivors
    per_step = 2 + (1 if templates.judge is not None else 0)
    prompt = steps * (rewrite_prompt + respond_prompt + judge_prompt) / k
    completion = steps * (rewrite_out + respond_out + (2 * k if templates.judge is not None else 0)) / k
    return {"steps": round(steps), "requests": round(steps * per_step), "prompt_tokens": int(prompt),
            "completion_tokens": int(completion), "kept": round(sum(records * PRIOR_SURVIVAL ** r for r in range(1, cfg.evol_rounds + 1))),
            "assumed_survival": PRIOR_SURVIVAL}


def after_generation(gen) -> Evolution:
    """The evolution step of `generate --evol-rounds`: evolves the run's kept records into the same run directory."""
    evo = Evolution(
        gen.cfg, gen.run, gen.price, gen.lang, gen.command,
        extra_index=[(f"seed:{task.id}", task.instruction) for task in gen.seeds.tasks],
        base_manifest=gen.manifest,
        base_usd=lambda: gen.usd,
    )
    check_evolvable(gen.run, gen.cfg, gen.lang, evo.templates, price=gen.price)
    return evo
