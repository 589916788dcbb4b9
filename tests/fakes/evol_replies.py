"""Teacher behaviour for Evol-Instruct tests: `FakeTeacher(reply=EvolReplies())` answers rewrites, judgements and answers.

The shared fake server knows only generation prompts; its `reply` knob hands every request to
this callable, which recognises the prompts of prompts/evol/*.jinja by their markers. Rewrites,
judgements and answers depend only on the prompt text (never on arrival order), so an interrupted
and resumed run gets the same replies as an uninterrupted one. Generation prompts get numbered
task lists from a per-request rng. Self-contained: it relies on nothing but the `reply` knob.

Trigger words in a task make the teacher misbehave on purpose, one elimination rule each
(the rewrite keeps the task's trigger words, so answer-stage triggers still fire):

    QSAME       the rewrite is the task unchanged                  -> no-gain (identical)
    QNEAR       the rewrite changes one character                  -> no-gain (ROUGE-L >= 0.9)
    QJUDGE      a real rewrite, but the judge calls it equal       -> no-gain (with --judge-equal)
    QLEAK       the rewrite copies the prompt's marker             -> prompt-leak
    QBLACK      the rewrite asks for a picture                     -> blacklist
    QDUP        every QDUP rewrite is the same text                -> near-duplicate (all but one)
    QREFUSE     the answer is a short refusal                      -> refusal-response
    QSTOP       the answer is only punctuation and stop words      -> stopword-response
    QLONGSORRY  the answer apologises but is long                  -> kept (not a refusal)
    QFAIL       the rewrite request loses its connection           -> request-failed (with --retries 0)
    QJFAIL      the judge request loses its connection             -> request-failed (with --judge-equal --retries 0)
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
from typing import Any

TRIGGERS = ("QSAME", "QNEAR", "QJUDGE", "QLEAK", "QBLACK", "QDUP", "QREFUSE", "QSTOP", "QLONGSORRY", "QFAIL", "QJFAIL")
# Triggers that must survive a rewrite because they act on the judge or the answer.
CARRIED = ("QJUDGE", "QJFAIL", "QREFUSE", "QSTOP", "QLONGSORRY")

_GIVEN = re.compile(r"(?:#给定指令#|#(?:The )?Given Prompt#:)\n(?:指令：|Instruction: )(.*)\n(?:输入：|Input: )(.*)\n")
_SECOND = re.compile(r"(?:第二条指令：|The Second Prompt:)\n(.*?)\n\n(?:你的判断|Your judgement)", re.DOTALL)
_COUNT = re.compile(r"(\d+)\s*个|(\d+) (?:new )?tasks")
DUP_TEXT = {"zh": "请比较长城和故宫在建筑风格、历史地位与文化象征上的异同 QDUP", "en": "Compare the Great Wall and the Forbidden City in style, history and symbolism QDUP"}

# Word pools and frames: two made-up tasks rarely share enough to reach ROUGE-L 0.7. No blacklisted words.
ZH_WORDS = """春天 秋天 城市 乡村 学生 老师 医生 工程师 程序 数据 历史 文化 经济 环境 能源 交通 健康 饮食 运动 音乐
电影 小说 诗歌 旅行 节日 家庭 朋友 公司 市场 产品 客户 服务 科技 手机 电脑 网络 安全 隐私 教育 考试 读书 写作
语言 翻译 数学 物理 化学 生物 天文 地理 气候 海洋 森林 河流 山脉 动物 植物 农业 工业 商业 银行 投资 保险 法律
政策 社会 心理 情绪 睡眠 咖啡 茶叶 面包 米饭 火锅 饺子 月饼 长城 故宫 西湖 黄河 长江 熊猫 机器人 算法 函数
变量 数组 排序 概率 统计 面积 速度 成本 利润 预算 会议 邮件 简历 面试 团队 沟通 合作 创新 习惯 目标 效率 压力
高铁 地铁 自行车 志愿者 社区 邻居 宠物 花园 厨房 菜谱 天气 台风 火山 宇宙 星球 月亮 太阳 成语 古诗 对联 书法
京剧 茶道 丝绸 瓷器 剪纸 灯笼 龙舟 端午 中秋 春节 元宵 清明 重阳 红包 故事 童话 博物馆 图书馆 围棋 象棋""".split()
ZH_FRAMES = ("请解释{a}和{b}之间的联系", "比较{a}与{b}的优缺点", "用三句话介绍{a}对{b}的影响", "为{a}写一段关于{b}的宣传语",
             "分析{a}在{b}中的作用", "列举{a}和{b}的五个共同点", "谈谈你对{a}与{b}关系的看法", "总结{a}影响{b}的主要原因",
             "设计一个把{a}和{b}结合起来的活动方案", "给中学生讲讲{a}为什么会改变{b}", "评价{a}对{b}发展的意义", "描述{a}和{b}的历史渊源")
EN_WORDS = """river mountain city village student teacher doctor engineer program data history culture economy energy
traffic health diet sport music movie novel poem travel holiday family friend company market product client service
science phone computer network security privacy education exam reading writing language math physics chemistry biology
astronomy climate ocean forest animal plant farming industry bank investment insurance law policy society emotion sleep
coffee tea bread rice garden kitchen recipe weather storm volcano universe planet moon sun bridge harbour museum library
chess orchestra festival lantern silk porcelain railway bicycle volunteer neighbour budget meeting interview habit goal""".split()
EN_FRAMES = ("Explain the link between {a} and {b}", "Compare the pros and cons of {a} and {b}", "Describe how {a} shapes {b} in three sentences",
             "Write a slogan about {b} for {a}", "Analyse the role of {a} in {b}", "List five things {a} and {b} have in common",
             "Give your view on how {a} relates to {b}", "Summarise why {a} changes {b}", "Plan an activity that combines {a} and {b}",
             "Tell a teenager why {a} matters for {b}", "Assess what {a} means for the future of {b}", "Trace the shared history of {a} and {b}")


def _rng(text: str) -> random.Random:
    return random.Random(hashlib.sha256(text.encode("utf-8")).hexdigest())


def message_text(messages: Any) -> list[str]:
    return [str(m.get("content", "")) for m in messages if isinstance(m, dict)]


def make_instruction(rng: random.Random, lang: str) -> str:
    """One task from a frame and two noun phrases (each two random words)."""
    if lang == "zh":
        a, b = ("".join(rng.sample(ZH_WORDS, 2)) for _ in range(2))
        return rng.choice(ZH_FRAMES).format(a=a, b=b)
    a, b = (" ".join(rng.sample(EN_WORDS, 2)) for _ in range(2))
    return rng.choice(EN_FRAMES).format(a=a, b=b) + "."


def make_text(rng: random.Random, lang: str, lo: int, hi: int) -> str:
    """Filler text of lo..hi characters: an answer or an input."""
    target = rng.randint(lo, hi)
    if lang == "zh":
        out = ""
        while len(out) < target:
            out += rng.choice(ZH_WORDS) + rng.choice(("和", "让", "影响", "需要", "依靠")) + rng.choice(ZH_WORDS) + rng.choice(("，", "；", "。"))
        return out[: max(lo, target) - 1].rstrip("，；。") + "。"
    words = []
    while len(" ".join(words)) < target:
        words.append(rng.choice(EN_WORDS) if rng.random() < 0.6 else rng.choice(("shapes", "needs", "improves", "with", "for")))
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def make_item(rng: random.Random, lang: str) -> tuple[str, str, str]:
    return make_instruction(rng, lang), make_text(rng, lang, 10, 40) if rng.random() < 1 / 3 else "", make_text(rng, lang, 20, 120)


def task_list(messages: list[dict], rng: random.Random) -> str:
    """A generation reply: the asked-for number of numbered tasks."""
    user = message_text(messages)[-1]
    lang = "zh" if len(re.findall(r"[\u4e00-\u9fff]", user)) > len(re.findall(r"[A-Za-z]", user)) else "en"
    m = _COUNT.search(user)
    count = int(m.group(1) or m.group(2)) if m else 10
    blocks = []
    for i in range(1, count + 1):
        ins, inp, out = make_item(rng, lang)
        if lang == "zh":
            blocks.append(f"{i}. 指令：{ins}\n输入：{inp or '<无输入>'}\n输出：{out}")
        else:
            blocks.append(f"{i}. Instruction: {ins}\nInput: {inp or '<noinput>'}\nOutput: {out}")
    return "\n###\n".join(blocks)


def lang_of(text: str) -> str:
    return "zh" if len(re.findall(r"[\u4e00-\u9fff]", text)) > len(re.findall(r"[A-Za-z]", text)) else "en"


def kind_of(messages: list[dict]) -> str:
    """generate, evolve, judge or respond, from the prompt's markers."""
    text = "\n".join(message_text(messages))
    if "#给定指令#" in text or "Given Prompt#" in text:
        return "evolve"
    if "第二条指令" in text or "The Second Prompt" in text:
        return "judge"
    if "乐于助人" in text or "helpful AI assistant" in text:
        return "respond"
    return "generate"


