"""Evol-Instruct: rewrite instructions harder (in depth) or rarer (in breadth), answer them, eliminate failed evolutions."""

from __future__ import annotations

import collections
import dataclasses
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Iterator, Sequence

from selfinstruct.config import GenerateConfig, require_key
from selfinstruct.dirlock import DirectoryLock
from selfinstruct.engine import Engine, Tally, one_line, public_url, teacher_capacity, teacher_mismatches
from selfinstruct.inputs import infer_lang, input_seeds, read_base, records_sha256, stage_input  # noqa: F401 - the recipes import them from here too
from selfinstruct.errors import ConfigError, OutputError
from selfinstruct.parsing import clean_reply, normalise_input, placeholder_problem, strip_markers
from selfinstruct.pricing import Price, estimate_prompt_tokens, estimate_tokens, run_price
from selfinstruct.prompts import Template, load_template
from selfinstruct.rules import RULES, RuleSettings, check, fold, measure, same_text_key
from selfinstruct.rows import prompt_text
from selfinstruct.rundir import RECORDS, REJECTED, RunDir
from selfinstruct.similarity import TOKEN_RE, DedupIndex, compared_text, rouge_l

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
    instruction = strip_markers(instruction)
    if not instruction.strip():
        return "", "", ("unparseable", f"no instruction in the rewrite: {text[:200]!r}")
    problem = placeholder_problem(instruction, input_text)
    if problem:
        return instruction.strip(), input_text, ("unparseable", problem)
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


