"""chat: multi-turn conversations (Vicuna's ShareGPT data, Baize's self-chat, UltraChat): the teacher plays the user and the assistant."""

from __future__ import annotations

import collections
import dataclasses
import re
from pathlib import Path
from typing import Sequence

from selfinstruct.config import GenerateConfig
from selfinstruct.dirlock import DirectoryLock
from selfinstruct.engine import Engine, QueuedStage, Tally, public_url, teacher_mismatches
from selfinstruct.errors import ConfigError, OutputError
from selfinstruct.evolution import check_instruction, strip_think, template_suffix
from selfinstruct.inputs import infer_lang, input_seeds, read_base, records_sha256
from selfinstruct.parsing import clean_reply
from selfinstruct.pricing import Price, run_price
from selfinstruct.prompts import Template, load_template
from selfinstruct.rows import prompt_text
from selfinstruct.rules import RuleSettings, check
from selfinstruct.rundir import RECORDS, REJECTED, RunDir
from selfinstruct.similarity import DedupIndex, topic_text

ASSISTANT = "chat-assistant"
JUDGE_STAGE = "judge"  # the stage the quality gate writes on the records it rejects (judging.STAGE)
USER = "chat-user"
# A follow-up is a sentence or two: no need to reserve a full reply for it.
USER_MAX_TOKENS = 512
# The rules that read an instruction's own length and shape: a follow-up ("Why?") is short by nature, so later turns skip them.
INSTRUCTION_SHAPE = ("too-short", "too-long", "starts-with-punctuation")
# How a conversation ended: the simulated user closed it, it reached --turns, or a turn failed and the conversation was cut before it.
ENDINGS = ("closed", "max-turns", "cut")

_END = re.compile(r"\[\s*(?:END|结束|結束)\s*\]|【\s*(?:END|结束|結束)\s*】", re.IGNORECASE)
# "[User]", "【用户】" or "User:" at the start; a bare "User" may begin the message itself ("User research shows...").
_ROLE_PREFIX = re.compile(r"^\s*(?:[\[【(（]\s*(?:user|用户|用戶|human)\s*[\]】)）]\s*[:：]?|(?:user|用户|用戶|human)\s*[:：])\s*", re.IGNORECASE)


def parse_user_turn(content: str) -> tuple[str, bool]:
    """(message, closed) from a simulated user's reply: [END] anywhere closes the conversation; a role prefix is dropped."""
    text = clean_reply(content)
    if _END.search(text):
        return "", True
    text = _ROLE_PREFIX.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] in "\"“「" and text[-1] in "\"”」":
        text = text[1:-1].strip()
    return text, False


def turn_request_id(record_id: str, turn: int, role: str) -> str:
    """A turn's request id: the same conversation turn asks the same request, so a rerun replays it."""
    return f"chat:{record_id}:{turn}:{role}"


def load_templates(lang: str) -> tuple[Template, Template]:
    """The shipped assistant-turn and user-turn templates of a language."""
    suffix = template_suffix(lang)
    return load_template(f"chat/assistant_{suffix}.jinja"), load_template(f"chat/user_{suffix}.jinja")


def seed_base(path: Path) -> list[dict]:
    """Seed tasks as first user turns: the instruction and its first instance's input."""
    from selfinstruct.seeds import read_seeds

    seeds = read_seeds(path)
    return [{"id": t.id, "instruction": t.instruction, "input": t.instances[0].input if t.instances else "", "output": "",
             "meta": {"seed_ids": [t.id]}} for t in seeds.tasks]


