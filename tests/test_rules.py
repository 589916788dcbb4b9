"""Every built-in rule and every kind of user rule, with Chinese and English cases."""

from __future__ import annotations

import pytest

from selfinstruct.errors import InputError
from selfinstruct.rules import BLACKLIST_WORDS, BLACKLIST_ZH, REASONS, REFUSALS, RULES, RuleSettings, check, fold, load_rules, measure, same_text_key, script_of

ZH = RuleSettings(lang="zh")
EN = RuleSettings(lang="en")
GOOD_ZH = ("解释一下光合作用的过程。", "", "光合作用是植物利用光能把二氧化碳和水转化为有机物的过程。")
GOOD_EN = ("Explain how photosynthesis works in plants.", "", "Plants turn light, water and carbon dioxide into sugar.")


def reason(record, settings):
    verdict = check(*record, settings)
    return verdict[0] if verdict else None


# (rule, Chinese record that breaks it, English record that breaks it)
CASES = [
    ("empty", ("  ", "", "有输出"), ("Write a poem.", "", "   ")),
    ("too-short", ("写诗", "", "床前明月光"), ("Summarise.", "", "A summary.")),
    ("too-long", ("请" * 301, "", "好的"), (" ".join(["word"] * 151), "", "ok")),
    ("starts-with-punctuation", ("。解释一下光合作用", "", "好的"), ("- Explain photosynthesis now", "", "ok")),
    ("wrong-language", ("Explain photosynthesis to a child.", "", "ok"), ("解释一下光合作用的过程。", "", "好的")),
    ("blacklist", ("根据这张图片描述场景", "", "好的"), ("Describe the image in detail please", "", "ok")),
    ("refusal", ("介绍一下你自己吧", "", "作为一个AI语言模型，我无法回答。"), ("Tell me a secret please", "", "As an AI language model, I cannot.")),
    ("output-equals-input", ("把下面的句子翻译成中文", "你好，世界", "你好，世界"), ("Repeat the following sentence", "Hello world", "hello  world")),
]


def test_every_builtin_rule_has_a_case():
    assert {c[0] for c in CASES} == set(REASONS) == set(RULES)


@pytest.mark.parametrize("rule,zh,en", CASES, ids=[c[0] for c in CASES])
def test_builtin_rule_chinese_and_english(rule, zh, en):
    assert reason(zh, ZH) == rule
    assert reason(en, EN) == rule
    # Switched off, the rule no longer fires (another may, but not this one).
    off = RuleSettings(lang="zh", enabled=frozenset(REASONS) - {rule})
    assert reason(zh, off) != rule


def test_good_records_pass():
    assert check(*GOOD_ZH, ZH) is None
    assert check(*GOOD_EN, EN) is None


def test_detail_says_why():
    assert check("写诗", "", "好", ZH) == ("too-short", "instruction has 2 chars, under 4")


def test_quoted_chinese_instruction_is_not_punctuation():
    assert reason(("“静夜思”的作者是谁？", "", "李白"), ZH) is None


def test_same_text_key_collapses_whitespace_but_keeps_word_boundaries():
    assert same_text_key("Give the rapist a call") != same_text_key("Give therapist a call")
    assert same_text_key("  Hello\t\n WORLD ") == same_text_key("hello world") == "hello world"
    assert same_text_key("ＨＥＬＬＯ\u3000Ｗｏｒｌｄ！") == same_text_key("hello world!")  # full-width, NFKC
    assert same_text_key("Straße") == same_text_key("STRASSE")  # casefold, not lower
    assert same_text_key("列举三种 排序算法") == same_text_key("列举三种排序算法")  # Chinese adds spaces at will
    assert same_text_key("用 Python 写代码") == same_text_key("用Python写代码")
    assert same_text_key("아버지가 방에") != same_text_key("아버지가방에")  # Korean spacing splits words
    # fold stays whitespace-free: it finds phrases (refusals) however they are spaced.
    assert fold("As an AI  language\nmodel") == fold("as an ai language model")


def test_output_equals_input_needs_the_same_words():
    assert reason(("Split the word into two words", "therapist", "the rapist"), EN) is None
    assert reason(("Repeat the sentence", "Ｈｅｌｌｏ　ｗｏｒｌｄ", "hello world"), EN) == "output-equals-input"


def test_script_and_measure():
    assert script_of("你好世界") == "zh"
    assert script_of("こんにちは世界") == "ja"
    assert script_of("hello world") == "latin"
    assert script_of("。。") == "none"
    assert measure("你好 世界") == (4, "chars")
    assert measure("hello big world") == (3, "words")


