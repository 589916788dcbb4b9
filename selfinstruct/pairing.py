"""Near-duplicates the teacher confirms: surface-similar pairs of records, each judged "the same task?" by an LLM.

Surface measures cannot tell 写一首关于春天的诗 from …秋天… (alike, other tasks) nor see that 给我一个笑话
and 写一个原创笑话 are one task (benchmarks/audit: about 0.5 precision at 0.9 recall whatever the
measure). So `selfinstruct pairs` finds candidate pairs loosely (BatchDedup.similar_pairs) and asks
the teacher about each, as WizardLM's elimination step asks whether two instructions are equal.
A stage on the engine: every verdict is a ledgered request (`same:<a>:<b>`, and `same-again:<a>:<b>`
for the one retry of an unreadable reply), so a stopped run resumes without paying twice. The
decisions are greedy in input order (first kept); a pair is asked only while its verdict can still
change one (Greedy), and the files are written once every record is decided.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Sequence

from selfinstruct.config import GenerateConfig
from selfinstruct.engine import Engine, Tally, one_line, public_url, teacher_mismatches, teacher_settings
from selfinstruct.errors import ConfigError, OutputError
from selfinstruct.parsing import clean_reply
from selfinstruct.pricing import Price
from selfinstruct.prompts import Template, load_template
from selfinstruct.rules import fold
from selfinstruct.rundir import RECORDS, REJECTED, RunDir, write_jsonl_atomic

STAGE = "pairs"
REASON = "near-duplicate"
# Every asked pair with its surface score and verdict: what the decisions rest on, for an audit or a calibration.
VERDICTS = "verdicts.jsonl"
# failed: the request itself failed after its retries; like unclear, the pair stays apart, but it is counted apart.
OUTCOMES = ("same", "different", "unclear", "failed")
# Looser than filter's 0.7: the teacher decides, the surface score only picks what it is asked about.
DEFAULT_CANDIDATES = 0.5
# A verdict is a word; reasoning models may think first, so leave them room.
VERDICT_MAX_TOKENS = 1024


def verdict_tokens(cfg: GenerateConfig) -> int:
    """The verdict's token limit: --max-tokens, at most VERDICT_MAX_TOKENS."""
    return min(VERDICT_MAX_TOKENS, cfg.max_tokens or VERDICT_MAX_TOKENS)

# The first verdict word in the reply decides; the negations come first in each alternation, so 不相同 is not read as 相同.
_DIFFERENT = r"不相同|不同|不一样|不一樣|不是同一|并非同一|並非同一|不等同|notthesame|notsame|different|notequal|unequal|distinct"
# "No difference" says same, though it holds 不同: it starts earlier than the 不同 inside it, so it is found first.
_SAME = (r"没有不同|沒有不同|没什么不同|沒什麼不同|并无不同|並無不同|没有区别|沒有區別|无区别|無區別"
         r"|相同|一样|一樣|是同一|同一个任务|同一個任務|等同|same|equal|identical|duplicate")
_UNSURE = r"无法判断|無法判斷|不确定|不確定|难以判断|難以判斷|cannottell|can'ttell|cannotdetermine|unclear|unsure|notsure"
_VERDICT = re.compile(f"(?P<unclear>{_UNSURE})|(?P<different>{_DIFFERENT})|(?P<same>{_SAME})")
# {"same": true}, {"same_task": false} and the like: the key holds the answer, not the word.
_JSON_FLAG = re.compile(r"\"(?:same|same_?task|is_?same|相同)\"\s*:\s*(true|false)")
_YES_NO = {"yes": "same", "是": "same", "是的": "same", "no": "different", "否": "different", "不是": "different"}


def same_task_verdict(content: str) -> str:
    """same, different or unclear, from the teacher's reply (one word asked; fences, <think> and sentences around it tolerated)."""
    text = fold(clean_reply(content))
    flag = _JSON_FLAG.search(text)
    if flag:
        return "same" if flag.group(1) == "true" else "different"
    bare = text.strip("\"'“”「」*_.。!！")
    if bare in _YES_NO:
        return _YES_NO[bare]
    match = _VERDICT.search(text)
    return match.lastgroup if match else "unclear"