class EvolReplies:
    """A reply callable for FakeTeacher; `seen` counts prompts by kind, `ops_seen` rewrite prompts by template wording."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[str, int] = {}
        self.prompts: list[tuple[str, str]] = []

    def __call__(self, req: dict, rng: random.Random) -> str:
        messages = req["messages"]
        kind = kind_of(messages)
        text = "\n".join(message_text(messages))
        with self.lock:
            self.seen[kind] = self.seen.get(kind, 0) + 1
            self.prompts.append((kind, text))
        lang = lang_of(message_text(messages)[-1])
        if kind == "evolve":
            return self.rewrite(text, lang)
        if kind == "judge":
            second = _SECOND.search(text)
            if second is not None and "QJFAIL" in second.group(1):
                raise ConnectionResetError("QJFAIL")  # the server closes the connection without a reply
            equal = second is not None and "QJUDGE" in second.group(1)
            return ("相同" if equal else "不同") if lang == "zh" else ("Equal" if equal else "Not Equal")
        if kind == "respond":
            user = message_text([m for m in messages if m.get("role") == "user"])[0]
            return self.answer(user, lang)
        return task_list(messages, rng)

    @staticmethod
    def rewrite(prompt: str, lang: str) -> str:
        m = _GIVEN.search(prompt)
        if m is None:
            return "好的。" if lang == "zh" else "OK."
        given, given_input = m.group(1), m.group(2)
        given_input = "" if given_input in ("<无输入>", "<noinput>") else given_input
        rng = _rng(prompt)
        ins_label, inp_label, none = ("指令：", "输入：", "<无输入>") if lang == "zh" else ("Instruction: ", "Input: ", "<noinput>")

        def reply(instruction: str, input_text: str) -> str:
            lead = "好的，下面是改写结果。\n" if lang == "zh" else "Sure, here it is.\n"
            return f"{lead}{ins_label}{instruction}\n{inp_label}{input_text or none}"

        if "QFAIL" in given:
            raise ConnectionResetError("QFAIL")  # the server closes the connection without a reply
        if "QSAME" in given:
            return reply(given, given_input)
        if "QNEAR" in given:
            i = len(given) // 2
            while not given[i].isalpha() or given[i] in "QNEAR":
                i += 1
            return reply(given[:i] + ("某" if lang == "zh" else "x") + given[i + 1:], given_input)
        if "QDUP" in given:
            return reply(DUP_TEXT[lang], "")
        if "#新指令#" in prompt or "#Created Prompt#" in prompt:  # mutate: a new task in the same domain
            carried = " ".join(t for t in (*CARRIED, "QLEAK", "QBLACK") if t in given)
            base, extra = f"{make_instruction(rng, lang)} {carried}".strip(), ""
            given_input = make_text(rng, lang, 10, 40) if rng.random() < 0.3 else ""
        else:
            # Long enough that even a long task moves well below ROUGE-L 0.9 from its parent.
            base, size = given, max(14, len(given) // 3 if lang == "zh" else len(given.split()) // 3)
            if lang == "zh":
                pieces = [make_instruction(rng, "zh")[:12] for _ in range(1 + size // 12)]
                extra = rng.choice(("，并结合", "，要求联系", "，请从", "，同时比较")) + "、".join(pieces)[:size] + "展开说明"
            else:
                words = " ".join(make_instruction(rng, "en").rstrip(".?").lower() for _ in range(1 + size // 6)).split()[:size]
                extra = ", " + rng.choice(("considering", "with attention to", "comparing it with")) + " " + " ".join(words)
        if "QLEAK" in given:
            marker = "#改写后的指令#：" if lang == "zh" else "#Rewritten Prompt#: "
            return reply(marker + base + extra, given_input)
        if "QBLACK" in given:
            extra += "，并配一张图片" if lang == "zh" else ", and draw a picture of it"
        new_input = given_input
        if "更复杂的输入" in prompt or "more complex input" in prompt:
            new_input = (given_input + "\n" if given_input else "") + ("数据表：" if lang == "zh" else "Data table: ") + make_text(rng, lang, 20, 60)
        return reply(base + extra, new_input)

    @staticmethod
    def answer(user: str, lang: str) -> str:
        rng = _rng(user)
        if "QREFUSE" in user:
            return "抱歉，我无法回答这个问题。" if lang == "zh" else "Sorry, I can't help with that."
        if "QSTOP" in user:
            return "嗯……的，了。是吧？" if lang == "zh" else "Well, the... and it is, so."
        if "QLONGSORRY" in user:
            if lang == "zh":
                return "抱歉让你久等了。" + make_text(rng, "zh", 200, 260)
            return "Sorry for the wait. " + " ".join(make_text(rng, "en", 40, 80) for _ in range(12))
        return make_text(rng, lang, 60, 200)


def task_rows(n: int, lang: str, seed: int = 0, triggers: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """n Alpaca records with distinct instructions; `triggers` maps a trigger word to how many records carry it."""
    rng = random.Random(f"tasks:{lang}:{seed}")
    rows = []
    marks: list[str] = []
    for word, k in (triggers or {}).items():
        marks += [word] * k
    marks += [""] * (n - len(marks))
    rng.shuffle(marks)  # spread out, as real data would be (a block of failures trips the yield check)
    seen: set[str] = set()
    for i, mark in enumerate(marks[:n]):
        while True:
            ins, inp, out = make_item(rng, lang)
            tail = "".join(rng.sample(ZH_WORDS, 2)) if lang == "zh" else " ".join(rng.sample(EN_WORDS, 3))
            ins = f"{ins}{'，结合' if lang == 'zh' else ', with '}{tail}"
            if ins not in seen:
                seen.add(ins)
                break
        if mark:
            ins = f"{ins} {mark}"
        rows.append({"instruction": ins, "input": inp, "output": out})
    return rows
