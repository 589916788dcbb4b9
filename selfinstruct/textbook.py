"""textbook: phi-style textbook sections (topic × audience × style) with worked examples, then exercises with solutions as records."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from selfinstruct.config import GenerateConfig
from selfinstruct.dirlock import DirectoryLock
from selfinstruct.engine import Engine, QueuedStage, Tally, public_url, teacher_mismatches
from selfinstruct.errors import InputError, OutputError
from selfinstruct.evolution import strip_think, template_suffix
from selfinstruct.inputs import infer_lang
from selfinstruct.parsing import clean_reply, parse_reply
from selfinstruct.pricing import Price, run_price
from selfinstruct.prompts import Template, load_template, prompts_dir
from selfinstruct.rules import RuleSettings, check
from selfinstruct.rundir import RECORDS, REJECTED, RunDir
from selfinstruct.similarity import DedupIndex, dedup_text, topic_text

JUDGE_STAGE = "judge"  # the stage the quality gate writes on the records it rejects (judging.STAGE)

SECTION = "section"
EXERCISES = "exercises"
# Every unit's outcome (its section text, kept or rejected with the reason): the unit is finished once its line is here.
SECTIONS = "sections.jsonl"
SHIPPED_TOPICS = ("zh", "en")
# The rules that read a section: it has no instruction of its own (the topic is the user's), so only the reply-side ones.
SECTION_RULES = ("empty", "wrong-script", "refusal", "placeholder", "output-language", "code-translated")


# ---- topics, audiences, styles: pure pieces ------------------------------------------------------


@dataclass(frozen=True)
class Choices:
    """A list a unit draws from (topics, audiences or styles), named and fingerprinted for the manifest."""

    name: str
    items: tuple[str, ...]
    sha256: str

    def manifest(self) -> dict:
        return {"name": self.name, "count": len(self.items), "sha256": self.sha256}


def _choices(name: str, items: list[str]) -> Choices:
    unique = tuple(dict.fromkeys(i.strip() for i in items if i.strip()))
    return Choices(name, unique, hashlib.sha256("\n".join(unique).encode("utf-8")).hexdigest())


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, # comment lines left out."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})", "save it as UTF-8 text, one item a line") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def load_topics(name_or_path: str | Path) -> Choices:
    """Topics from a shipped list (zh, en), a text file (one a line) or JSONL ({"topic": ...} a line)."""
    path = Path(name_or_path)
    if not path.is_file() and str(name_or_path).lower() in SHIPPED_TOPICS:
        path = prompts_dir() / "textbook" / f"topics_{str(name_or_path).lower()}.txt"
    if not path.is_file():
        raise InputError(f"--topics {name_or_path}: no such file", "pass a text file (one topic a line) or JSONL of {\"topic\": ...}, or zh / en")
    lines = read_lines(path)
    topics = []
    if path.suffix.lower() == ".jsonl" or (lines and lines[0].startswith("{")):
        for no, line in enumerate(lines, 1):
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{path}:{no}: not a JSON line ({exc.msg})", "write one {\"topic\": \"...\"} object a line") from None
            topic = obj.get("topic") if isinstance(obj, dict) else None
            if not isinstance(topic, str) or not topic.strip():
                raise InputError(f"{path}:{no}: no \"topic\" text", "write one {\"topic\": \"...\"} object a line")
            topics.append(topic)
    else:
        topics = lines
    choices = _choices(path.name, topics)
    if not choices.items:
        raise InputError(f"{path}: no topics in it", "write one topic a line (lines starting with # are comments)")
    return choices


def load_shipped(kind: str, lang: str) -> Choices:
    """The shipped audiences or styles of a language (prompts/textbook/<kind>_<zh|en>.txt)."""
    path = prompts_dir() / "textbook" / f"{kind}_{template_suffix(lang)}.txt"
    return _choices(path.name, read_lines(path))


def unit_id(i: int) -> str:
    """The id of the i-th unit (0-based): units are numbered, so a larger --n extends a run and a rerun redoes nothing."""
    return f"tb-{i + 1:05d}"


def draw_unit(seed: int, uid: str, topics: Choices, audiences: Choices, styles: Choices) -> tuple[str, str, str]:
    """(topic, audience, style) of a unit, from an rng seeded by the run seed and the unit id: a rerun draws the same."""
    rng = random.Random(f"{seed}:textbook:{uid}")
    return rng.choice(topics.items), rng.choice(audiences.items), rng.choice(styles.items)


def section_title(text: str) -> str:
    """A section's title: its first line without Markdown heading marks."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    return first.strip().lstrip("#").strip().strip("*").strip()