def request_ids(a: str, b: str) -> tuple[str, str]:
    """The ledger ids of a pair's question and its one retry: same:<a>:<b>, same-again:<a>:<b>.

    An id holding a colon or a quote is written as a JSON string, so "x:y" + "z" and "x" + "y:z" never share a
    request id (a resume would replay one pair's verdict for the other).
    """
    a, b = (json.dumps(x, ensure_ascii=False) if ":" in x or '"' in x else x for x in (a, b))
    return f"same:{a}:{b}", f"same-again:{a}:{b}"


# ---- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairSettings:
    """What decides a pair: the teacher's model, its template, and how candidate pairs are found."""

    model: str
    lang: str
    template: Template
    candidates: float
    field: str

    def manifest(self) -> dict:
        return {"model": self.model, "template": {"name": self.template.name, "sha256": self.template.sha256},
                "candidates": self.candidates, "field": self.field}


def template_name(lang: str) -> str:
    """The shipped same-task template for a language (zh-Hant reads the zh one)."""
    return f"pairs/same_task_{'zh' if lang.startswith('zh') else 'en'}.jinja"


def check_candidates(value: float) -> None:
    """--candidates is a ROUGE-L F1 a pair must score above to be asked: in (0, 1], as filter's --similarity."""
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"--candidates must be in (0, 1], not {value:g}",
                          f"{DEFAULT_CANDIDATES} (the default) asks about pairs filter's 0.7 would not even see; raise it to ask fewer")


def candidate_pairs(records: Sequence[dict], threshold: float, field: str) -> list[tuple[int, int, float]]:
    """Every pair i < j (input order) whose compared texts score ROUGE-L F1 above the threshold (as filter's), sorted by (i, j)."""
    from selfinstruct.similarity import BatchDedup, compared_text

    texts = [compared_text(r["instruction"], r["input"], field) for r in records]
    a, b, s = BatchDedup(threshold).similar_pairs(texts)
    return sorted((int(min(x, y)), int(max(x, y)), round(float(z), 4)) for x, y, z in zip(a, b, s))


class Greedy:
    """The decisions, greedy in input order (first kept), and which pairs they still need a verdict on.

    Record k goes when the teacher judged it the same task as an earlier record that is kept; of several, the
    earliest names it. So a pair (h, k) matters only once h is kept and no earlier partner of k took k out:
    those are the pairs handed out (`ready`), and a pair whose earlier record went, or whose later record an
    earlier partner already took out, is never asked. Which pairs are asked depends on the verdicts alone, never
    on the order they arrive in, so a resumed run asks exactly what an uninterrupted one would have.
    """

    def __init__(self, n: int, pairs: Sequence[tuple[int, int, float]]) -> None:
        self.before: list[list[int]] = [[] for _ in range(n)]
        for i, j, _ in sorted(pairs):
            self.before[j].append(i)
        self.cursor = [0] * n
        self.fate: list[str | None] = [None] * n  # kept, gone, or not known yet
        self.duplicate_of: dict[int, int] = {}
        self.verdicts: dict[tuple[int, int], str] = {}
        self.settled_pairs = 0  # pairs of settled records: asked, or moot
        self._answers = [0] * n
        self._waiting: dict[int, list[int]] = collections.defaultdict(list)
        self._handed: set[tuple[int, int]] = set()
        self._ready: collections.deque[tuple[int, int]] = collections.deque()
        self._advance(range(n))

    def ready(self) -> tuple[int, int] | None:
        """The next pair whose verdict a decision waits for, or None."""
        return self._ready.popleft() if self._ready else None

    def answer(self, i: int, j: int, verdict: str) -> None:
        """The verdict on a handed-out pair: same, or different, unclear or failed (all three: not the same)."""
        self.verdicts[(i, j)] = verdict
        self._answers[j] += 1
        self._advance([j])

    @property
    def settled(self) -> bool:
        return all(f is not None for f in self.fate)

    def judged(self) -> int:
        """Pairs settled so far: asked, or moot because the records they join are decided."""
        return self.settled_pairs + sum(n for k, n in enumerate(self._answers) if self.fate[k] is None)

    def _advance(self, todo) -> None:
        work = collections.deque(todo)
        while work:
            k = work.popleft()
            if self.fate[k] is not None:
                continue
            partners = self.before[k]
            while self.cursor[k] < len(partners):
                h = partners[self.cursor[k]]
                if self.fate[h] is None:
                    self._waiting[h].append(k)  # an earlier record not decided yet: k waits for it
                    break
                if self.fate[h] == "kept":
                    verdict = self.verdicts.get((h, k))
                    if verdict is None:
                        if (h, k) not in self._handed:
                            self._handed.add((h, k))
                            self._ready.append((h, k))
                        break
                    if verdict == "same":
                        self._settle(k, "gone", work, h)
                        break
                self.cursor[k] += 1
            else:
                self._settle(k, "kept", work)

    def _settle(self, k: int, fate: str, work: collections.deque, duplicate_of: int | None = None) -> None:
        self.fate[k] = fate
        if duplicate_of is not None:
            self.duplicate_of[k] = duplicate_of
        self.settled_pairs += len(self.before[k])
        work.extend(self._waiting.pop(k, ()))


