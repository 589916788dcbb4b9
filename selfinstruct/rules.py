"""Built-in rule filters; each rule is named by the rejection reason it writes."""

from __future__ import annotations

import difflib
import functools
import re

import numpy as np
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from selfinstruct.similarity import _CJK as _CJK_CLASS, _HAN as _HAN_CLASS, HAN_RE

# ---- what a text is written in ------------------------------------------------------------------
# Only words vote for a script: code, URLs, e-mail addresses, TeX maths, identifiers, single
# letters (variables, units, options A-D) and digits say nothing about the language of a task.
_NO_VOTE_RE = re.compile(
    r"```.*?(?:```|\Z)|`[^`\n]*`"
    r"|(?:https?|ftp)\s*[:：]\s*//\S+|www\.\S+"
    r"|[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
    r"|\$[^$\n]+\$"
    r"|\b[A-Za-z_][A-Za-z0-9_]*(?:[_.][A-Za-z0-9_]+)+|\b[a-z]+[A-Z][A-Za-z0-9_]*",
    re.S,
)
_LETTERS_RE = re.compile(r"[A-Za-z\u00c0-\u024f]{2,}")
_KANA_RE = re.compile("[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_HANGUL_RE = re.compile("[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]")
# One Han character carries about what three Latin letters do (an English word is 2 Han
# characters in translation and 5 letters long): the weight that makes a bilingual line a tie.
LETTERS_PER_HAN = 3
# Text in quotes is what the task works on (检查单词“accoustic”的拼写), not the task's language.
_QUOTED_RE = re.compile(r"“[^”]*”|\"[^\"]*\"|「[^」]*」|『[^』]*』|《[^》]*》")


def script_counts(text: str) -> tuple[int, int, int, int]:
    """Han characters, kana, hangul and Latin letters (in words of two or more) that vote for a script."""
    text = _NO_VOTE_RE.sub(" ", text)
    han = len(HAN_RE.findall(text))
    kana = len(_KANA_RE.findall(text))
    hangul = len(_HANGUL_RE.findall(text))
    letters = sum(len(w) for w in _LETTERS_RE.findall(text))
    return han, kana, hangul, letters


@functools.lru_cache(maxsize=4096)
def script_of(text: str) -> str:
    """The main script of a text: zh, ja, ko, latin or none; Han against Latin letters, code and digits aside."""
    # The cache serves the rules that ask about the same instruction in a row.
    han, kana, hangul, letters = script_counts(text)
    cjk = han + kana + hangul
    if not cjk and not letters:
        return "none"
    if letters > cjk * LETTERS_PER_HAN:
        return "latin"
    if kana * 10 >= cjk:
        return "ja"
    if hangul > han:
        return "ko"
    return "zh"


def task_script(text: str) -> str:
    """The script of a task's own words: quoted material set aside when anything is left."""
    bare = _QUOTED_RE.sub(" ", text)
    got = script_of(bare)
    return got if got != "none" else script_of(text)


def expected_script(lang: str) -> str:
    """The script a run in `lang` should produce."""
    base = lang.split("-")[0].lower()
    return {"zh": "zh", "ja": "ja", "ko": "ko"}.get(base, "latin")


def han_variant(lang: str) -> str | None:
    """hans or hant for a Chinese run (zh, zh-CN, zh-Hans; zh-Hant, zh-TW, zh-HK), None otherwise."""
    parts = lang.replace("_", "-").lower().split("-")
    if parts[0] != "zh":
        return None
    return "hant" if any(p in ("hant", "tw", "hk", "mo") for p in parts[1:]) else "hans"


_UNIT_RE = re.compile(f"[{_CJK_CLASS}]|[A-Za-z\u00c0-\u024f]+|[0-9]+(?:[.,][0-9]+)*")


def measure(text: str) -> tuple[int, str]:
    """Length in the unit that fits the script: characters for CJK text, words otherwise."""
    if script_of(text) in ("zh", "ja", "ko"):
        return len(re.sub(r"\s+", "", text)), "chars"
    return len(text.split()), "words"


def units(text: str) -> int:
    """Content units: one per CJK character, Latin word or number; punctuation and symbols count nothing."""
    return len(_UNIT_RE.findall(text))


@functools.lru_cache(maxsize=1)
def _variant_tables() -> tuple[dict[int, None], dict[int, None]]:
    """(Traditional-only, Simplified-only) characters from OpenCC's one-character tables, as delete tables."""
    # A character belongs to one script only if converting changes it and the other script's
    # tables never write it: 后 (後, and itself), 台 (臺, and itself) serve both, and 真 or 教 only
    # receive old variants (眞→真, 敎→教), which Traditional text writes as 真 and 教 too.
    import opencc

    folder = Path(opencc.__file__).parent / "dictionary"

    def table(name: str) -> dict[str, list[str]]:
        rows = (line.partition("\t") for line in (folder / name).read_text(encoding="utf-8").splitlines())
        return {key: values.split() for key, _, values in rows if len(key) == 1}

    s2t, t2s = table("STCharacters.txt"), table("TSCharacters.txt")
    simp_written = {v for vs in t2s.values() for v in vs} | {k for k, vs in s2t.items() if k in vs}
    trad_written = {v for vs in s2t.values() for v in vs} | {k for k, vs in t2s.items() if k in vs}
    trad_only = {k for k, vs in t2s.items() if k not in vs} - simp_written
    simp_only = {k for k, vs in s2t.items() if k not in vs} - trad_written
    # str.translate deletes in C: counting by length difference beats a 4,000-character regex class.
    return dict.fromkeys(map(ord, trad_only)), dict.fromkeys(map(ord, simp_only))


def variant_counts(text: str) -> tuple[int, int]:
    """Characters only Traditional Chinese writes, and characters only Simplified writes."""
    trad, simp = _variant_tables()
    return len(text) - len(text.translate(trad)), len(text) - len(text.translate(simp))


def _other_variant(text: str, variant: str) -> tuple[int, int]:
    """(other script's characters, own script's characters); the second only counted when the first is not 0."""
    trad, simp = _variant_tables()
    other, own = (trad, simp) if variant == "hans" else (simp, trad)
    n = len(text) - len(text.translate(other))
    return (n, len(text) - len(text.translate(own))) if n else (0, 0)


# ---- phrases the rules look for ------------------------------------------------------------------

# Tasks a text-only model cannot do: the task asks to produce a medium (画一张图, 拍一段视频), or
# to perceive one that the record does not carry in words (描述这张照片 with no description given).
# A medium that is only the topic (影片评论, 短视频平台, 文件系统, 在线照片编辑器) is fine.
BLACKLIST_PRODUCE_ZH = (
    r"(?<![动漫壁油国字书版图刻插绘计策规谋])(?:画|畫)(?:一|出|个|張|张|幅|下|成|条|只|些|两|三)",
    r"(?:绘制|繪製|描绘出)[^，。；？！\n]{0,8}?图",
    r"拍一|拍张|(?<!记)录制一|(?<!记)录一段|剪辑一|上传(?!的)|上傳(?!的)|截屏",
    r"(?:生成|创建|创作|制作|设计|做|输出|渲染|配上|配一|附上|附一)(?:一|个|张|幅|段|份)*[^，。；？！\n]{0,10}?"
    r"(?<![体意])(?:图片|图像|照片|视频|动画|音频|录音|插图|插画|漫画|图稿|图纸|图标|动图|表情包|壁纸|三维模型|3D模型)",
)
BLACKLIST_PERCEIVE_ZH = (
    r"(?<![》”\"」])(?:这|這|该|該|此|下面|下列|以下|上面|所给|所提供|给定|附|附加|附带|随附|上传|上傳)的?(?:一|两|几)?(?:张|張|幅|段|个|個|份|部)?"
    r"(?:图片|图像|照片|相片|视频|影片|录像|音频|录音|截图|图表|示意图|流程图|插图|地图|附件|画作|绘画|画|漫画|草图|图|文件)(?![案形书标像例解纸层集册家作风夹名系格])",
    r"下图|上图|(?<![程表意拼地构])图中|图片中|图像中|照片中|视频中|录音中|音频中|附图",
)
BLACKLIST_PRODUCE_EN = (
    # As an imperative only: "two coats of paint" and "a film review" make nothing.
    r"(?:^|[.!?:]\s+|\b(?:please|and|then|to|also)\s+)(?:draw|paint|sketch|photograph|film|sing|upload)\b"
    r"(?! (?:a )?(?:conclusion|parallel|comparison|inspiration|attention|on|from|upon))",
    r"\b(?:create|generate|make|design|produce|render)\s+(?:a|an|the)?\s*(?:\w+\s+)?(?:image|picture|photo|video|drawing|illustration|animation)\b",
)
BLACKLIST_PERCEIVE_EN = (
    r"\b(?:this|the|these|following|attached|given|above|below|provided|uploaded|linked)\s+(?:\w+\s+)?"
    r"(?:image|images|picture|pictures|photo|photos|photograph|video|videos|audio|recording|file|files|attachment|chart|diagram|map|screenshot|painting|graph|song)\b",
)
_PRODUCE_RE = re.compile("|".join(BLACKLIST_PRODUCE_ZH + BLACKLIST_PRODUCE_EN), re.IGNORECASE)
_PERCEIVE_RE = re.compile("|".join(BLACKLIST_PERCEIVE_ZH + BLACKLIST_PERCEIVE_EN), re.IGNORECASE)
# An input that stands for a medium instead of describing it: <image>, [图片], a bare link.
_MEDIUM_STAND_IN_RE = re.compile(r"^\W*(?:[<\[【(（][^\]>】)）]{0,40}[>\]】)）]|(?:https?://|www\.)\S+)\W*$", re.IGNORECASE)
# Fewer content units than this and the input does not describe the medium in words.
DESCRIBED_MEDIUM_UNITS = 8

# A refusal is an answer that opens by declining, and is short: a refusal inside a dialogue, a
# quoted line or an apology the task asked for (道歉信, 客服回复) is content.
REFUSALS = (
    "as an ai language model", "as an ai assistant", "as a language model", "as an ai,", "i'm an ai",
    "i am an ai", "i'm sorry, but i can", "i am sorry, but i can", "sorry, i can't", "sorry, i cannot",
    "i cannot fulfill", "i can't assist", "i cannot assist", "i'm unable to help", "i'm sorry, but this task",
    "sorry, this task", "unfortunately, i cannot", "unfortunately, i can't", "i am unable to", "i'm unable to",
    "作为一个ai", "作为ai", "作为一名ai", "作为人工智能", "作为一个人工智能", "作为一个语言模型", "作为语言模型",
    "我是一个ai", "我是一个人工智能", "作為一個ai", "作為ai", "作為一個人工智慧", "作為人工智慧",
    "抱歉,我无法", "抱歉,我不能", "对不起,我无法", "对不起,我不能", "很抱歉,我无法", "很抱歉,我不能",
    "抱歉,我無法", "對不起,我無法", "對不起,我不能", "很抱歉,我無法",
    "抱歉,此任务", "抱歉,该任务", "抱歉,这个任务", "抱歉,这无法", "抱歉,这项任务", "抱歉,此任務", "抱歉,該任務",
    "我无法回答", "我無法回答", "我无法生成", "我无法创建", "我无法提供", "我无法访问", "我无法执行", "我无法完成",
    "我无法设置", "我无法在", "我無法生成", "我無法提供",
)
REFUSAL_WINDOW = 2  # a refusal opens the answer (after a quote or a bracket at most)
REFUSAL_MAX_CHARS = 200  # ... and the answer is short: longer answers that open so go on to answer

# Whole answers that stand for no answer.
_PLACEHOLDER_RE = re.compile(
    r"^\W*(?:<\s*no\s*output\s*>|<\s*无输出\s*>|无输出|沒有輸出|不适用|不適用|n/a|"
    r"<\s*nooutput\s*>|[(（]无[)）]|[(（]空[)）]|此任务不需要输出|不需要输出|预期无输出.*|无需输出.*|"
    r"[\[<【(（](?:在此|此处|在此处)?(?:插入|输入)[^\]>】)）]*[\]>】)）]|[\[【<](?!!--)[^\]】>\n]{0,60}(?:图|照片|视频|可视化|绘|画|设计|标志|徽标|词云|演示|音频|音乐|模拟|模型|表格|工作表|文件)[^\]】>\n]{0,60}[\]】>])\W*$",
    re.IGNORECASE | re.S,
)
# Image links and tags stand in for a picture the model cannot make; in a web-page task an
# <img> tag is part of the code asked for.
_IMAGE_RE = re.compile(r"!\[[^\]\n]*\]\s*[(（]|<\s*(?:图片|圖片|图像|附件)[^>]*>", re.IGNORECASE)
_IMAGE_FILE_RE = re.compile(r"<\s*img\b|\.(?:png|jpe?g|gif|svg|bmp)\b", re.IGNORECASE)
_WEB_TASK_RE = re.compile(r"HTML|CSS|网页|网站|代码|程序|标签|markdown|\bhtml\b|\bweb", re.IGNORECASE)
_URL_RE = re.compile(r"(?:https?|ftp)\s*[:：]\s*//[^\s，。）)\]]+|\bwww\.[\w-]+(?:\.[\w-]+)+\S*", re.IGNORECASE)
# Tasks about URLs themselves (build, parse, validate one) need nothing fetched.
_URL_AS_SUBJECT_RE = re.compile(
    r"URL|网址|域名|链接|HTTP|API|请求|正则|电子邮件|邮件地址|HTML|代码|脚本|函数|程序|解析|缩短|提取|有效|格式|验证|"
    r"\burl\b|\bhttp\b|\bapi\b|\bregex|\bparse|\bshorten|\bextract|\bvalid|\bformat\b|\bcode\b",
    re.IGNORECASE,
)
_FETCH_VERB_RE = re.compile(
    r"总结|概括|摘要|概述|要点|阅读|打开|访问|浏览|查看|评估|评价|评论|分析|描述|确定|找到|找出|标题|分类|主题|情感|偏见|观点|"
    r"文章|网站|网页|页面|视频|预告片|帖子|博客|新闻|报道|推文|论文|歌曲|艺术品|这幅画|图片|"
    r"\bsummar|\bread\b|\bvisit|\bopen\b|\barticle|\bwebsite|\bpage\b|\bvideo|\bpost\b|\bblog",
    re.IGNORECASE,
)
_SEARCH_VERB_RE = re.compile(r"查找|搜索|找到|寻找|检索|搜寻|\bfind\b|\bsearch\b|\blook up\b", re.IGNORECASE)

# Code: a line that reads as code (ASCII keywords, statements ending in ; or braces) ...
_CODE_LINE_RE = re.compile(
    r"^\s*(?:def |class |return\b|import |from \S+ import|for\s*[(（]|for \w+ in |while\s*[(（]|if\s*[(（]|elif |else\s*[:{]|"
    r"function\b|var |let |const |int |float |double |void |public |private |static |#include|SELECT\b|CREATE TABLE|INSERT INTO)"
    r"|[;{}]\s*$|^\s*[{}]",
    re.IGNORECASE,
)
# ... and code whose keywords or identifiers were translated into Chinese (string literals and
# comments aside): 如果 (x > 0)、定义 函数（自我）、整数 总计 = 0;、int 最大数字 = 0;
_CODE_STRINGS_RE = re.compile(r"\"[^\"\n]*\"|'[^'\n]*'|“[^”\n]*”|‘[^’\n]*’|「[^」\n]*」|#.*$|//.*$|/\*.*?\*/", re.M)
_ZH_KEYWORD_RE = re.compile(
    r"^\s*(?:如果|否则如果|否则|其他|返回|定义|对于|导入|打印|函数|类|整数|浮点数?|字符串|布尔|设|变量|常量|公共|私有|静态|当|尝试|除了|最后|而|打破|继续|无功|从)"
    r"(?:\s*[（(]|\s+[A-Za-z_]|[A-Za-z_]|\s*[\u4e00-\u9fff]+\s*(?:=|[（(]))",
)
_STATEMENT_RE = re.compile(r"[;{}]\s*$|[^=!<>]=[^=]")
_HAN_IDENT_RE = re.compile(
    f"\\b(?:def|class|int|float|double|var|let|const|void|string|String|bool|function|return|new)\\s+[{_HAN_CLASS}]"
    f"|[{_HAN_CLASS}][\\w{_HAN_CLASS}]*\\s*(?:[+\\-*/]?=|==)[^;\\n]*;\\s*$"
    f"|[A-Za-z_]\\w*\\.[{_HAN_CLASS}]",
    re.M,
)
CODE_LINES_MIN = 2  # lines that read as code before a text is judged as code
# More lines of code in an answer, case kept (a line of prose may open with "If" and end with ":"):
# a Python block header, a call on a line of its own (print("It is hot.")), an assignment.
_CODE_ANSWER_LINE_RE = re.compile(
    r"^\s*(?:if|elif|else|for|while|with|try|except|finally|def|class)\b[^\n]*:\s*$"
    r"|^\s*[A-Za-z_][\w.]*\([^\n]*\)\s*;?\s*$"
    r"|^\s*[A-Za-z_][\w.]*(?:\[[^\]\n]*\])?\s*[-+*/%]?=(?!=)\s*\S"
)
_LOWER_WORD_RE = re.compile(r"(?<![A-Za-z\u00c0-\u024f'])[a-z][a-z\u00df-\u00ff]+")


def prose_letters(text: str) -> int:
    """Letters in lower-case Latin words (code, URLs and identifiers aside): prose, not names or titles."""
    return sum(len(w) for w in _LOWER_WORD_RE.findall(_NO_VOTE_RE.sub(" ", text)))

# Tasks that ask for an answer in another language, about code, or about Latin-script material:
# their answers may be Latin without being in the wrong language.
_OTHER_LANGUAGE_RE = re.compile(
    r"翻译|翻譯|译成|译为|譯成|英文|英语|英語|法语|德语|西班牙语|意大利语|日语|韩语|俄语|葡萄牙语|拉丁|语言|语种|"
    r"代码|程序|函数|脚本|算法|编程|正则|查询|命令|SQL|HTML|CSS|JSON|XML|Python|Java|C\+\+|JavaScript|"
    r"单词|拼写|字母|缩写|首字母|词性|押韵|音标|发音|同义词|反义词|复数|时态|语法|动词|名词|形容词|副词|句子|短语|成语|"
    r"标签|主题标签|用户名|密码|网址|URL|域名|电子邮件|邮箱|表达式|公式|方程|化学式|符号|单位|缩略|型号|代号|名称|名字|标题|"
    r"translate|render|english|chinese|mandarin|cantonese|japanese|korean|french|german|spanish|italian|russian|portuguese|arabic|"
    r"simplified|traditional|language|code|spell|word|letter|acronym|abbrev",
    re.IGNORECASE,
)

FUNCTION_WORDS = frozenset("the and of to is are was in that for with this it be on as by an which you can".split())
_ASCII_WORD_RE = re.compile(r"[A-Za-z]+")


def function_words(text: str, limit: int = 4000) -> int:
    """How many English function words (the, and, of...) the first `limit` characters hold."""
    return sum(1 for w in _ASCII_WORD_RE.findall(text, 0, limit) if w.lower() in FUNCTION_WORDS)


FUNCTION_WORDS_MIN = 4

# Long-form asks: an answer of a few words cannot be one.
_LONG_FORM_RE = re.compile(
    r"(?<![重改编抄描填])(?:写|撰写|创作|起草|讲)(?:一篇|一封|一首|一个|一段|一份|一则|篇|封|首)[^，。？！\n]{0,10}?"
    r"(?:文章|故事|论文|博客|博文|短文|散文|作文|演讲稿|演讲|剧本|新闻稿|报告|信(?![息用号])|诗(?![人句])|歌词|歌曲|电子邮件|邮件|对话|评论|简介)"
    # The form must head what is asked: 写一个主人公在故事中必须回答的问题 asks for a question, and
    # 写一篇文章的摘要 for a summary (an example of one, 的例子, is still one).
    r"(?!标题|主题|题目|名|地址|中|里|内|之|的(?!例子|示例|范例|样本|样例))"
)
# 选择一个主题来写一篇文章 asks for the topic: the writing is what it is for. But 用“太阳”来创作一首诗 and
# 通过随机选择三个单词来创作一首诗 name the means of the writing, which is still asked for.
_PURPOSE_RE = re.compile(r"(?:来|以便?|用来|用于|去|好)\s*$")
_MEANS_RE = re.compile(r"^\s*(?:请|你能|能否|可以)?\s*(?:用|使用|利用|运用|根据|依据|按照|结合|通过|基于|围绕|参考|模仿|仿照|借助|以)")
# A task that sets the length itself (五字诗, 一句话的故事, 不超过20个字) may ask for a short answer.
_SET_LENGTH_RE = re.compile(r"[0-9一二三四五六七八九十两几]+\s*(?:个)?(?:字|单词|词|句|行)|一句话|短|简短|标题|主题行")
LONG_FORM_MIN_UNITS = 12

# ---- personal data ---------------------------------------------------------------------------------

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def resident_id_ok(number: str) -> bool:
    """A mainland resident ID number (18 characters) with a real date and the right check character."""
    if not re.fullmatch(r"[1-9]\d{16}[\dXx]", number):
        return False
    year, month, day = int(number[6:10]), int(number[10:12]), int(number[12:14])
    if not (1900 <= year <= 2100 and 1 <= month <= 12 and 1 <= day <= 31):
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return "10X98765432"[total % 11] == number[17].upper()


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum bank cards carry."""
    total = 0
    for k, ch in enumerate(reversed(digits)):
        d = int(ch)
        if k % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_PII_PATTERNS = (
    ("email", re.compile(r"(?<![\w.+-])[A-Za-z0-9][\w.+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")),
    ("resident-id", re.compile(r"(?<![\dA-Za-z])[1-9]\d{16}[\dXx](?![\dA-Za-z])")),
    ("bank-card", re.compile(r"(?<![\d.-])[1-9]\d{3}(?:[ -]?\d{4}){2}[ -]?\d{4}(?:\d{0,3})(?![\d-])")),
    ("phone", re.compile(
        r"(?<![\d+-])(?:\+?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?![\d-])"  # mainland mobile
        r"|(?<![\d+-])(?:\+?886[ -]?|0)9\d{2}[ -]?\d{3}[ -]?\d{3}(?![\d-])"  # Taiwan mobile
        r"|(?<![\d+-])(?:\+?886[ -]?|[(（]?0)[2-8][)）]?[ -]\d{3,4}[ -]?\d{4}(?![\d-])"  # Taiwan landline
        r"|(?<![\d+-])[(（]?0\d{2,3}[)）]?[ -]\d{7,8}(?![\d-])"  # mainland landline
        r"|(?<![\d+-])(?:\+?1[ -.]?)?[(（]?[2-9]\d{2}[)）]?[ -.]\d{3}[ -.]\d{4}(?![\d-])"  # North American
    )),
    ("ip-address", re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.]|\.\d)")),
)
# Every kind has an @ or seven digits in a row (separators aside) or a dotted number: most texts have none.
_PII_HINT_RE = re.compile(r"@|\d(?:[ ().（）-]?\d){6}|\d\.\d+\.\d")
_PII_CHECKS = {"resident-id": resident_id_ok, "bank-card": lambda m: luhn_ok(re.sub(r"\D", "", m))}
# Documentation addresses name no one.
_EXAMPLE_EMAIL_RE = re.compile(r"@(?:[\w-]+\.)*(?:example|test|domain|yourdomain|company)\.(?:com|org|net)$|@example\.", re.IGNORECASE)
PII_LABELS = {"email": "[EMAIL]", "resident-id": "[ID]", "bank-card": "[CARD]", "phone": "[PHONE]", "ip-address": "[IP]"}


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """Personal data in `text`: (kind, start, end) of each e-mail, phone, resident ID, bank card or IP address."""
    found: list[tuple[str, int, int]] = []
    if not _PII_HINT_RE.search(text):
        return found
    taken: list[tuple[int, int]] = []
    for kind, pattern in _PII_PATTERNS:
        for m in pattern.finditer(text):
            value = m.group(0)
            if kind == "email" and _EXAMPLE_EMAIL_RE.search(value):
                continue
            check = _PII_CHECKS.get(kind)
            if check is not None and not check(value):
                continue
            if any(m.start() < end and start < m.end() for start, end in taken):
                continue  # an ID number is not also a phone number
            found.append((kind, m.start(), m.end()))
            taken.append((m.start(), m.end()))
    return sorted(found, key=lambda f: f[1])


def redact_frame(df, columns: tuple[str, ...] = ("instruction", "input", "output")):
    """The table with personal data redacted in `columns`, and how many records had any."""
    import polars as pl

    present = [c for c in columns if c in df.columns and df[c].dtype == pl.String]
    if not present or not df.height:
        return df, 0
    touched = np.zeros(df.height, dtype=bool)
    new = {}
    for c in present:
        values = df[c].to_list()
        out = []
        for k, v in enumerate(values):
            if v:
                v, n = redact_pii(v)
                touched[k] |= n > 0
            out.append(v)
        new[c] = pl.Series(c, out, dtype=pl.String)
    return df.with_columns(**new), int(touched.sum())


def redact_pii(text: str) -> tuple[str, int]:
    """`text` with each piece of personal data replaced by its label ([EMAIL], [PHONE], ...), and how many."""
    found = find_pii(text)
    for kind, start, end in reversed(found):
        text = text[:start] + PII_LABELS[kind] + text[end:]
    return text, len(found)


REASONS = (
    "empty",
    "too-short",
    "too-long",
    "starts-with-punctuation",
    "wrong-language",
    "wrong-script",
    "blacklist",
    "needs-url",
    "refusal",
    "placeholder",
    "output-equals-input",
    "output-language",
    "output-too-short",
    "code-translated",
    "pii",
)
# What generate and evolve check by default: a teacher's personal data is invented (the task
# is often to extract or validate it), so pii is filter's, for data gathered from the world.
GENERATE_REASONS = tuple(r for r in REASONS if r != "pii")
# Reasons written by other stages, accepted by --rules / --no-rule where they apply.
OTHER_REASONS = ("unparseable", "truncated", "near-duplicate", "surplus")


@dataclass(frozen=True)
class RuleSettings:
    """What the rules need to know: target language, length limits, which rules run."""

    lang: str = "zh"
    min_chars: int = 3
    max_chars: int = 300
    min_words: int = 3
    max_words: int = 150
    enabled: frozenset[str] = frozenset(GENERATE_REASONS)


def fold(text: str) -> str:
    """Substring-matching form: NFKC (full-width to half-width), lower-case, no whitespace."""
    # Only for finding phrases (refusals, leaked prompt words) however they are spaced; for
    # deciding two texts are the same use same_text_key, since "the rapist" folds to "therapist".
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text).lower())


_REFUSALS = tuple(fold(p) for p in REFUSALS)
# Whitespace beside a Han or kana character: Chinese and Japanese do not separate words with
# spaces, so typesetting adds or drops them at will. Not hangul: Korean spacing splits words.
_UNSPACED = f"[{_HAN_CLASS}{_KANA_RE.pattern[1:-1]}]"
_UNSPACED_SPACE_RE = re.compile(f"(?<={_UNSPACED})\\s+|\\s+(?={_UNSPACED})")
_SPACES_RE = re.compile(r"\s+")


def same_text_key(text: str) -> str:
    """Equality form: NFKC, casefold, whitespace runs collapsed to one space, none beside Han/kana."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACES_RE.sub(" ", _UNSPACED_SPACE_RE.sub("", text)).strip()


def _empty(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    if not ins.strip():
        return "instruction is empty"
    if not out.strip():
        return "output is empty"
    return None


def _too_short(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    # The input carries the task's material: 翻译 + a sentence is a whole task.
    if script_of(ins) in ("zh", "ja", "ko"):
        n = units(ins) + units(inp)
        return f"instruction and input have {n} words and characters, under {s.min_chars}" if n < s.min_chars else None
    n = len(ins.split()) + len(inp.split())
    return f"instruction and input have {n} words, under {s.min_words}" if n < s.min_words else None


def _too_long(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    n, unit = measure(ins)
    high = s.max_chars if unit == "chars" else s.max_words
    return f"instruction has {n} {unit}, over {high}" if n > high else None


def _starts_with_punctuation(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    text = ins.strip()
    first = text[:1]
    # Opening brackets and quotes start real instructions (“静夜思”的作者是谁？), and so does a
    # sign or a decimal point before a number (-625是什么类型的数字？).
    if first and unicodedata.category(first) in ("Po", "Pd", "Pe", "Pf", "Pc"):
        if first in "-+.−" and text[1:2].isdigit():
            return None
        if first in "#@*&%/\\¿¡'\"":
            return None
        return f"instruction starts with {first!r}"
    return None


_TRANSLATE_ZH_RE = re.compile(r"翻译|翻譯|译成|译为|譯成|譯為|译文|中文|英文|英语")
_TRANSLATE_EN_RE = re.compile(r"\btranslat|\binto (?:chinese|english|japanese|korean)\b", re.IGNORECASE)


def _wrong_language(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    want, got = expected_script(s.lang), task_script(ins)
    if got in ("none", want):
        return None
    # A translation task quotes its source text in the instruction: its own words decide.
    if want != "latin" and _TRANSLATE_ZH_RE.search(ins) and len(HAN_RE.findall(ins)) >= 2:
        return None
    if want == "latin" and _TRANSLATE_EN_RE.search(ins):
        return None
    # Chinese tasks name products in Latin letters (比较Google Home和Amazon Echo): only a
    # sentence in another language, with its function words, is written in the wrong one.
    if got == "latin" and HAN_RE.search(ins) and function_words(ins) < 2:
        return None
    return f"instruction is mainly {got}, the run is {s.lang}"


def _wrong_script(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    variant = han_variant(s.lang)
    if variant is None:
        return None
    for field, text in (("instruction", ins), ("input", inp), ("output", out)):
        if _KANA_RE.search(text):
            continue  # Japanese kanji keep traditional forms
        other, own = _other_variant(text, variant)
        if other >= 2 or (other >= 1 and other > own):
            name = "Traditional" if variant == "hans" else "Simplified"
            return f"{field} has {other} {name}-only characters, the run is {s.lang}"
    return None


# Asking how a medium is made (the steps, an algorithm, the software) asks for text.
_ABOUT_MAKING_RE = re.compile(r"步骤|算法|方法|如何|怎么|怎样|技巧|提示|软件|工具|程序|能否|是否|解释|类比|吗[？?]?\s*$|\bsteps?\b|\bhow\b|\balgorithm|\bsoftware|\btools?\b", re.IGNORECASE)


_PURPOSE_RE = re.compile(r"来|以便|用来|用于|从而|\bto\b|\bthat\b", re.IGNORECASE)
_PERCEIVE_TOPIC_RE = re.compile(r"算法|模型|机器学习|程序|代码|\balgorithm|\bmodel\b|\bmachine learning|\bcode\b", re.IGNORECASE)
_NAMED_WORK_RE = re.compile(r"《[^》]+》")


def _blacklist(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    # A quoted sentence to rewrite is material, not the task; a named work (《星夜》这幅画) is known;
    # after a colon comes the material (把下面的句子改成主动语态：这幅画是由艺术家创作的).
    ins = re.split(r"[:：]\s*\S", _QUOTED_RE.sub('"', ins), maxsplit=1)[0]
    for m in _PRODUCE_RE.finditer(ins):
        # Asking how one is made asks for text; judged in the clause that names the medium,
        # so 解释光合作用，并配一张图片 still asks for a picture.
        start = max(ins.rfind(p, 0, m.start()) for p in "，。；,;！？") + 1
        ends = [e for e in (ins.find(p, m.end()) for p in "，。；,;！？") if e >= 0]
        # What the medium is for (创建一个动画来解释 AI 如何工作) is not a question about making it.
        clause = _PURPOSE_RE.split(ins[start : min(ends, default=len(ins))][m.end() - start :], maxsplit=1)[0]
        if not _ABOUT_MAKING_RE.search(ins[start : m.end()] + clause):
            return f"the task asks to make a medium: {m.group(0)!r}"
    m = None if _PERCEIVE_TOPIC_RE.search(ins) else _PERCEIVE_RE.search(ins)
    if m and not _NAMED_WORK_RE.search(inp) and (_MEDIUM_STAND_IN_RE.match(inp) or units(_URL_RE.sub(" ", inp)) < DESCRIBED_MEDIUM_UNITS):
        return f"the task asks to see or hear a medium it does not describe: {m.group(0)!r}"
    return None


def _needs_url(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    if _URL_AS_SUBJECT_RE.search(ins):
        return None
    task = ins + "\n" + inp
    url = _URL_RE.search(task)
    if url:
        rest = _URL_RE.sub(" ", inp)
        if units(rest) < 20 or _FETCH_VERB_RE.search(ins):
            return f"the task needs {url.group(0)[:60]!r} fetched"
        return None
    if _SEARCH_VERB_RE.search(ins):
        url = _URL_RE.search(out)
        if url:
            return f"the task asks to search the web; the answer cites {url.group(0)[:60]!r}"
    return None


_REFUSAL_ASKED_RE = re.compile(r"无法|不能|抱歉|对不起|拒绝|道歉|回复|回应|响应|can't|cannot|sorry|apolog|declin|refus|respon", re.IGNORECASE)


def _refusal(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    if len(out.strip()) > REFUSAL_MAX_CHARS:
        return None
    # Rewriting 我将无法出席 or writing a polite refusal asks for exactly such words.
    if _REFUSAL_ASKED_RE.search(ins) or _REFUSAL_ASKED_RE.search(inp):
        return None
    head = fold(out.lstrip()[: REFUSAL_WINDOW + 40])
    for at in range(REFUSAL_WINDOW + 1):
        if head.startswith(_REFUSALS, at):
            pattern = next(p for p in _REFUSALS if head.startswith(p, at))
            return f"output opens with {pattern!r}"
    return None


def _placeholder(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    if _PLACEHOLDER_RE.match(out.strip()):
        return f"output is a placeholder: {out.strip()[:30]!r}"
    m = _IMAGE_RE.search(out) or (None if _WEB_TASK_RE.search(ins + inp) else _IMAGE_FILE_RE.search(out))
    if m:
        return f"output links an image: {m.group(0)[:40]!r}"
    return None


# Checking for errors in a text that is already right: the unchanged text is the answer.
_CORRECTION_RE = re.compile(
    r"错误|错字|不正确|更正(?!式)|纠正|修正|修复|校对|(?:语法|拼写|使其|是否)(?:上)?正确|检查|"
    r"(?<!保持)正确的(?:语法|拼写|句法|标点)|(?:改进|改善|提高|更好的|更准确的|符合)其?(?:语法|拼写)|"
    r"\bcorrect|\berror|\bproofread|\bfix|\bcheck",
    re.IGNORECASE,
)
# Putting items in order, or matching them, when they already are: but not reordering a sentence's words.
_ORDERING_RE = re.compile(
    r"排序|顺序|排列|排名|匹配|\bsort|\border\b|\barrange|\brank|\bmatch|\borgani[sz]e|\balphabet", re.IGNORECASE
)
_SENTENCE_RE = re.compile(r"句子|这句话|此句|该句|语句|句中|\bsentence", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"[。！？!?\n]|\.\s")


def _one_sentence(text: str) -> bool:
    """A single sentence: no line break and no sentence end before the last character."""
    return not _SENTENCE_END_RE.search(text.strip()[:-1])
# A change only if one is needed (必要时插入逗号, 确保它遵循..., 如果语气不一致，请重写): none may be.
_CONDITIONAL_RE = re.compile(
    r"确保|必要时|必要的话|如有必要|如果必要|如果需要|如有需要|视需要|必要的(?:更改|修改|改动|编辑)|"
    # 如果语气不一致，请重写: but not 假如没有电，世界会怎样, a question about a condition.
    r"(?:如果|若|假如|如有)[^，。；,;\n]{0,20}[，,]?\s*(?:请|就|则)?\s*(?:重写|改写|修改|更正|纠正|编辑|修正|进行|做出|添加|删除|插入|替换)|"
    r"\bif (?:necessary|needed|any)\b|\bwhere (?:necessary|needed)\b|\bas needed\b|\bensure\b|\bmake sure\b",
    re.IGNORECASE,
)
# A new or different text asked for: a correction word (生成一个新的、语法正确的句子) does not excuse the same one.
_NEW_TEXT_RE = re.compile(r"(?<![最更全创])新的|新句子|一个新|另一个|另一种|不同的|\bnew\b|\banother\b|\bdifferent\b", re.IGNORECASE)
# Asked to give the text back as it is (粘贴, 转录, 朗读), with no change asked beside.
_VERBATIM_RE = re.compile(
    r"粘贴|复制|抄写|照抄|誊写|转录|原样|原封不动|逐字|朗读|大声读|(?<![不勿免])重复(?:一遍|一次|一下|以下|下面|给定|该|此|这|输入|它)|"
    r"\b(?:copy|paste|transcribe|verbatim|word for word)\b|\brepeat\b|\bread\b[^.!?\n]{0,20}\baloud\b",
    re.IGNORECASE,
)
_CHANGE_RE = re.compile(
    r"改|换|替|转换|转为|转成|变成|变为|时态|语态|同义|反义|删除|添加|插入|但|"
    r"\bbut\b|\bchang|\brewrit|\breplac|\bconvert|\btense\b|\bvoice\b|\bwithout\b",
    re.IGNORECASE,
)
# Tasks on a text's form: an answer that differs only in punctuation, case or spacing made the change asked.
_FORM_RE = re.compile(
    r"标点|逗号|句号|句点|分号|冒号|引号|问号|感叹号|叹号|括号|破折号|连字符|省略号|大写|小写|空格|空白|格式|换行|首字母|驼峰|缩进|对齐|全角|半角|"
    r"punctuat|comma|period|full stop|colon|quot|capital|upper|lower|\bcase\b|spac|format|indent|align",
    re.IGNORECASE,
)
# What a near copy may change: whitespace, case, width, and quotes or sentence punctuation at either
# end (a translation dropped or added a 。). Not a minus sign or a bracket: -32 → 32 and
# print("Hi" → print("Hi") are answers.
_EDGE_RE = re.compile(r"^[\s\"'“”‘’「」『』《》]+|[\s\"'“”‘’「」『』《》.,;:!?。，、；：！？…]+$")
_UNCLOSED_QUOTE_RE = re.compile(r"[“\"「『]([^”\"」』]+)$")
SAME_TEXT_RATIO = 0.5  # the instruction's own sentence and the input are versions of one text


def copy_key(text: str) -> str:
    """What a copy keeps: same_text_key without quotes and sentence punctuation at the ends."""
    return _EDGE_RE.sub("", same_text_key(text))


def _own_material(ins: str) -> list[str]:
    """Texts the instruction carries itself: quoted, after a colon, or on a line of its own."""
    found = [m.group(0) for m in _QUOTED_RE.finditer(ins)]
    found += [m.group(1) for m in _UNCLOSED_QUOTE_RE.finditer(ins)]
    for sep in ("：", ":", "\n"):
        head, _, tail = ins.partition(sep)
        if tail.strip():
            found.append(tail)
    return [k for k in map(copy_key, found) if len(k) >= 2]


def _names_another_version(ins: str, inp: str) -> bool:
    """The instruction quotes its own sentence, and the input is a different version of it (already edited)."""
    own = _own_material(ins)
    key = copy_key(inp)
    if not own or key in own:
        return False
    # A quoted word (替换“伟大”一词) is not a version of the input: only a text of comparable length is.
    return any(
        len(m) * 2 >= len(key) and difflib.SequenceMatcher(None, m, key, autojunk=False).ratio() >= SAME_TEXT_RATIO
        for m in own
    )


def _output_equals_input(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    if not inp.strip():
        return None
    exact = inp.strip() == out.strip()
    # The task's own words decide: a quoted word (使用及物动词“确保”重写句子) is material.
    task = _QUOTED_RE.sub('"', ins)
    if not exact:
        if len(out) > 2 * len(inp) + 10 or len(inp) > 2 * len(out) + 10:
            return None  # most answers: far longer or shorter than the input, no key needed
        # A near copy: the same words but for spacing, case, width or end punctuation. On a text;
        # on numbers and formulas (103 → 1.03, 3 + 4 → 3 4 +) such a change is the answer, and so
        # is a new layout (the same sentences split into two paragraphs).
        key = copy_key(inp)
        if not key or key != copy_key(out) or script_of(key) == "none" or _FORM_RE.search(task):
            return None
        if sum(1 for line in inp.splitlines() if line.strip()) != sum(1 for line in out.splitlines() if line.strip()):
            return None
    if _CONDITIONAL_RE.search(task) or (_VERBATIM_RE.search(task) and not _CHANGE_RE.search(task)):
        return None  # 必要时插入逗号, 将以下文本粘贴到新文档中: the unchanged text may be the answer
    if not _NEW_TEXT_RE.search(task):
        if _CORRECTION_RE.search(task):
            return None  # 纠正错误 of a sentence with none: the unchanged sentence is the answer
        if _ORDERING_RE.search(task) and not (_SENTENCE_RE.search(task) and _one_sentence(inp)):
            return None  # a list already in order; reordering one sentence's words asks for a new sentence
    if _names_another_version(ins, inp):
        return None  # 编辑以下句子：A, with the edited A as input: the output answers the instruction
    return "output repeats the input" if exact else "output repeats the input but for spacing, case or end punctuation"


def _output_language(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    want = expected_script(s.lang)
    # Cheapest tests first: most answers are in the run's script or belong to a task that may
    # answer in another one, and none of them needs the script counted.
    if want != "latin" and function_words(out) < FUNCTION_WORDS_MIN:
        return None  # names, code, formulas and product lists are Latin without being English prose
    if _OTHER_LANGUAGE_RE.search(ins):
        return None
    if task_script(ins) != want or script_of(inp) not in ("none", want):
        return None  # the instruction's language is another rule's; a Latin input may want a Latin answer
    got = script_of(out)
    if got in ("none", want):
        return None
    if got == "latin" and want != "latin":
        if sum(1 for line in out.splitlines() if _CODE_LINE_RE.search(line) or _CODE_ANSWER_LINE_RE.search(line)) >= CODE_LINES_MIN or re.search(r"<[a-z!]+[^>]*>|def |\(\)", out):
            return None  # code with English comments and strings
        # Names and titles are capitalised (The Old Anchor, Walking on Sunshine): English prose is
        # its lower-case words, weighed against the Chinese around them.
        han = len(HAN_RE.findall(out))
        if prose_letters(out) <= han * LETTERS_PER_HAN * 2:
            return None  # Chinese prose around English names, or a list of names
    return f"output is mainly {got}, the run is {s.lang}"


def _asks_for(ins: str, m: re.Match) -> bool:
    """Whether the long form matched is what the task asks for, not the purpose of something else asked."""
    clause = re.split(r"[，。；！？,;!?\n]", ins[: m.start()])[-1]
    if not _PURPOSE_RE.search(clause):
        return True
    rest = _PURPOSE_RE.sub("", clause)
    # 生成三个主题的列表，以撰写一篇论文: the purpose of the clause before.
    return bool(rest.strip()) and bool(_MEANS_RE.match(rest))


def _output_too_short(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    m = _LONG_FORM_RE.search(ins)
    if m and units(out) < LONG_FORM_MIN_UNITS and not _SET_LENGTH_RE.search(ins) and _asks_for(ins, m):
        return f"the task asks for {m.group(0)!r}; the output has {units(out)} words and characters"
    return None


# SQL whose keywords were machine-translated (从订单中选择计数（*）, 更新用户设置年龄 = 35, 瓦尔查尔 for VARCHAR):
# one line is enough here, because the task itself names SQL.
_SQL_TASK_RE = re.compile(r"sql|mysql|sqlite|postgres", re.IGNORECASE)
_ZH_SQL_RE = re.compile(r"从[^，。；\n]{1,20}?中?选择\s*[*\w（(]|(?<![、，])选择\s*[*（(]|创建(?:表|视图)\s*\S|插入[^，。；、\n]{0,10}[（(]|"
                        r"更新[^，。；\n]{1,12}?(?:设置|SET)\s*\S|从[^，。；\n]{1,12}?中删除|瓦尔查尔|其中\s*[\w\u4e00-\u9fff]+\s*[=<>]")


def _code_translated(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    if _SQL_TASK_RE.search(ins):
        m = _ZH_SQL_RE.search(out)
        if m:
            return f"output SQL has Chinese keywords: {m.group(0).strip()[:40]!r}"
    for field, text in (("output", out), ("input", inp)):
        if not HAN_RE.search(text):
            continue
        code = _CODE_STRINGS_RE.sub('""', text)
        lines = code.splitlines()
        if sum(1 for line in lines if _CODE_LINE_RE.search(line)) < CODE_LINES_MIN:
            continue  # a formula with Chinese names (面积 = 长 × 宽) is maths, not code
        for line in lines:
            # A keyword followed by Chinese is code only on a statement line: prose may say "var 声明的变量".
            m = _ZH_KEYWORD_RE.match(line) or (_HAN_IDENT_RE.search(line) if _STATEMENT_RE.search(line) else None)
            if m:
                return f"{field} code has Chinese keywords or identifiers: {m.group(0).strip()[:40]!r}"
    return None


def _pii(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    for field, text in (("instruction", ins), ("input", inp), ("output", out)):
        found = find_pii(text)
        if found:
            kind, start, end = found[0]
            return f"{field} holds {'an' if kind[0] in 'aeiou' else 'a'} {kind}: {text[start:end][:4]}…"
    return None


RULES: Mapping[str, Callable[[str, str, str, RuleSettings], str | None]] = {
    "empty": _empty,
    "too-short": _too_short,
    "too-long": _too_long,
    "starts-with-punctuation": _starts_with_punctuation,
    "wrong-language": _wrong_language,
    "wrong-script": _wrong_script,
    "blacklist": _blacklist,
    "needs-url": _needs_url,
    "refusal": _refusal,
    "placeholder": _placeholder,
    "output-equals-input": _output_equals_input,
    "output-language": _output_language,
    "output-too-short": _output_too_short,
    "code-translated": _code_translated,
    "pii": _pii,
}


def check(instruction: str, input: str, output: str, settings: RuleSettings) -> tuple[str, str] | None:
    """The first rule the record breaks, as (reason, detail), or None if it passes them all."""
    for reason, rule in RULES.items():
        if reason in settings.enabled:
            detail = rule(instruction, input, output, settings)
            if detail is not None:
                return reason, detail
    return None


# ---- user rules (selfinstruct filter --rule-file) ----------------------------------------------

USER_RULE_KEYS = ("name", "field", "regex", "min", "max", "unit", "lang", "description")
_RULE_HINT = "a rule has name, field, and one check: regex = '...', min/max (+ unit = 'chars' or 'words'), or lang"


@dataclass(frozen=True)
class UserRule:
    """A rule from the user's file: a regex, a length bound or a script check on one field."""

    name: str
    field: str = "instruction"
    regex: re.Pattern | None = None
    min: int | None = None
    max: int | None = None
    unit: str = "chars"
    lang: str | None = None

    def check(self, text: str) -> str | None:
        """Why `text` (the rule's field) breaks the rule, or None."""
        if self.regex is not None:
            m = self.regex.search(text)
            return f"{self.field} matches {self.regex.pattern!r} at {m.group(0)[:40]!r}" if m else None
        if self.lang is not None:
            got = script_of(text)
            if got == "none":
                return None  # nothing to judge; the empty rule speaks for empty fields
            return f"{self.field} is mainly {got}, not {self.lang}" if got != expected_script(self.lang) else None
        n = len(re.sub(r"\s+", "", text)) if self.unit == "chars" else len(text.split())
        if self.min is not None and n < self.min:
            return f"{self.field} has {n} {self.unit}, under {self.min}"
        if self.max is not None and n > self.max:
            return f"{self.field} has {n} {self.unit}, over {self.max}"
        return None


def load_rules(path, reserved: tuple[str, ...] = ()) -> list[UserRule]:
    """Parse a TOML (or YAML) file of [[rule]] tables; any mistake is one InputError naming file and rule."""
    from pathlib import Path

    from selfinstruct.errors import InputError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the rule file ({getattr(exc, 'strerror', None) or exc})", "check the path") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(f"{path}: YAML rule files need PyYAML", "pip install pyyaml, or write the rules as TOML") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML ({' '.join(str(exc).split())})", _RULE_HINT) from None
    else:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{path}: not valid TOML ({exc})", _RULE_HINT) from None
    if isinstance(data, dict):
        unknown = [k for k in data if k not in ("rule", "rules")]
        if unknown:
            raise InputError(f"{path}: unknown top-level key {unknown[0]!r}", "put each rule in a [[rule]] table")
        items = data.get("rule", data.get("rules", []))
    else:
        items = data
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise InputError(f"{path}: expected a list of rules ([[rule]] tables)", _RULE_HINT)
    rules: list[UserRule] = []
    for k, item in enumerate(items, start=1):
        rules.append(_user_rule(path, k, item, reserved, {r.name for r in rules}))
    return rules


def _user_rule(path, k: int, item: dict, reserved: tuple[str, ...], taken: set[str]) -> UserRule:
    from selfinstruct.errors import InputError

    name = item.get("name")
    where = f"{path}: rule {name!r}" if isinstance(name, str) and name else f"{path}: rule #{k}"

    def bad(what: str, hint: str = _RULE_HINT) -> InputError:
        return InputError(f"{where}: {what}", hint)

    unknown = [key for key in item if key not in USER_RULE_KEYS]
    if unknown:
        raise bad(f"unknown key {unknown[0]!r}", f"keys are {', '.join(USER_RULE_KEYS)}")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise bad("needs a name of letters, digits, '-', '_' or '.'")
    if name in reserved:
        raise bad(f"name {name!r} is a built-in rule", "choose another name; built-ins are switched with --rules/--no-rule")
    if name in taken:
        raise bad("the name is used twice")
    field = item.get("field", "instruction")
    if not isinstance(field, str) or not field:
        raise bad("`field` must be a column name such as instruction, input or output")
    kinds = [kind for kind, keys in (("regex", ("regex",)), ("length", ("min", "max")), ("lang", ("lang",))) if any(key in item for key in keys)]
    if len(kinds) != 1:
        raise bad("needs exactly one check" if not kinds else f"has {' and '.join(kinds)} checks; use one rule for each")
    if "unit" in item and kinds != ["length"]:
        raise bad("`unit` only goes with min/max")
    if kinds == ["regex"]:
        pattern = item["regex"]
        if not isinstance(pattern, str) or not pattern:
            raise bad("`regex` must be a non-empty string")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise bad(f"bad regex {pattern!r} ({exc})", "Python re syntax; in TOML use '...' quotes to keep backslashes") from None
        return UserRule(name, field, regex=compiled)
    if kinds == ["lang"]:
        lang = item["lang"]
        if not isinstance(lang, str) or not lang:
            raise bad("`lang` must be a language code such as zh, en, ja, ko")
        return UserRule(name, field, lang=lang)
    bounds = {}
    for key in ("min", "max"):
        value = item.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise bad(f"`{key}` must be a whole number >= 0")
        bounds[key] = value
    if bounds["min"] is not None and bounds["max"] is not None and bounds["min"] > bounds["max"]:
        raise bad("`min` is larger than `max`")
    unit = item.get("unit", "chars")
    if unit not in ("chars", "words"):
        raise bad(f"`unit` must be 'chars' or 'words', not {unit!r}")
    return UserRule(name, field, min=bounds["min"], max=bounds["max"], unit=unit)