def load_templates(lang: str) -> tuple[Template, Template]:
    suffix = template_suffix(lang)
    return load_template(f"textbook/section_{suffix}.jinja"), load_template(f"textbook/exercises_{suffix}.jinja")


# ---- the stage -----------------------------------------------------------------------------------


class Textbook(QueuedStage):
    """The textbook stage: a job per unit, a section request, then (unless the section is rejected) an exercises request."""

    name = "textbook"
    yield_what = "sections gave a usable exercise"
    yield_check = "the model, sections.jsonl and rejected.jsonl"
    ledger_stages = (SECTION, EXERCISES)

    def __init__(self, cfg: GenerateConfig, engine: Engine, lang: str, topics: Choices) -> None:
        self.cfg = cfg
        self.engine = engine
        self.run = engine.run
        self.lang = lang
        self.topics = topics
        self.audiences = load_shipped("audiences", lang)
        self.styles = load_shipped("styles", lang)
        self.section_template, self.exercise_template = load_templates(lang)
        self.rules = RuleSettings(lang=lang, enabled=frozenset(r for r in RuleSettings().enabled if r not in cfg.no_rule))
        self.section_rules = dataclasses.replace(self.rules, enabled=self.rules.enabled & frozenset(SECTION_RULES))
        self.dedup = "near-duplicate" not in cfg.no_rule
        self.section_index = DedupIndex(cfg.similarity)
        self.exercise_index = DedupIndex(cfg.similarity)
        self.tally = Tally()
        self.sections = collections.Counter()  # kept, and each rejection reason
        self.seen: dict[str, str | None] = {}  # exercise ids already written: None kept, else the rejection reason
        self.done = 0
        self.sample_reply = ""
        self._queue = iter(())

    def load(self) -> None:
        """Re-index what earlier attempts kept and queue the units without a sections.jsonl line."""
        finished = set()
        for sec in self.run.load(SECTIONS):
            finished.add(sec["id"])
            self.sections[sec.get("reason") or "kept"] += 1
            if not sec.get("reason") and self.dedup:
                self.section_index.add(sec["id"], dedup_text(sec["text"]))
        # What the gate (--judge) took out was kept here first: counted kept, as the gate counts it off (Judging.counts).
        gated = [rec for rec in self.run.load(REJECTED) if (rec.get("meta") or {}).get("stage") == JUDGE_STAGE]
        for rec in self.run.load(RECORDS) + gated:
            if rec["id"] in self.seen:
                continue  # a gate killed before its rewrite: the record is in both files
            self.seen[rec["id"]] = None
            self.tally.kept += 1
            if self.dedup:
                self.exercise_index.add(rec["id"], topic_text(rec["instruction"], rec["input"]))
        for rec in self.run.load(REJECTED):
            if rec["id"] in self.seen:
                continue
            self.seen[rec["id"]] = rec.get("reason", "unknown")
            self.tally.rejected[rec.get("reason", "unknown")] += 1
        todo = [unit_id(i) for i in range(self.cfg.n) if unit_id(i) not in finished]
        self.done = self.cfg.n - len(todo)
        self._queue = iter(todo)

    # ---- the engine's questions -----------------------------------------------------------

    def progress(self) -> tuple[str, int, int]:
        return "sections", self.done, self.cfg.n


    # ---- one unit ---------------------------------------------------------------------------

    async def _job(self, uid: str) -> None:
        kept = await self._unit(uid)  # Halted passes through: the unit is not finished
        self.done += 1
        self.engine.outcome(kept)

    async def _unit(self, uid: str) -> int:
        topic, audience, style = draw_unit(self.cfg.seed, uid, self.topics, self.audiences, self.styles)
        section = {"id": uid, "topic": topic, "audience": audience, "style": style, "title": "", "text": "",
                   "meta": {"stage": SECTION, "model": self.cfg.model, "template": self.section_template.name,
                            "template_sha256": self.section_template.sha256, "request_ids": {}}}
        messages = self.section_template.render(topic=topic, audience=audience, style=style, lang=self.lang)
        entry = await self.engine.ask(SECTION, f"{SECTION}:{uid}", messages, max_tokens=self.cfg.max_tokens, fields={"unit_id": uid})
        problem = self._read_section(section, entry)
        if problem:
            return self._close(section, 0, 0, problem)
        messages = self.exercise_template.render(section=section["text"], num_exercises=self.cfg.exercises, lang=self.lang)
        entry = await self.engine.ask(EXERCISES, f"{EXERCISES}:{uid}", messages, max_tokens=self.cfg.max_tokens, fields={"unit_id": uid})
        kept, rejected = self._exercises(section, entry)
        return self._close(section, kept, rejected, None)

    def _read_section(self, section: dict, entry: dict) -> tuple[str, str] | None:
        """Fill a section from its reply; the reason it cannot be used (no exercises are asked for then), or None."""
        section["meta"]["request_ids"][SECTION] = entry["request_id"]
        section["meta"]["usage"] = entry.get("usage") or {}
        if entry["status"] != "ok":
            return "request-failed", f"the section request failed: {entry.get('error', '')}"
        self.sample_reply = entry.get("content", "") or ""
        text = clean_reply(entry.get("content", ""))
        section |= {"title": section_title(text), "text": text}
        section["meta"] |= {"response_id": entry.get("response_id"), "finish_reason": entry.get("finish_reason")}
        if entry.get("finish_reason") == "length":
            return "truncated", "the section was cut by the token limit"
        verdict = check(section["topic"], "", text, self.section_rules)
        if verdict:
            return verdict
        if self.dedup:
            match = self.section_index.add_if_novel(section["id"], dedup_text(text))
            if match is not None:
                return "near-duplicate", f"ROUGE-L {match.score:.3f} with section {match.key}"
        return None

    def _exercises(self, section: dict, entry: dict) -> tuple[int, int]:
        """Parse, check and write a section's exercises; (kept, rejected) counts, those written before a stop included."""
        section["meta"]["request_ids"][EXERCISES] = entry["request_id"]
        if entry["status"] != "ok":
            rec = self._record(section, entry, 1, "", "", "", "", 1)
            return self._write([], [rec | {"reason": "request-failed", "detail": f"the exercises request failed: {entry.get('error', '')}"}])
        items = parse_reply(entry.get("content", ""), entry.get("finish_reason"))[: self.cfg.exercises]
        kept, rejected, before = [], [], collections.Counter()
        for no, item in enumerate(items, 1):
            rec = self._record(section, entry, no, item.instruction, item.input, strip_think(item.output), item.raw, len(items))
            if rec["id"] in self.seen:
                # Written before a stop that came before the unit's line: the replayed reply gives the same exercise.
                before["rejected" if self.seen[rec["id"]] else "kept"] += 1
                continue
            verdict = (item.problem, item.detail) if item.problem else check(rec["instruction"], rec["input"], rec["output"], self.rules)
            if verdict is None and self.dedup:
                match = self.exercise_index.add_if_novel(rec["id"], topic_text(rec["instruction"], rec["input"]))
                if match is not None:
                    verdict = ("near-duplicate", f"ROUGE-L {match.score:.3f} with {match.key}")
            if verdict:
                rejected.append(rec | {"reason": verdict[0], "detail": verdict[1]})
            else:
                kept.append(rec)
        k, r = self._write(kept, rejected)
        return k + before["kept"], r + before["rejected"]

    def _record(self, section: dict, entry: dict, no: int, instruction: str, input_text: str, output: str, raw: str, share: int) -> dict:
        usage = {k: int((entry.get("usage") or {}).get(k, 0) + (section["meta"]["usage"] or {}).get(k, 0)) // max(1, share)
                 for k in ("prompt_tokens", "completion_tokens")}
        meta = {"stage": "textbook", "section_id": section["id"], "section_title": section["title"], "topic": section["topic"],
                "audience": section["audience"], "style": section["style"], "lang": self.lang, "model": self.cfg.model,
                "template": self.exercise_template.name, "template_sha256": self.exercise_template.sha256,
                "request_id": entry["request_id"], "request_ids": dict(section["meta"]["request_ids"]),
                "response_id": entry.get("response_id"), "finish_reason": entry.get("finish_reason"), "usage": usage, "raw": raw}
        return {"id": f"{section['id']}:{no}", "instruction": instruction, "input": input_text, "output": output, "meta": meta}

    def _write(self, kept: list[dict], rejected: list[dict]) -> tuple[int, int]:
        if kept:
            self.run.append(RECORDS, kept)
        if rejected:
            self.run.append(REJECTED, rejected)
        for rec in kept + rejected:
            self.seen[rec["id"]] = rec.get("reason")
        self.tally.kept += len(kept)
        self.tally.rejected.update(r["reason"] for r in rejected)
        return len(kept), len(rejected)

    def _close(self, section: dict, kept: int, rejected: int, problem: tuple[str, str] | None) -> int:
        """The unit's sections.jsonl line, written last: its presence marks the unit finished."""
        section["exercises"] = {"kept": kept, "rejected": rejected}
        if problem:
            section |= {"reason": problem[0], "detail": problem[1]}
        self.run.append(SECTIONS, [section])
        self.sections[problem[0] if problem else "kept"] += 1
        return kept

    # ---- manifest -----------------------------------------------------------------------

    def summary(self) -> dict:
        rejected = {k: v for k, v in sorted(self.sections.items()) if k != "kept"}
        return {"units": self.cfg.n, "exercises_per_section": self.cfg.exercises, "topics": self.topics.manifest(),
                "audiences": self.audiences.manifest(), "styles": self.styles.manifest(),
                "sections": {"done": self.done, "kept": self.sections["kept"], "rejected": rejected},
                "exercises": {"kept": self.tally.kept, "rejected": dict(sorted(self.tally.rejected.items()))}}

    def describe(self, m: dict) -> None:
        cfg = self.cfg
        keys = ("model", "base_url", "api_key_env", "n", "exercises", "seed", "concurrency", "rpm", "tpm", "timeout", "retries",
                "temperature", "top_p", "max_tokens", "similarity", "max_cost", "price_in", "price_out", "no_rule", "min_yield",
                "yield_window", "grace")
        m["config"] = {k: v for k, v in cfg.to_dict().items() if k in keys} | {"lang": self.lang, "base_url": public_url(cfg.base_url)}
        m["templates"] = {SECTION: {"name": self.section_template.name, "sha256": self.section_template.sha256},
                          EXERCISES: {"name": self.exercise_template.name, "sha256": self.exercise_template.sha256}}
        m["filters"] = {"similarity": cfg.similarity if self.dedup else None, "rules": sorted(self.rules.enabled), "lang": self.lang,
                        "near_duplicate_on": "sections (whole text) and exercises (instruction + input), each against earlier ones"
                        if self.dedup else None}
        m["textbook"] = self.summary()