# ---- the stage -----------------------------------------------------------------------------------


class Pairing:
    """The pairs stage: a verdict request (and its one retry) per candidate pair that can still change a decision."""

    name = STAGE
    ledger_stages = (STAGE,)

    def __init__(self, settings: PairSettings, engine: Engine, cfg: GenerateConfig, records: Sequence[dict],
                 pairs: Sequence[tuple[int, int, float]], source: dict) -> None:
        self.settings = settings
        self.engine = engine
        self.run = engine.run
        self.cfg = cfg
        self.window = cfg.concurrency
        self.records = list(records)
        self.pairs = list(pairs)
        self.scores = {(i, j): s for i, j, s in self.pairs}
        self.source = source
        self.greedy = Greedy(len(self.records), self.pairs)
        self.tally = Tally()
        self.completed = False
        self.sample_reply = ""

    def _ids(self, i: int, j: int) -> tuple[str, str]:
        return self.records[i]["id"], self.records[j]["id"]

    # ---- jobs ---------------------------------------------------------------------------

    def next_job(self, running: int) -> Callable[[], Awaitable[None]] | None:
        # None while every pair that matters now is in flight: the engine asks again as their verdicts land.
        pair = self.greedy.ready()
        if pair is None:
            return None
        return lambda: self._judge(*pair, self.scores[pair])

    async def _judge(self, i: int, j: int, score: float) -> None:
        """Ask once, and once more with the unreadable reply quoted; a verdict still unreadable is unclear (the pair stays apart)."""
        first, second = self.records[i], self.records[j]
        a, b = self._ids(i, j)
        previous = None
        verdict = "unclear"
        for request_id in request_ids(a, b):
            messages = self.settings.template.render(first=first, second=second, previous=previous, lang=self.settings.lang)
            entry = await self.engine.ask(STAGE, request_id, messages, max_tokens=verdict_tokens(self.cfg),
                                          fields={"pair": [a, b], "score": score})
            if entry["status"] != "ok":
                verdict = "failed"  # never a rejection on no evidence, and not mistaken for the teacher's doubt
                break
            content = entry.get("content", "")
            verdict = same_task_verdict(content)
            if verdict != "unclear":
                break
            self.sample_reply = content
            previous = one_line(content, 2000) or "(empty reply)"
        self.engine.outcome(0 if verdict in ("unclear", "failed") else 1)
        self.greedy.answer(i, j, verdict)

    # ---- the end ------------------------------------------------------------------------

    def finish(self) -> None:
        """Every decision is made: write the kept records, the rejected ones and every verdict asked."""
        greedy = self.greedy
        assert greedy.settled, "a record was left undecided"
        kept, rejected = [], []
        for k, record in enumerate(self.records):
            if k not in greedy.duplicate_of:
                kept.append(record)
                continue
            i = greedy.duplicate_of[k]
            other, score = self.records[i]["id"], self.scores[(i, k)]
            rejected.append({**record, "reason": REASON, "duplicate_of": other, "score": score,
                             "detail": f"same task as {other} (ROUGE-L {score:.3f} on {self.settings.field}), "
                                       f"judged the same task by {self.settings.model}"})
        verdicts = [{"a": self.records[i]["id"], "b": self.records[j]["id"], "score": self.scores[(i, j)], "verdict": v}
                    for (i, j), v in sorted(greedy.verdicts.items())]
        self.run.close()
        for name, rows in ((VERDICTS, verdicts), (REJECTED, rejected), (RECORDS, kept)):  # records.jsonl last: it marks the end
            write_jsonl_atomic(self.run.path / name, rows)
        self.tally.kept = len(kept)
        self.tally.rejected = collections.Counter({REASON: len(rejected)} if rejected else {})
        self.completed = True

    def low_yield(self, useful: int, window: int) -> str | None:
        return (f"only {useful} of the last {window} replies said same or different; stopping instead of spending on. "
                f"A sample reply: {one_line(self.sample_reply)!r} (hint: check --model and its endpoint, then re-run to resume)")

    def progress(self) -> tuple[str, int, int]:
        return "pairs settled", self.greedy.judged(), len(self.pairs)

    def counts(self) -> tuple[int, collections.Counter]:
        return self.tally.kept, self.tally.rejected

    def summary(self) -> dict:
        outcomes = collections.Counter(self.greedy.verdicts.values())
        # moot: pairs no verdict could change (their earlier record went, or their later one already had).
        return {**self.settings.manifest(), "completed": self.completed, "candidate_pairs": len(self.pairs),
                "asked": len(self.greedy.verdicts), "moot": len(self.pairs) - len(self.greedy.verdicts) if self.completed else None,
                "verdicts": {v: outcomes.get(v, 0) for v in OUTCOMES},
                "kept": self.tally.kept, "rejected": sum(self.tally.rejected.values())}

    def describe(self, m: dict) -> None:
        keys = ("model", "base_url", "api_key_env", "concurrency", "rpm", "tpm", "timeout", "retries", "max_tokens", "max_cost", "price_in", "price_out",
                "min_yield", "yield_window", "grace")
        m["config"] = {k: v for k, v in self.cfg.to_dict().items() if k in keys} | {
            "lang": self.settings.lang, "base_url": public_url(self.cfg.base_url), "max_tokens": verdict_tokens(self.cfg)}
        m["input"] = self.source
        m["templates"] = {"same-task": {"name": self.settings.template.name, "sha256": self.settings.template.sha256}}
        m["pairs"] = self.summary()