class Conversation(QueuedStage):
    """The chat stage: a job per input record; each turn (simulated user, then assistant) is its own request."""

    name = "chat"
    yield_what = "conversations kept a turn"
    yield_check = "the model and rejected.jsonl"
    ledger_stages = (ASSISTANT, USER)

    def __init__(self, cfg: GenerateConfig, engine: Engine, lang: str, base: list[dict], source: dict | None = None,
                 seeds: dict | None = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.run = engine.run
        self.lang = lang
        self.base = base
        self.source = source or {}
        self.seeds = seeds
        self.assistant_template, self.user_template = load_templates(lang)
        self.rules = RuleSettings(lang=lang, enabled=frozenset(r for r in RuleSettings().enabled if r not in cfg.no_rule))
        self.later_rules = dataclasses.replace(self.rules, enabled=self.rules.enabled - frozenset(INSTRUCTION_SHAPE))
        self.dedup = "near-duplicate" not in cfg.no_rule
        self.tally = Tally()
        self.endings = collections.Counter()
        self.turns = collections.Counter()  # assistant turns per kept conversation
        self.finished: set[str] = set()
        self.total = 0
        self.done = 0
        self.sample_reply = ""
        self._queue = iter(())

    # ---- resume and the checks before paying ----------------------------------------------

    def load(self) -> None:
        """Count what earlier attempts wrote, reject (free) first turns the rules or the near-duplicate check refuse, queue the rest."""
        for rec in self.run.load(RECORDS):
            self._finish(rec, None)
        for rec in self.run.load(REJECTED):
            if rec["id"] in self.finished:
                continue  # a gate killed before its rewrite: the conversation is in both files
            # What the gate (--judge) took out was kept here first: counted kept, as the gate counts it off (Judging.counts).
            gated = (rec.get("meta") or {}).get("stage") == JUDGE_STAGE
            self._finish(rec, None if gated else rec.get("reason", "unknown"))
        refused = self._refused()
        fresh = [self._record(rec) | {"reason": refused[rec["id"]][0], "detail": refused[rec["id"]][1]}
                 for rec in self.base if rec["id"] in refused and rec["id"] not in self.finished]
        if fresh:
            self.run.append(REJECTED, fresh)
            for rec in fresh:
                self._finish(rec, rec["reason"])
        todo = [rec for rec in self.base if rec["id"] not in self.finished]
        self.total, self.done = len(self.base), len(self.base) - len(todo)
        self._queue = iter(todo)

    def _refused(self) -> dict[str, tuple[str, str]]:
        """First user turns refused before any request: the instruction rules, then near-copies of an earlier one (keep-first, input order)."""
        refused: dict[str, tuple[str, str]] = {}
        index = DedupIndex(self.cfg.similarity)
        for rec in self.base:
            verdict = check_instruction(rec["instruction"], rec["input"], self.rules)
            if verdict:
                refused[rec["id"]] = verdict
            elif self.dedup:
                match = index.add_if_novel(rec["id"], topic_text(rec["instruction"], rec["input"]))
                if match is not None:
                    refused[rec["id"]] = ("near-duplicate", f"ROUGE-L {match.score:.3f} with {match.key}")
        return refused

    def _finish(self, rec: dict, reason: str | None) -> None:
        self.finished.add(rec["id"])
        if reason is None:
            self.tally.kept += 1
            meta = rec.get("meta") or {}
            self.endings[str(meta.get("ended"))] += 1
            self.turns[int(meta.get("turns") or 0)] += 1
        else:
            self.tally.rejected[reason] += 1

    # ---- the engine's questions -----------------------------------------------------------

    def progress(self) -> tuple[str, int, int]:
        return "conversations", self.done, self.total


    # ---- one conversation -------------------------------------------------------------------

    def _record(self, rec: dict) -> dict:
        meta = {k: v for k, v in (rec.get("meta") or {}).items() if k not in ("raw", "usage", "request_id", "request_ids")}
        if rec.get("output", "").strip():
            meta["previous_output"] = rec["output"]
        previous_model = meta.pop("model", None)
        if previous_model and "previous_output" in meta:
            meta["previous_model"] = previous_model
        meta |= {"stage": "chat", "model": self.cfg.model, "lang": self.lang,
                 "templates": {ASSISTANT: self.assistant_template.name, USER: self.user_template.name},
                 "request_ids": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0, "estimated": False}}
        return {"id": rec["id"], "instruction": rec["instruction"], "input": rec["input"], "output": "",
                "messages": [{"role": "user", "content": prompt_text(rec["instruction"], rec["input"])}], "meta": meta}

    async def _job(self, rec: dict) -> None:
        kept = await self._converse(rec)  # Halted passes through: the conversation is not finished
        self.done += 1
        self.engine.outcome(1 if kept else 0)

    def _note(self, meta: dict, entry: dict) -> None:
        meta["request_ids"].append(entry["request_id"])
        usage = entry.get("usage") or {}
        for k in ("prompt_tokens", "completion_tokens"):
            meta["usage"][k] += int(usage.get(k, 0))
        meta["usage"]["estimated"] = meta["usage"]["estimated"] or bool(usage.get("estimated"))

    async def _converse(self, rec: dict) -> bool:
        """Up to --turns exchanges; ends on the user's [END], at --turns, or cut before the first turn that fails."""
        record = self._record(rec)
        meta, history = record["meta"], record["messages"]
        ended = "max-turns"
        for turn in range(1, self.cfg.turns + 1):
            user_text, user_input = rec["instruction"], rec["input"]
            if turn > 1:
                messages = self.user_template.render(history=history, turn=turn, lang=self.lang)
                entry = await self.engine.ask(USER, turn_request_id(rec["id"], turn, "user"), messages,
                                              max_tokens=min(USER_MAX_TOKENS, self.cfg.max_tokens or USER_MAX_TOKENS),
                                              fields={"record_id": rec["id"], "turn": turn})
                self._note(meta, entry)
                if entry["status"] != "ok":
                    ended = self._cut(meta, turn, "user", "request-failed", f"the user-turn request failed: {entry.get('error', '')}")
                    break
                user_text, closed = parse_user_turn(entry.get("content", ""))
                user_input = ""
                if closed:
                    ended = "closed"
                    break
                if not user_text:
                    ended = self._cut(meta, turn, "user", "empty", "the simulated user wrote nothing")
                    break
                history.append({"role": "user", "content": user_text})
            messages = self.assistant_template.render(history=history, lang=self.lang)
            entry = await self.engine.ask(ASSISTANT, turn_request_id(rec["id"], turn, "assistant"), messages,
                                          max_tokens=self.cfg.max_tokens, fields={"record_id": rec["id"], "turn": turn})
            self._note(meta, entry)
            verdict = self._check_answer(entry, turn, user_text, user_input)
            if verdict:
                if turn == 1:
                    record["output"] = strip_think(entry.get("content", "") or "")
                    return self._reject(record, *verdict)
                history.pop()  # the follow-up without an answer ends nothing: cut before it
                ended = self._cut(meta, turn, "assistant", *verdict)
                break
            answer = strip_think(entry.get("content", ""))
            history.append({"role": "assistant", "content": answer})
            if turn == 1:
                record["output"] = answer
        meta |= {"turns": sum(1 for m in history if m["role"] == "assistant"), "ended": ended}
        self.run.append(RECORDS, [record])
        self._finish(record, None)
        return True

    def _check_answer(self, entry: dict, turn: int, user_text: str, user_input: str) -> tuple[str, str] | None:
        """Why an assistant turn cannot be kept (a failed request, a cut reply, a rule it breaks), or None."""
        if entry["status"] != "ok":
            return "request-failed", f"the assistant request of turn {turn} failed: {entry.get('error', '')}"
        self.sample_reply = entry.get("content", "") or ""
        if entry.get("finish_reason") == "length":
            return "truncated", f"the assistant reply of turn {turn} was cut by the token limit"
        # Turn 1 is the input's task and gets every rule; a follow-up is short by nature, so only the rules that read the answer.
        return check(user_text, user_input, strip_think(entry.get("content", "")), self.rules if turn == 1 else self.later_rules)

    @staticmethod
    def _cut(meta: dict, turn: int, role: str, reason: str, detail: str) -> str:
        meta["cut"] = {"turn": turn, "role": role, "reason": reason, "detail": detail}
        return "cut"

    def _reject(self, record: dict, reason: str, detail: str) -> bool:
        record |= {"reason": reason, "detail": detail}
        self.run.append(REJECTED, [record])
        self._finish(record, reason)
        return False

    # ---- manifest -----------------------------------------------------------------------

    def summary(self) -> dict:
        return {"records": self.total, "max_turns": self.cfg.turns, "kept": self.tally.kept,
                "rejected": dict(sorted(self.tally.rejected.items())),
                "ended": {k: self.endings[k] for k in ENDINGS if self.endings[k]},
                "turns": {str(k): v for k, v in sorted(self.turns.items())}}

    def describe(self, m: dict) -> None:
        cfg = self.cfg
        keys = ("model", "base_url", "api_key_env", "turns", "seed", "concurrency", "rpm", "tpm", "timeout", "retries", "temperature",
                "top_p", "max_tokens", "similarity", "max_cost", "price_in", "price_out", "no_rule", "min_yield", "yield_window", "grace")
        m["config"] = {k: v for k, v in cfg.to_dict().items() if k in keys} | {"lang": self.lang, "base_url": public_url(cfg.base_url)}
        m["input"] = self.source
        if self.seeds:
            m["seeds"] = self.seeds
        m["templates"] = {ASSISTANT: {"name": self.assistant_template.name, "sha256": self.assistant_template.sha256},
                          USER: {"name": self.user_template.name, "sha256": self.user_template.sha256}}
        m["filters"] = {"similarity": cfg.similarity if self.dedup else None, "rules": sorted(self.rules.enabled), "lang": self.lang,
                        "near_duplicate_on": "first user turn (instruction + input)" if self.dedup else None,
                        "rules_on": "every assistant turn (later turns skip " + ", ".join(INSTRUCTION_SHAPE) + ")"}
        m["chat"] = self.summary()