# ---- user rules ----------------------------------------------------------------------------------


def write(tmp_path, text, name="rules.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_user_rules_from_toml(tmp_path):
    path = write(tmp_path, """
[[rule]]
name = "no-urls"
field = "output"
regex = 'https?://'

[[rule]]
name = "short-output"
field = "output"
min = 5
unit = "chars"

[[rule]]
name = "few-words"
field = "output"
max = 3
unit = "words"

[[rule]]
name = "zh-output"
field = "output"
lang = "zh"
""")
    rules = {r.name: r for r in load_rules(path)}
    assert rules["no-urls"].check("见 https://example.com") == "output matches 'https?://' at 'https://'"
    assert rules["no-urls"].check("see example dot com") is None
    assert rules["short-output"].check("好的") == "output has 2 chars, under 5"
    assert rules["short-output"].check("好的，没问题。") is None
    assert rules["short-output"].check("ok  fine") is None  # 6 characters; whitespace does not count
    assert rules["short-output"].check("o k") == "output has 2 chars, under 5"
    assert rules["few-words"].check("one two three four") == "output has 4 words, over 3"
    assert rules["few-words"].check("one two") is None
    assert rules["zh-output"].check("This is English.") == "output is mainly latin, not zh"
    assert rules["zh-output"].check("这是中文。") is None
    assert rules["zh-output"].check("") is None


def test_user_rules_from_yaml(tmp_path):
    pytest.importorskip("yaml")
    path = write(tmp_path, "rule:\n  - name: no-urls\n    field: output\n    regex: 'https?://'\n", "rules.yaml")
    (rule,) = load_rules(path)
    assert rule.check("http://x") is not None


@pytest.mark.parametrize(
    "text,message",
    [
        ('[[rule]]\nname = "x"\nregx = "a"\n', "rule 'x': unknown key 'regx'"),
        ('[[rule]]\nname = "x"\nregex = "(("\n', "rule 'x': bad regex '(('"),
        ('[[rule]]\nname = "x"\nmin = -1\n', "rule 'x': `min` must be a whole number"),
        ('[[rule]]\nname = "x"\nmin = 5\nmax = 2\n', "rule 'x': `min` is larger than `max`"),
        ('[[rule]]\nname = "x"\nmin = 5\nunit = "lines"\n', "rule 'x': `unit` must be"),
        ('[[rule]]\nname = "x"\nregex = "a"\nmin = 1\n', "rule 'x': has regex and length checks"),
        ('[[rule]]\nname = "x"\n', "rule 'x': needs exactly one check"),
        ('[[rule]]\nregex = "a"\n', "rule #1: needs a name"),
        ('[[rule]]\nname = "empty"\nregex = "a"\n', "rule 'empty': name 'empty' is a built-in rule"),
        ('[[rule]]\nname = "x"\nregex = "a"\n[[rule]]\nname = "x"\nregex = "b"\n', "rule 'x': the name is used twice"),
        ('[[rule]\nname = "x"\n', "not valid TOML"),
        ('[rules2]\n', "unknown top-level key 'rules2'"),
    ],
)
def test_bad_rule_file_is_one_input_error(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_rules(path, reserved=REASONS)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_rule_file(tmp_path):
    with pytest.raises(InputError, match="cannot read the rule file"):
        load_rules(tmp_path / "nope.toml")


@pytest.mark.parametrize("word", BLACKLIST_WORDS)
def test_every_english_blacklist_word_fires_as_a_whole_word(word):
    assert reason((f"Please {word.capitalize()} something about the weather in Paris", "", "ok"), EN) == "blacklist"


@pytest.mark.parametrize("word", BLACKLIST_ZH)
def test_every_chinese_blacklist_word_fires(word):
    assert reason((f"请根据{word}回答下面这个问题", "", "好的"), ZH) == "blacklist"


def test_blacklist_words_inside_other_words_do_not_fire():
    assert reason(("Explain the profile of a mapping function in Python", "", "ok"), EN) is None


@pytest.mark.parametrize("phrase", REFUSALS)
def test_every_refusal_fires_as_written_by_a_model(phrase):
    # Models write full-width commas and capitals; the list is written folded.
    written = phrase.replace(",", "，") if script_of(phrase) == "zh" else phrase.capitalize()
    settings = ZH if script_of(phrase) == "zh" else EN
    good = GOOD_ZH if settings is ZH else GOOD_EN
    assert reason((good[0], "", f"{written} 这个请求。" if settings is ZH else f"{written} do that for you."), settings) == "refusal"