class Evolution:
    """The evolve stage: Evol-Instruct rounds into a run directory (rewrite, judge, answer, eliminate), a job per step."""

    name = "evolve"

    def __init__(
        self,
        cfg: GenerateConfig,
        engine: Engine,
        lang: str,
        *,
        base: list[dict] | None = None,
        extra_index: Sequence[tuple[str, str]] = (),
        copy_base: bool = False,
        source: dict | None = None,
        seeds: dict | None = None,
        own_manifest: bool = True,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.run = engine.run
        self.lang = lang
        self.base = base
        self.extra_index = extra_index
        self.copy_base = copy_base
        self.source = source or {}
        # An evolved run directory's data still comes from its seeds: the card must name them and their licence.
        self.seeds = seeds
        # A stand-alone `evolve` writes the whole manifest; after generate it adds to the generation's.
        self.own_manifest = own_manifest
        self.ops = resolve_ops(cfg.evol_ops)
        self.templates = load_templates(lang, self.ops, cfg.judge_equal)
        self.ledger_stages = STAGES if self.templates.judge is not None else tuple(s for s in STAGES if s != "judge")
        self.rules = RuleSettings(lang=lang, enabled=frozenset(r for r in RuleSettings().enabled if r not in cfg.no_rule))
        self.checks = frozenset(r for r in (*REASONS, "near-duplicate") if r not in cfg.no_rule)
        self.index = DedupIndex(cfg.similarity)
        self.tally = Tally()
        self.by_op: dict[str, dict[int, _OpCounts]] = {}
        self.kept: dict[str, dict] = {}
        self.finished: set[str] = set()
        self.base_ids: set[str] = set()
        self.originals = 0
        self.round = 0
        self.round_size = 0
        self.round_done = 0
        self.rounds_completed = 0
        self.sample_reply = ""
        self._parents: list[dict] = []
        self._children: dict[str, dict] = {}
        self._queue: Iterator[dict] = iter(())

    @property
    def window(self) -> int:
        """Steps in flight: a step is up to three requests in a row, so twice what the teacher takes now keeps it busy."""
        if self.cfg.batch:  # a round's rewrites (then its answers) go as one batch
            from selfinstruct.batch import BATCH_WINDOW

            return BATCH_WINDOW
        return 2 * teacher_capacity(self.engine, self.cfg)

    # ---- resume -------------------------------------------------------------------------

    def load(self) -> None:
        """Read what earlier attempts wrote: kept and rejected records (the engine holds every paid reply)."""
        records = self.run.load(RECORDS)
        rejected = self.run.load(REJECTED)
        previous = self.engine.previous or {}
        self.rounds_completed = int((previous.get("evol") or {}).get("rounds_completed", 0) or 0)
        if self.base is None:
            self.base = [r for r in records if stage_of(r) == "generate"]
        self.base_ids = {r["id"] for r in self.base}
        present = {r["id"] for r in records}
        for key, text in self.extra_index:
            self.index.add(key, text)
        for rec in self.base:
            if rec["id"] not in present:
                self.index.add(rec["id"], self.compared(rec))
        for rec in records:
            self.index.add(rec["id"], self.compared(rec))
            if self._ours(rec):
                self.kept[rec["id"]] = rec
                self.finished.add(rec["id"])
                self._count(rec, None)
        for rec in rejected:
            if self._ours(rec):
                self.finished.add(rec["id"])
                self._count(rec, rec.get("reason", "unknown"))
        if self.copy_base:
            missing = [self._original(r) for r in self.base if r["id"] not in present]
            if missing:
                self.run.append(RECORDS, missing)
            self.originals = len(self.base)
        self._parents = list(self.base)
        self._start_round(1)

    def compared(self, rec: dict) -> str:
        """What the near-duplicate check compares of a record (--field)."""
        return compared_text(rec["instruction"], rec.get("input") or "", self.cfg.dedup_field)

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

    def counts(self) -> tuple[int, collections.Counter]:
        return self.originals + self.tally.kept, self.tally.rejected

    # ---- jobs: round after round, a step per parent ------------------------------------

    def _start_round(self, round_no: int) -> None:
        """Queue every parent of a round whose step is not finished yet."""
        self.round, self.round_size, self.round_done = round_no, len(self._parents), 0
        self._children = {}
        todo = []
        for parent in self._parents:
            cid = self.child_id(parent["id"], round_no)
            if cid in self.kept:
                self._children[parent["id"]] = self.kept[cid]
            if cid in self.finished:
                self.round_done += 1
            else:
                todo.append(parent)
        self._queue = iter(todo)

    def next_job(self, running: int) -> Callable[[], Awaitable[None]] | None:
        """The next step of this round; the next round starts once every step of this one is back."""
        while True:
            parent = next(self._queue, None)
            if parent is not None:
                round_no = self.round
                return lambda: self._step(round_no, parent)
            if running or self.round >= self.cfg.evol_rounds:
                return None
            # The survivors, in parent order, are the next round's parents.
            self._parents = [self._children[p["id"]] for p in self._parents if p["id"] in self._children]
            self.rounds_completed = max(self.rounds_completed, self.round)
            self._start_round(self.round + 1)

    def finish(self) -> None:
        self.rounds_completed = max(self.rounds_completed, self.round)

    def low_yield(self, useful: int, window: int) -> str | None:
        sample = one_line(self.sample_reply)
        return (f"only {useful} of the last {window} evolutions survived; stopping instead of spending on. "
                f"A sample rewrite: {sample!r} (hint: check the model and rejected.jsonl, then re-run to resume)")

    def progress(self) -> tuple[str, int, int]:
        return f"evolve round {self.round}", self.round_done, self.round_size

    # ---- one step: rewrite → checks → (judge) → answer → checks -------------------------

    async def _step(self, round_no: int, parent: dict) -> None:
        child = await self._evolve(round_no, parent)  # Halted passes through: the step is not finished
        self.round_done += 1
        self.engine.outcome(1 if child is not None else 0)
        if child is not None:
            self._children[parent["id"]] = child

    async def _ask(self, stage: str, round_no: int, parent_id: str, messages: list[dict[str, str]], max_tokens: int | None,
                   op: str | None = None) -> dict:
        fields = {"round": round_no, "parent_id": parent_id} | ({"op": op} if op else {})
        return await self.engine.ask(stage, f"{stage}:{round_no}:{parent_id}", messages, max_tokens=max_tokens, fields=fields)

    async def _evolve(self, round_no: int, parent: dict) -> dict | None:
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
        entry = await self._ask("evolve", round_no, pid, messages, min(REWRITE_MAX_TOKENS, self.cfg.max_tokens or REWRITE_MAX_TOKENS), op=op)
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
            entry = await self._ask("judge", round_no, pid, messages, min(JUDGE_MAX_TOKENS, self.cfg.max_tokens or JUDGE_MAX_TOKENS))
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
        entry = await self._ask("respond", round_no, pid, messages, self.cfg.max_tokens)
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
                self.index.add(record["id"], self.compared(record))
            return None
        match = self.index.search(self.compared(record), exclude=ancestors)
        if match is not None:
            record["duplicate_of"] = match.key
            record["duplicate_text"] = match.text
            record["score"] = round(match.score, 4)
            return "near-duplicate", f"ROUGE-L {match.score:.3f} with {match.key}"
        if add:
            # No await since the search: nothing else can slip in between.
            self.index.add(record["id"], self.compared(record))
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
        # (or oversized) rejection (counts.failed_requests == those two counts). Like every elimination it is final:
        # a re-run replays the failure from the ledger instead of resending it, whichever stage failed.
        stage = entry["stage"]
        record["meta"]["failed_stage"] = stage
        what = {"evolve": "rewrite", "judge": "judge (--judge-equal)", "respond": "answer"}[stage]
        reason = "oversized" if entry.get("error_kind") == "oversized" else "request-failed"
        return self._eliminate(record, parent, reason, f"the {what} request failed: {entry.get('error', '')}")

    @staticmethod
    def _note(meta: dict, entry: dict) -> None:
        """Add a request's id and tokens to the record's lineage."""
        meta["request_ids"][entry["stage"]] = entry["request_id"]
        usage = entry.get("usage") or {}
        for key in ("prompt_tokens", "completion_tokens"):
            meta["usage"][key] += int(usage.get(key, 0))
        meta["usage"]["estimated"] = meta["usage"]["estimated"] or bool(usage.get("estimated"))

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

    def describe(self, m: dict) -> None:
        """Evolution's manifest sections: on a stand-alone run the config and input too, after generate only its own."""
        cfg = self.cfg
        if self.own_manifest:
            keys = ("model", "base_url", "api_key_env", "seed", "concurrency", "rpm", "tpm", "timeout", "retries", "temperature",
                    "top_p", "max_tokens", "similarity", "dedup_field", "max_cost", "price_in", "price_out", "no_rule", "evol_rounds", "evol_ops",
                    "judge_equal", "min_yield", "yield_window", "grace")
            m["config"] = {k: v for k, v in cfg.to_dict().items() if k in keys} | {"lang": self.lang, "base_url": public_url(cfg.base_url)}
            m["input"] = self.source
            if self.seeds:
                m["seeds"] = self.seeds
            m["filters"] = {"similarity": cfg.similarity, "field": cfg.dedup_field, "rules": sorted(self.rules.enabled), "lang": self.lang}
        m["templates"] = dict(m.get("templates") or {}) | self.templates.manifest()
        m["filters"] = dict(m.get("filters") or {}) | {"evol_checks": sorted(self.checks)}
        m["evol"] = self.evol_summary()


def run_evolution(engine: Engine, evo: Evolution, settings, api_key: str | None, console) -> int:
    """Drive Evol-Instruct rounds on the engine (a progress bar per round), print the summary, return the exit code."""
    from selfinstruct.batch import interrupted_note, transport_factory
    from selfinstruct.progress import print_evolution_summary, run_displayed

    try:
        exit_code = run_displayed(engine, evo, transport_factory(evo.cfg, settings, api_key, engine), console, evo.cfg.quiet)
    finally:
        engine.run.close()
    if not evo.cfg.quiet or exit_code:
        print_evolution_summary(engine, evo, console)
    if exit_code in (130, 143):
        # soft_wrap: the command must stay on one line to be copied, whatever the terminal width.
        console.print(f"interrupted; everything finished is saved. Resume with: {engine.command}", soft_wrap=True, highlight=False,
                      markup=False)
        if evo.cfg.batch:
            console.print(interrupted_note(engine.command), soft_wrap=True, highlight=False, markup=False)
    return exit_code


def run_evolve(cfg: GenerateConfig, inputs: Sequence[Path], limit: int | None, evolved_only: bool, api_key: str | None,
               command: str, console, judge_api_key: str | None = None) -> int:
    """The evolve command after its flags: any dataset → an evolved run directory (resumed). Returns the exit code."""
    from selfinstruct.engine import check_orphaned, make_engine, teacher_settings

    out = cfg.out
    base, lang, source = stage_input(inputs, out, limit, cfg.lang, "to evolve",
                                     "write the evolution to a new directory, or evolve a run with generate --evol-rounds")
    cfg = dataclasses.replace(cfg, lang=lang)
    from selfinstruct.batch import cancel_batches, check_batches, run_price_for

    price = run_price_for(cfg, run_price(cfg, console))
    require_key(cfg, api_key)
    run = RunDir(out)
    if cfg.cancel_batches:
        return cancel_batches(run, cfg, api_key, console.print)
    run.prepare()
    with DirectoryLock(run.path, command):
        check_orphaned(run)
        from selfinstruct.judging import finish_gated, gated_before

        if gated_before(run, cfg):  # the quality gate already rewrote records.jsonl: evolving again would refill it
            return finish_gated(run, cfg, None, console)
        engine = make_engine(run, cfg, price, command)
        evo = Evolution(cfg, engine, lang, base=base, copy_base=not evolved_only, source=source, seeds=input_seeds(inputs))
        check_evolvable(run, cfg, lang, evo.templates, source, price)
        engine.load()
        check_batches(engine, cfg)
        # The manifest first: loading copies the input records into records.jsonl, and records without one are refused.
        engine.stages.append(evo)
        engine.save_manifest(force=True)
        evo.load()
        if evo.engine.tally.requests and not cfg.quiet:
            console.print(f"resuming {run.path}: {evo.tally.kept:,} evolutions kept, {sum(evo.tally.rejected.values()):,} eliminated")
        exit_code = run_evolution(engine, evo, teacher_settings(cfg), api_key, console)
        if exit_code or not (cfg.judge or cfg.moderate):
            return exit_code
        from selfinstruct.judging import gate_run

        return gate_run(engine, cfg, lang, api_key if judge_api_key is None else judge_api_key, console)


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
    if (previous.get("config") or {}).get("dedup_field", cfg.dedup_field) != cfg.dedup_field:
        mismatches.append("--field")
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
    seeds = [(f"seed:{task.id}" + (f"#{k}" if k else ""), compared_text(task.instruction, inst.input, gen.cfg.dedup_field))
             for task in gen.seeds.tasks for k, inst in enumerate(task.instances)]
    evo = Evolution(gen.cfg, gen.engine, gen.lang, extra_index=seeds, own_manifest=False)
    check_evolvable(gen.run, gen.cfg, gen.lang, evo.templates, price=gen.engine.price)
    return evo