# ---- the command ---------------------------------------------------------------------------------


def check_textbook_resumable(run: RunDir, cfg: GenerateConfig, lang: str, stage: Textbook, price: Price | None) -> None:
    """Refuse to resume a textbook run with other topics, seed, language, exercises, templates, model or price (a larger --n is fine)."""
    previous = run.load_manifest()
    if not previous:
        return
    if "textbook" not in previous:
        raise OutputError(f"{run.path}: holds another kind of run, not a textbook run", "choose a new --out")
    old = previous["textbook"]
    mismatches, flags = teacher_mismatches(previous, cfg.model, price)
    if (old.get("topics") or {}).get("sha256") != stage.topics.sha256:
        mismatches.append("--topics")
    if old.get("exercises_per_section") != cfg.exercises:
        mismatches.append("--exercises")
    old_cfg = previous.get("config") or {}
    for key, value in (("seed", cfg.seed), ("lang", lang), ("similarity", cfg.similarity)):
        if key in old_cfg and old_cfg[key] != value:
            mismatches.append(f"--{key}")
    for t in (stage.section_template, stage.exercise_template):
        if any(v.get("name") == t.name and v.get("sha256") != t.sha256 for v in (previous.get("templates") or {}).values()):
            mismatches.append(f"template {t.name}")
    if mismatches:
        hint = f"resume with {' '.join(flags)}" if flags and len(flags) == len(mismatches) else "re-run with the original settings to resume"
        raise OutputError(f"{run.path}: holds a textbook run made with a different {', '.join(mismatches)}", f"{hint}, or choose a new --out")