# ---- the command ---------------------------------------------------------------------------------


def check_chat_resumable(run: RunDir, cfg: GenerateConfig, lang: str, source: dict, stage: Conversation, price: Price | None) -> None:
    """Refuse to resume a chat run with other input, --turns, language, templates, model or price."""
    previous = run.load_manifest()
    if not previous:
        return
    if "chat" not in previous:
        raise OutputError(f"{run.path}: holds another kind of run, not a chat run", "choose a new --out")
    mismatches, flags = teacher_mismatches(previous, cfg.model, price)
    if (previous.get("input") or {}).get("sha256") != source.get("sha256"):
        mismatches.append("input records (files, --seeds or --limit)")
    if (previous["chat"] or {}).get("max_turns") != cfg.turns:
        mismatches.append("--turns")
    old_cfg = previous.get("config") or {}
    for key, value in (("lang", lang), ("similarity", cfg.similarity)):
        if key in old_cfg and old_cfg[key] != value:
            mismatches.append(f"--{key}")
    for t in (stage.assistant_template, stage.user_template):
        if any(v.get("name") == t.name and v.get("sha256") != t.sha256 for v in (previous.get("templates") or {}).values()):
            mismatches.append(f"template {t.name}")
    if mismatches:
        hint = f"resume with {' '.join(flags)}" if flags and len(flags) == len(mismatches) else "re-run with the original settings to resume"
        raise OutputError(f"{run.path}: holds a chat run made with a different {', '.join(mismatches)}", f"{hint}, or choose a new --out")


