"""Teacher behaviour for the textbook and chat recipes: `FakeTeacher(reply=TextbookReplies())` or `reply=ChatReplies()`.

Replies depend only on the prompt text (never on arrival order), so an interrupted and resumed run gets the
same replies as an uninterrupted one. Trigger words make the teacher misbehave on purpose:

textbook (in a topic; the section's title carries it into the exercises prompt):
    QNOPE   the section is a short refusal                                   -> section rejected (refusal), no exercises asked
    QTWIN     every QTWIN section is the same text                             -> all but one section near-duplicate
    every exercises reply ends with the same shared exercise                   -> all but one near-duplicate across sections
    QPIC      the second exercise asks for a picture                           -> blacklist

chat (in the first user turn):
    QNOPE   the assistant refuses on turn 1                                  -> conversation rejected (refusal)
    QLATE     the assistant refuses on turn 2                                  -> kept, cut before turn 2
    QBYE      the simulated user closes after the first answer ([END])         -> kept with one turn, ended closed
    QMOD2     the assistant's turn-2 answer holds FLAGME                       -> with moderation="FLAGME": only a later turn is flagged
"""

from __future__ import annotations

import re
import threading

from fakes.evol_replies import _rng, lang_of, make_instruction, make_text, message_text

_TOPIC = re.compile(r"^(?:主题：|Topic: )(.*)$", re.MULTILINE)
_SECTION = re.compile(r"(?:<<<教材开始>>>|<<<SECTION>>>)\n(.*?)\n(?:<<<教材结束>>>|<<<END OF SECTION>>>)", re.DOTALL)
_COUNT = re.compile(r"(\d+)\s*道|Set (\d+)")
SHARED_EXERCISE = {"zh": "一个长方形的长是8厘米，宽是5厘米，求它的周长和面积，并写出计算过程。",
                   "en": "A rectangle is 8 cm long and 5 cm wide. Find its perimeter and its area, showing each step."}


class TextbookReplies:
    """Answers section prompts (a titled section with worked examples) and exercises prompts (numbered exercises)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen = {"section": 0, "exercises": 0}

    def __call__(self, body: dict, rng) -> str:
        text = "\n".join(message_text(body["messages"]))
        lang = lang_of(message_text(body["messages"])[-1])
        section = _SECTION.search(text)
        with self.lock:
            self.seen["exercises" if section else "section"] += 1
        if section:
            return self.exercises(section.group(1), text, lang)
        return self.section(_TOPIC.search(text).group(1), text, lang)

    @staticmethod
    def section(topic: str, prompt: str, lang: str) -> str:
        if "QNOPE" in topic:
            return "抱歉，我无法完成这个请求。" if lang == "zh" else "Sorry, I cannot help with that."
        rng = _rng("QTWIN" if "QTWIN" in topic else prompt)
        parts = [f"# {topic}", make_text(rng, lang, 200, 300)]
        for k in (1, 2):
            label = f"例题{k}：" if lang == "zh" else f"Worked example {k}: "
            parts.append(label + make_instruction(rng, lang) + ("\n解答：" if lang == "zh" else "\nSolution: ") + make_text(rng, lang, 80, 160))
        return "\n\n".join(parts)

    @staticmethod
    def exercises(section: str, prompt: str, lang: str) -> str:
        rng = _rng(section)
        m = _COUNT.search(prompt)
        count = int(m.group(1) or m.group(2)) if m else 3
        title = section.splitlines()[0]
        labels = ("指令：", "输入：", "输出：", "<无输入>") if lang == "zh" else ("Instruction: ", "Input: ", "Output: ", "<noinput>")
        blocks = []
        for i in range(1, count + 1):
            if i == count:
                instruction = SHARED_EXERCISE[lang]
            elif i == 2 and "QPIC" in title:
                instruction = "请画一幅图来说明这个概念" if lang == "zh" else "Draw a picture that shows this idea."
            else:
                instruction = make_instruction(rng, lang)
            given = make_text(rng, lang, 10, 40) if i == 1 else labels[3]
            blocks.append(f"{i}. {labels[0]}{instruction}\n{labels[1]}{given}\n{labels[2]}{make_text(rng, lang, 60, 160)}")
        return "\n###\n".join(blocks)


class ChatReplies:
    """Answers assistant-turn prompts (an answer that depends on the whole history) and user-turn prompts (a follow-up or [END])."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen = {"user": 0, "assistant": 0}
        self.histories: list[list[dict]] = []  # the messages of every assistant-turn request

    def __call__(self, body: dict, rng) -> str:
        messages = body["messages"]
        user_turn = "[END]" in messages[-1]["content"]
        with self.lock:
            self.seen["user" if user_turn else "assistant"] += 1
            if not user_turn:
                self.histories.append(messages)
        first = next(m["content"] for m in messages if m["role"] == "user")
        lang = lang_of(first)
        if user_turn:
            return self.follow_up(messages[-1]["content"], lang)
        return self.answer(messages, lang)

    @staticmethod
    def answer(messages: list[dict], lang: str) -> str:
        users = [m["content"] for m in messages if m["role"] == "user"]
        turn = len(users)
        if ("QNOPE" in users[0] and turn == 1) or ("QLATE" in users[0] and turn == 2):
            return "抱歉，我无法回答这个问题。" if lang == "zh" else "Sorry, I can't help with that."
        rng = _rng("\n".join(m["content"] for m in messages))
        lead = f"第{turn}轮回答：" if lang == "zh" else f"Answer {turn}: "
        flag = " FLAGME" if "QMOD2" in users[0] and turn == 2 else ""
        return lead + make_text(rng, lang, 60, 200) + flag

    @staticmethod
    def follow_up(prompt: str, lang: str) -> str:
        if "QBYE" in prompt:
            return "[END]"
        rng = _rng(prompt)
        question = make_instruction(rng, lang)
        return ("用户：" + question + "？") if lang == "zh" else ("User: " + question)