def units_written(run: RunDir) -> int:
    """How many units have their sections.jsonl line."""
    return len({sec["id"] for sec in run.load(SECTIONS)})


def run_textbook(cfg: GenerateConfig, topics_arg: str, api_key: str | None, command: str, console,
                 judge_api_key: str | None = None) -> int:
    """The textbook command after its flags: topics → sections.jsonl and exercise records in a run directory, then --judge. Returns the exit code."""
    from selfinstruct.config import require_key
    from selfinstruct.engine import check_orphaned, make_engine, teacher_settings
    from selfinstruct.judging import check_judgeable, check_key, finish_gated, gate_run, gated_before, judge_key, judge_settings
    from selfinstruct.progress import run_displayed
    from selfinstruct.teacher import Teacher

    topics = load_topics(topics_arg)
    lang = cfg.lang or infer_lang(topics.items)
    cfg = dataclasses.replace(cfg, lang=lang)
    price = run_price(cfg, console)
    require_key(cfg, api_key)
    run = RunDir(cfg.out)
    run.prepare()
    with DirectoryLock(run.path, command):
        check_orphaned(run)
        if cfg.judge or cfg.moderate:
            # The judge's key, price and (on a resume) sameness are checked before the sections are paid for, not after.
            settings = judge_settings(cfg, lang)
            check_key(settings, judge_key(cfg, api_key, judge_api_key))
            check_judgeable(run.load_manifest(), settings)
        # Units are numbered and what the gate rejected stays in rejected.jsonl, so a gated run can grow (a larger --n):
        # the new units' exercises are judged and the old verdicts replay from the ledger. Otherwise nothing is left to do.
        if gated_before(run, cfg) and units_written(run) >= cfg.n:
            return finish_gated(run, cfg, None, console)
        engine = make_engine(run, cfg, price, command)
        stage = Textbook(cfg, engine, lang, topics)
        check_textbook_resumable(run, cfg, lang, stage, price)
        engine.load()
        stage.load()
        if engine.tally.requests and not cfg.quiet:
            console.print(f"resuming {run.path}: {stage.done:,} of {cfg.n:,} sections done, {stage.tally.kept:,} exercises kept")
        try:
            exit_code = run_displayed(engine, stage, lambda: Teacher(teacher_settings(cfg), api_key), console, cfg.quiet)
        finally:
            run.close()
        print_summary(engine, stage, console)
        if exit_code in (130, 143):
            console.print(f"interrupted; everything finished is saved. Resume with: {command}", soft_wrap=True, highlight=False, markup=False)
        if exit_code or not (cfg.judge or cfg.moderate):
            return exit_code
        # The exercises are ordinary instruction records: the gate rates them on the shipped rubric, in place.
        return gate_run(engine, cfg, lang, judge_key(cfg, api_key, judge_api_key), console)


def print_summary(engine: Engine, stage: Textbook, console) -> None:
    """Sections and exercises kept and rejected, then cost per stage."""
    s = stage.summary()
    sec, ex = s["sections"], s["exercises"]
    line = lambda d: ", ".join(f"{k} {v:,}" for k, v in d.items()) or "none"
    console.print(f"{engine.status}: sections {sec['kept']:,} kept of {sec['done']:,} (rejected: {line(sec['rejected'])}); "
                  f"exercises {ex['kept']:,} kept (rejected: {line(ex['rejected'])}); {engine.run.path}",
                  soft_wrap=True, highlight=False, markup=False)
    for name, st in engine.manifest()["stages"].items():
        usd = f"${st['usd']:.4f}" if engine.price else "cost unknown"
        console.print(f"  {name}: {st['requests']:,} requests, {st['prompt_tokens']:,} prompt + {st['completion_tokens']:,} completion tokens, {usd}",
                      soft_wrap=True, highlight=False, markup=False)
