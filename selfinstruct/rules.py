"""Built-in rule filters; each rule is named by the rejection reason it writes."""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, Mapping

from selfinstruct.similarity import CJK_RE, HAN_RE, TOKEN_RE

# Tasks a text-only model cannot do. English words match whole words; Chinese match substrings.
BLACKLIST_WORDS = (
    "image", "images", "picture", "pictures", "photo", "photos", "photograph", "video", "videos",
    "audio", "recording", "file", "files", "attachment", "map", "maps", "draw", "drawing", "sketch",
    "plot", "chart", "diagram", "flowchart", "screenshot", "go to",
)
BLACKLIST_ZH = (
    "图片", "图像", "照片", "视频", "音频", "录音", "画一", "画出", "绘制", "流程图", "地图", "文件",
    "附件", "截图", "图表", "網址", "圖片", "圖像", "影片", "視頻", "音訊", "音頻", "錄音", "畫一",
    "畫出", "繪製", "流程圖", "地圖", "檔案", "截圖", "圖表",
)
REFUSALS = (
    "as an ai language model", "as an ai assistant", "as a language model", "as an ai,", "i'm an ai",
    "i am an ai", "i'm sorry, but i can", "i am sorry, but i can", "sorry, i can't", "sorry, i cannot",
    "i cannot fulfill", "i can't assist", "i cannot assist", "i'm unable to help",
    "作为一个ai", "作为ai语言模型", "作为一名ai", "作为人工智能", "作为一个人工智能", "我是一个ai",
    "我是一个人工智能", "作為一個ai", "作為ai", "作為一個人工智慧", "作為人工智慧",
    "抱歉,我无法", "抱歉,我不能", "对不起,我无法", "对不起,我不能", "很抱歉,我无法", "很抱歉,我不能",
    "抱歉,我無法", "抱歉,我不能", "對不起,我無法", "對不起,我不能", "我无法回答", "我無法回答",
)

REASONS = (
    "empty",
    "too-short",
    "too-long",
    "starts-with-punctuation",
    "wrong-language",
    "blacklist",
    "refusal",
    "output-equals-input",
)
# Reasons written by other stages, accepted by --rules / --no-rule where they apply.
OTHER_REASONS = ("unparseable", "truncated", "near-duplicate", "surplus")


@dataclass(frozen=True)
class RuleSettings:
    """What the rules need to know: target language, length limits, which rules run."""

    lang: str = "zh"
    min_chars: int = 4
    max_chars: int = 300
    min_words: int = 3
    max_words: int = 150
    enabled: frozenset[str] = frozenset(REASONS)


def fold(text: str) -> str:
    """Substring-matching form: NFKC (full-width to half-width), lower-case, no whitespace."""
    # Only for finding phrases (refusals, leaked prompt words) however they are spaced; for
    # deciding two texts are the same use same_text_key, since "the rapist" folds to "therapist".
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text).lower())


_REFUSALS = tuple(fold(p) for p in REFUSALS)
_BLACKLIST_RE = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in BLACKLIST_WORDS) + r")\b", re.IGNORECASE)


_KANA_RE = re.compile("[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
# Whitespace beside a Han or kana character: Chinese and Japanese do not separate words with
# spaces, so typesetting adds or drops them at will. Not hangul: Korean spacing splits words.
_UNSPACED = f"[{HAN_RE.pattern[1:-1]}{_KANA_RE.pattern[1:-1]}]"
_UNSPACED_SPACE_RE = re.compile(f"(?<={_UNSPACED})\\s+|\\s+(?={_UNSPACED})")
_SPACES_RE = re.compile(r"\s+")


def same_text_key(text: str) -> str:
    """Equality form: NFKC, casefold, whitespace runs collapsed to one space, none beside Han/kana."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACES_RE.sub(" ", _UNSPACED_SPACE_RE.sub("", text)).strip()


@functools.lru_cache(maxsize=4096)
def script_of(text: str) -> str:
    """The main script of a text: zh, ja, ko, latin or none, by token counts."""
    # Every CJK character is a token of its own, so counting regex matches over the text gives
    # the same counts as classifying each token, in C; the cache serves the rules that ask about
    # the same instruction in a row (too-short, too-long, wrong-language).
    lower = text.lower()
    tokens = len(TOKEN_RE.findall(lower))
    if not tokens:
        return "none"
    cjk = len(CJK_RE.findall(lower))
    if cjk * 2 < tokens:
        return "latin"
    han = len(HAN_RE.findall(lower))
    kana = len(_KANA_RE.findall(lower))
    if kana * 10 >= cjk:
        return "ja"
    if cjk - han - kana > han:
        return "ko"
    return "zh"


def expected_script(lang: str) -> str:
    """The script a run in `lang` should produce."""
    base = lang.split("-")[0].lower()
    return {"zh": "zh", "ja": "ja", "ko": "ko"}.get(base, "latin")


def measure(text: str) -> tuple[int, str]:
    """Length in the unit that fits the script: characters for CJK text, words otherwise."""
    if script_of(text) in ("zh", "ja", "ko"):
        return len(re.sub(r"\s+", "", text)), "chars"
    return len(text.split()), "words"


def _empty(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    if not ins.strip():
        return "instruction is empty"
    if not out.strip():
        return "output is empty"
    return None


def _too_short(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    n, unit = measure(ins)
    low = s.min_chars if unit == "chars" else s.min_words
    return f"instruction has {n} {unit}, under {low}" if n < low else None


def _too_long(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    n, unit = measure(ins)
    high = s.max_chars if unit == "chars" else s.max_words
    return f"instruction has {n} {unit}, over {high}" if n > high else None


def _starts_with_punctuation(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    first = ins.strip()[:1]
    # Opening brackets and quotes start real instructions (“静夜思”的作者是谁？); other punctuation does not.
    if first and unicodedata.category(first) in ("Po", "Pd", "Pe", "Pf", "Pc"):
        return f"instruction starts with {first!r}"
    return None


def _wrong_language(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    want, got = expected_script(s.lang), script_of(ins)
    return f"instruction is mainly {got}, the run is {s.lang}" if got != want else None


def _blacklist(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    m = _BLACKLIST_RE.search(ins)
    if m:
        return f"instruction mentions {m.group(0)!r}"
    for word in BLACKLIST_ZH:
        if word in ins:
            return f"instruction mentions {word!r}"
    return None


def _refusal(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    for field, text in (("output", out), ("instruction", ins)):
        folded = fold(text)
        for pattern in _REFUSALS:
            if pattern in folded:
                return f"{field} contains {pattern!r}"
    return None


def _output_equals_input(ins: str, inp: str, out: str, s: RuleSettings) -> str | None:
    return "output repeats the input" if inp.strip() and same_text_key(inp) == same_text_key(out) else None


RULES: Mapping[str, Callable[[str, str, str, RuleSettings], str | None]] = {
    "empty": _empty,
    "too-short": _too_short,
    "too-long": _too_long,
    "starts-with-punctuation": _starts_with_punctuation,
    "wrong-language": _wrong_language,
    "blacklist": _blacklist,
    "refusal": _refusal,
    "output-equals-input": _output_equals_input,
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