def run_chat(cfg: GenerateConfig, inputs: Sequence[Path], seeds: Path | None, limit: int | None, api_key: str | None, command: str,
             console, judge_api_key: str | None = None) -> int:
    """The chat command after its flags: a dataset or seed file → a run directory of multi-turn conversations, then --judge. Returns the exit code."""
    from selfinstruct.config import require_key
    from selfinstruct.engine import check_orphaned, make_engine, teacher_settings
    from selfinstruct.judging import check_judgeable, check_key, finish_gated, gate_run, gated_before, judge_key, judge_settings
    from selfinstruct.progress import run_displayed
    from selfinstruct.teacher import Teacher

    if bool(inputs) == bool(seeds):
        raise ConfigError("chat takes INPUT files or --seeds FILE, one of them", "e.g. selfinstruct chat run/ --out chats, or --seeds seeds/zh.jsonl")
    paths = [seeds] if seeds else list(inputs)
    if any(Path(p).resolve() == cfg.out.resolve() for p in paths):
        raise ConfigError(f"--out {cfg.out} is also an input", "write the conversations to a new directory")
    base = seed_base(seeds) if seeds else read_base(inputs, limit)
    if seeds and limit is not None:
        base = base[:limit]
    if not base:
        raise ConfigError(f"no records to start conversations from in {', '.join(map(str, paths))}", "check the input files")
    lang = cfg.lang or infer_lang(r["instruction"] for r in base)
    cfg = dataclasses.replace(cfg, lang=lang)
    source = {"paths": [Path(p).name for p in paths], "records": len(base), "limit": limit, "sha256": records_sha256(base)}
    price = run_price(cfg, console)
    require_key(cfg, api_key)
    run = RunDir(cfg.out)
    run.prepare()
    with DirectoryLock(run.path, command):
        check_orphaned(run)
        if cfg.judge or cfg.moderate:
            # The judge's key, price and (on a resume) sameness are checked before the conversations are paid for, not after.
            settings = judge_settings(cfg, lang, conversation=True)
            check_key(settings, judge_key(cfg, api_key, judge_api_key))
            check_judgeable(run.load_manifest(), settings)
        if gated_before(run, cfg):  # the gate already rewrote records.jsonl: every conversation is made and judged
            return finish_gated(run, cfg, None, console)
        engine = make_engine(run, cfg, price, command)
        stage = Conversation(cfg, engine, lang, base, source=source, seeds=None if seeds else input_seeds(inputs))
        check_chat_resumable(run, cfg, lang, source, stage, price)
        engine.load()
        stage.load()
        if engine.tally.requests and not cfg.quiet:
            console.print(f"resuming {run.path}: {stage.tally.kept:,} kept, {sum(stage.tally.rejected.values()):,} rejected")
        try:
            exit_code = run_displayed(engine, stage, lambda: Teacher(teacher_settings(cfg), api_key), console, cfg.quiet)
        finally:
            run.close()
        print_summary(engine, stage, console)
        if exit_code in (130, 143):
            console.print(f"interrupted; everything finished is saved. Resume with: {command}", soft_wrap=True, highlight=False, markup=False)
        if exit_code or not (cfg.judge or cfg.moderate):
            return exit_code
        # The judge reads the whole conversation (prompts/judge/conversation_*), not only its first exchange.
        return gate_run(engine, cfg, lang, judge_key(cfg, api_key, judge_api_key), console, conversation=True)


def print_summary(engine: Engine, stage: Conversation, console) -> None:
    """Conversations kept and rejected, how they ended, then cost per stage."""
    s = stage.summary()
    line = lambda d: ", ".join(f"{k} {v:,}" for k, v in d.items()) or "none"
    console.print(f"{engine.status}: kept {s['kept']:,} of {s['records']:,} conversations (ended: {line(s['ended'])}; "
                  f"assistant turns: {line(s['turns'])}); rejected: {line(s['rejected'])}; {engine.run.path}",
                  soft_wrap=True, highlight=False, markup=False)
    for name, st in engine.manifest()["stages"].items():
        usd = f"${st['usd']:.4f}" if engine.price else "cost unknown"
        console.print(f"  {name}: {st['requests']:,} requests, {st['prompt_tokens']:,} prompt + {st['completion_tokens']:,} completion tokens, {usd}",
                      soft_wrap=True, highlight=False, markup=False)