# ---- the command ---------------------------------------------------------------------------------


def check_pairs_resumable(previous: dict | None, settings: PairSettings, source: dict, price: Price | None, path: Path) -> None:
    """Refuse to resume with other input, teacher, price, template, --candidates or --field: verdicts would mix two runs."""
    if not previous:
        return
    if not isinstance(previous.get("pairs"), dict):
        raise OutputError(f"{path}: holds another kind of run, not a pairs run", "choose a new --out")
    mismatches, flags = teacher_mismatches(previous, settings.model, price)
    if (previous.get("input") or {}).get("sha256") != source["sha256"]:
        mismatches.append("input records (files or --limit)")
    old, now = previous["pairs"], settings.manifest()
    for key, flag in (("candidates", "--candidates"), ("field", "--field")):
        if key in old and old[key] != now[key]:
            mismatches.append(f"{flag} (was {old[key]!r})")
            flags.append(f"{flag} {old[key]}")
    if (old.get("template") or {}).get("sha256") not in (None, now["template"]["sha256"]):
        mismatches.append(f"template {old['template'].get('name')}")
    if mismatches:
        hint = f"resume with {' '.join(flags)}" if flags and len(flags) == len(mismatches) else "re-run with the original settings to resume"
        raise OutputError(f"{path}: holds a pairs run made with a different {', '.join(mismatches)}", f"{hint}, or choose a new --out")


