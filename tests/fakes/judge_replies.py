"""Teacher behaviour for judge tests: `FakeTeacher(reply=JudgeReplies())` answers rubric prompts (prompts/judge/*.jinja).

The shared fake server knows only generation prompts; its `reply` knob hands every request here.
A judge prompt is recognised by its record sections (### 指令 / ### Instruction ...); the verdict
depends only on the record's text (never on arrival order), so a resumed run gets the replies an
uninterrupted one would. Any other prompt gets the fake's own numbered task list.

Trigger words in the record's instruction pick the verdict's form:

    JS1 … JS5    JSON {"score": N, "safe": true, "reason": ...}
    JTEXT        `Score: N` and `Reason: ...` lines (English text, no JSON)
    JZH          `评分：N` and `理由：...`
    JFRAC        `N/5 ...`
    JFENCE       the JSON in a ```json code fence
    JTHINK       a <think> block (which mentions another score) before the JSON
    JBAD         prose with no score, on the first request and on its retry     -> judge-failed
    JBAD1        prose with no score first; the retry (which quotes it) is JSON -> parsed
    JUNSAFE      JSON with score 4 and "safe": false
    JRANGE       JSON with score 9 (out of range), then prose                   -> judge-failed

A conversation rubric (prompts/judge/conversation_*) is read the same way, its first user turn
standing for the instruction. `Judged(teacher)` answers rubric prompts here and the rest with another
scripted teacher (TextbookReplies, ChatReplies).

With none of these the score is JS<N> if the text holds one, else 1-5 from a hash of the
instruction (`score_of`); `labels` lets a calibration sample script each record's score by id.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from typing import Any

from fakes.openai_server import detect_request, make_item, render_items

_SECTIONS = re.compile(r"### (?:指令|Instruction)\n(.*?)\n### (?:输入|Input)\n(.*?)\n### (?:回答|Response)\n(.*?)\n\n(?:只用 JSON|Reply in JSON)",
                       re.DOTALL)
# The conversation rubric (prompts/judge/conversation_*): its first user turn stands for the instruction.
_CONVERSATION = re.compile(r"### (?:第 1 轮 · 用户|Turn 1 · User)\n(.*?)\n### (?:第 1 轮 · 助手|Turn 1 · Assistant)\n", re.DOTALL)
_FORCED = re.compile(r"JS([1-5])")


def score_of(instruction: str) -> int:
    """The default score of an instruction: JS<N> when it names one, else 1-5 from its hash."""
    forced = _FORCED.search(instruction)
    if forced:
        return int(forced.group(1))
    return int(hashlib.sha256(instruction.encode("utf-8")).hexdigest(), 16) % 5 + 1


def _users(messages: Any) -> list[str]:
    return [str(m.get("content", "")) for m in messages if isinstance(m, dict) and m.get("role") == "user"]


def rubric_instruction(messages: Any) -> str | None:
    """The instruction a rubric prompt rates (a conversation's first user turn), or None when it is no rubric prompt."""
    users = _users(messages or [])
    if not users:
        return None
    match = _SECTIONS.search(users[0]) or _CONVERSATION.search(users[0])
    return match.group(1) if match else None


class JudgeReplies:
    """The reply knob's callable: verdicts for rubric prompts, numbered tasks for generation prompts."""

    def __init__(self, scores: dict[str, int] | None = None) -> None:
        # instruction text -> score, for samples whose scores a test scripts (calibration).
        self.scores = scores or {}
        self.judge_requests = 0
        self.conversations = 0  # requests on the conversation rubric

    def __call__(self, body: dict, rng: random.Random) -> str:
        messages = body.get("messages") or []
        users = _users(messages)
        instruction = rubric_instruction(messages)
        if instruction is None:
            lang, count, hant = detect_request(messages)
            return render_items([make_item(rng, lang) for _ in range(count)], lang, False, hant)
        self.judge_requests += 1
        self.conversations += bool(_CONVERSATION.search(users[0]))
        retry = len(users) > 1
        score = self.scores.get(instruction, score_of(instruction))
        reason = f"fake verdict {score} for {instruction[:20]}"
        as_json = json.dumps({"score": score, "safe": True, "reason": reason}, ensure_ascii=False)
        if "JBAD1" in instruction:
            return as_json if retry else "This record looks reasonable to me overall."
        if "JBAD" in instruction:
            return "I would need more context to rate this." if not retry else "Still hard to say, sorry."
        if "JRANGE" in instruction:
            return json.dumps({"score": 9, "reason": "out of range"}) if not retry else "no idea"
        if "JUNSAFE" in instruction:
            return json.dumps({"score": 4, "safe": False, "reason": "gives instructions that could hurt someone"})
        if "JTEXT" in instruction:
            return f"Score: {score}\nReason: {reason}"
        if "JZH" in instruction:
            return f"评分：{score}\n理由：{reason}"
        if "JFRAC" in instruction:
            return f"{score}/5 - {reason}"
        if "JFENCE" in instruction:
            return f"```json\n{as_json}\n```"
        if "JTHINK" in instruction:
            return f"<think>At first I thought score: 1, but no.</think>\n{as_json}"
        return as_json


class Judged:
    """Verdicts for rubric prompts, and another scripted teacher's replies (e.g. TextbookReplies, ChatReplies) for the rest."""

    def __init__(self, teacher, judge: JudgeReplies | None = None) -> None:
        self.teacher, self.judge = teacher, judge or JudgeReplies()

    def __call__(self, body: dict, rng: random.Random) -> str:
        if rubric_instruction(body.get("messages")) is not None:
            return self.judge(body, rng)
        return self.teacher(body, rng)