def print_summary(engine: Engine, stage: Pairing, console) -> None:
    """One line: pairs asked and their verdicts, kept and rejected records, tokens and dollars."""
    s = stage.summary()
    usage = engine.usage.get(STAGE) or Tally()
    cost = f"${engine.stage_usd(STAGE):.4f}" if engine.price else "cost unknown (no price for the model)"
    verdicts = ", ".join(f"{k} {v:,}" for k, v in s["verdicts"].items())
    if stage.completed:
        decided = f"{s['moot']:,} moot; kept {s['kept']:,}, rejected {s['rejected']:,}"
    else:
        decided = "nothing written until every record is decided"
    console.print(f"pairs ({s['model']}, --candidates {s['candidates']:g} on {s['field']}): {engine.status}; {s['asked']:,} of "
                  f"{s['candidate_pairs']:,} candidate pairs asked ({verdicts}), {decided}; {usage.requests:,} requests, "
                  f"{usage.prompt_tokens:,}+{usage.completion_tokens:,} tokens, {cost}; {engine.run.path}",
                  soft_wrap=True, highlight=False, markup=False)


def run_pairs(cfg: GenerateConfig, inputs: Sequence[Path], limit: int | None, candidates: float, api_key: str | None, command: str,
              console) -> int:
    """The pairs command after its flags: any dataset → kept records without the near-duplicates the teacher confirmed. Returns the exit code."""
    from selfinstruct.config import require_key
    from selfinstruct.dirlock import DirectoryLock
    from selfinstruct.engine import check_orphaned, make_engine
    from selfinstruct.inputs import stage_input
    from selfinstruct.pricing import run_price
    from selfinstruct.progress import run_displayed
    from selfinstruct.teacher import online_transport

    check_candidates(candidates)
    out = cfg.out
    records, lang, source = stage_input(inputs, out, limit, cfg.lang, "to compare", "write the kept records to a new directory")
    cfg = dataclasses.replace(cfg, lang=lang)
    price = run_price(cfg, console)
    require_key(cfg, api_key)
    settings = PairSettings(model=cfg.model, lang=lang, template=load_template(template_name(lang)), candidates=candidates,
                            field=cfg.dedup_field)
    run = RunDir(out)
    run.prepare()
    with DirectoryLock(run.path, command):
        check_orphaned(run)
        previous = run.load_manifest()
        check_pairs_resumable(previous, settings, source, price, run.path)
        if previous and previous.get("status") == "completed" and previous["pairs"].get("completed"):
            if not cfg.quiet:
                done = previous["pairs"]
                console.print(f"{run.path}: every pair already judged (kept {done.get('kept', 0):,}, rejected {done.get('rejected', 0):,}); "
                              "nothing to do", soft_wrap=True, highlight=False, markup=False)
            return 0
        pairs = candidate_pairs(records, candidates, settings.field)
        engine = make_engine(run, cfg, price, command)
        stage = Pairing(settings, engine, cfg, records, pairs, source)
        engine.load()
        if engine.tally.requests and not cfg.quiet:
            console.print(f"resuming {run.path}: {engine.tally.requests:,} verdict requests already paid", soft_wrap=True, highlight=False,
                          markup=False)
        # The same pair should get the same verdict: greedy decoding, and a verdict needs few tokens.
        teacher = dataclasses.replace(teacher_settings(cfg), temperature=0.0, top_p=None, max_tokens=verdict_tokens(cfg))
        try:
            exit_code = run_displayed(engine, stage, lambda: online_transport(teacher, cfg.replicas, api_key), console, cfg.quiet)
        finally:
            run.close()
        if not cfg.quiet or exit_code:
            print_summary(engine, stage, console)
        if exit_code in (130, 143):
            console.print(f"interrupted; every verdict paid for is saved. Resume with: {command}", soft_wrap=True, highlight=False,
                          markup=False)
        return exit_code
