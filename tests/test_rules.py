"""Every built-in rule and every kind of user rule, with Chinese and English cases."""

from __future__ import annotations

import pytest

from selfinstruct.errors import InputError
from selfinstruct.rules import REASONS, REFUSALS, RULES, RuleSettings, check, find_pii, fold, load_rules, measure, redact_pii, same_text_key, script_of, variant_counts

ZH = RuleSettings(lang="zh", enabled=frozenset(REASONS))  # every rule, as filter runs them
EN = RuleSettings(lang="en", enabled=frozenset(REASONS))
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
    ("wrong-script", ("解释一下光合作用的过程。", "", "光合作用是植物利用光能製造養分的過程。"), None),
    ("blacklist", ("根据这张图片描述场景", "", "好的"), ("Describe the image in detail please", "", "ok")),
    ("needs-url", ("总结这篇文章。", "https://www.example.org/news/1234", "文章讲了天气。"), ("Summarize this article.", "https://news.example.org/a/1", "It is about rain.")),
    ("refusal", ("介绍一下你自己吧", "", "作为一个AI语言模型，我无法回答。"), ("Tell me a secret please", "", "As an AI language model, I cannot.")),
    ("placeholder", ("为咖啡店设计一个标志。", "", "<nooutput>"), ("Create a logo for the shop.", "", "![logo](https://i.example.org/logo.png)")),
    ("output-equals-input", ("把下面的句子改成被动语态", "猫抓住了老鼠", "猫抓住了老鼠"), ("Rewrite the sentence in the passive voice", "The cat caught the mouse.", "The cat caught the mouse.")),
    ("output-language", ("解释一下光合作用的过程。", "", "Photosynthesis is the process by which plants turn light into the sugar they can use."), None),
    ("output-too-short", ("写一篇关于环保的文章。", "", "环保很重要。"), None),
    ("code-translated", ("用Java写一个求和程序。", "", "int a = 1;\n整数 b = 2;\nSystem.out.println(a + b);"), None),
    ("pii", ("给张三发一条消息。", "他的手机是13912345678。", "好的，已发送。"), ("Reply to the customer.", "Reach me at jane.doe@gmail.com", "Sure, thanks!")),
]


def test_every_builtin_rule_has_a_case():
    assert {c[0] for c in CASES} == set(REASONS) == set(RULES)


@pytest.mark.parametrize("rule,zh,en", CASES, ids=[c[0] for c in CASES])
def test_builtin_rule_chinese_and_english(rule, zh, en):
    assert reason(zh, ZH) == rule
    if en is not None:  # Chinese-only rules: scripts, Chinese answers, Chinese code identifiers
        assert reason(en, EN) == rule
    # Switched off, the rule no longer fires (another may, but not this one).
    off = RuleSettings(lang="zh", enabled=frozenset(REASONS) - {rule})
    assert reason(zh, off) != rule


def test_good_records_pass():
    assert check(*GOOD_ZH, ZH) is None
    assert check(*GOOD_EN, EN) is None


def test_detail_says_why():
    assert check("写诗", "", "好", ZH) == ("too-short", "instruction and input have 2 words and characters, under 3")


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
    assert reason(("Rewrite the sentence in the past tense", "Ｈｅｌｌｏ　ｗｏｒｌｄ", "Hello world"), EN) == "output-equals-input"
    # Capitalising or respacing a text is a task whose right answer differs only so.
    assert reason(("Capitalise the sentence", "hello world", "Hello world"), EN) is None
    # Checking a sentence that has no error: the unchanged sentence is the answer.
    assert reason(("纠正下面句子中的错误。", "我昨天去了商店。", "我昨天去了商店。"), ZH) is None


def test_output_equals_input_near_copy_of_a_rewrite():
    # A rewrite answered by the input with a 。 added, or only its case changed, changed nothing asked.
    assert reason(("把下面的句子改成过去时。", "我每天都去跑步", "我每天都去跑步。"), ZH) == "output-equals-input"
    assert reason(("改写下面这句话：“她经常在公园里散步”", "她经常在公园里散步", "“她经常在公园里散步。”"), ZH) == "output-equals-input"
    assert reason(("Rewrite the sentence in the passive voice", "the cat caught the mouse", "The cat caught the mouse."), EN) == "output-equals-input"
    # ... but when the task is about punctuation, case or layout, that difference is the answer,
    assert reason(("给下面的句子加上标点。", "我们玩得很开心", "我们玩得很开心！"), ZH) is None
    assert reason(("将这些句子分成两段。", "天空很蓝。鸟在唱歌。草是绿的。", "天空很蓝。鸟在唱歌。\n\n草是绿的。"), ZH) is None
    # ... and on numbers and formulas a change of punctuation or sign is one.
    assert reason(("把美分换算成美元。", "103", "1.03"), ZH) is None
    assert reason(("将负数转换为正数。", "-32", "32"), ZH) is None


def test_output_equals_input_when_the_task_wants_it_unchanged():
    # Asked to give the text back, to change it only if needed, or to make sure it already conforms.
    for ins in ("将以下文本粘贴到新文档中。输出文本。", "为我转录以下句子。", "必要时插入逗号。",
                "如果句子语气不一致，请重写句子。", "编辑这句话，并确保主语和动词一致。"):
        assert reason((ins, "明天我会为朋友烤纸杯蛋糕。", "明天我会为朋友烤纸杯蛋糕。"), ZH) is None, ins
    assert reason(("Paste the following text into a new document.", "This is an example.", "This is an example."), EN) is None
    # A quoted word is material, not the task: “确保” asks for nothing to be ensured.
    assert reason(("使用及物动词“确保”重写句子。", "确保数据准确无误。", "确保数据准确无误。"), ZH) == "output-equals-input"
    # The instruction carries its own sentence and the input is an edited version of it: the
    # output answers the instruction. When the instruction quotes the input itself, it is a copy.
    assert reason(("改写下面的句子，使它更简洁：“这本书真的非常非常有趣。”", "这本书很有趣。", "这本书很有趣。"), ZH) is None
    assert reason(("改写下面的句子，使它更简洁：“这本书真的非常非常有趣。”", "这本书真的非常非常有趣。", "这本书真的非常非常有趣。"), ZH) == "output-equals-input"


def test_output_equals_input_correction_and_order_words_that_ask_for_a_change():
    # 更正式 is not 更正, a new sentence is asked even when it must be grammatical, and reordering
    # the words of one sentence asks for another sentence.
    assert reason(("以更正式的方式重写这句话。", "我不想上课。", "我不想上课。"), ZH) == "output-equals-input"
    assert reason(("根据下面的例句，生成一个新的、语法正确的句子。", "我去商店买了一些橙子。", "我去商店买了一些橙子。"), ZH) == "output-equals-input"
    assert reason(("重新排列下面句子中的词语，使它更合乎逻辑。", "医生用X射线诊断疾病。", "医生用X射线诊断疾病。"), ZH) == "output-equals-input"
    # A list already in order, several sentences already in order, a sentence without errors: unchanged is right.
    assert reason(("按字母顺序排列下列水果。", "苹果、香蕉、橙子", "苹果、香蕉、橙子"), ZH) is None
    assert reason(("按时间顺序排列下列句子。", "我起床了。我吃了早饭。我去上学了。", "我起床了。我吃了早饭。我去上学了。"), ZH) is None
    assert reason(("用正确的语法重写这句话。", "他不想来", "他不想来。"), ZH) is None


def test_output_language_names_and_code_are_not_english_answers():
    # Restaurant names and song titles are capitalised; the answer around them is Chinese.
    names = "市中心附近不错的餐厅包括The Old Anchor，La Laiterie，The Twisted Lemon，Alice's Restaurant and Bar，The Little Piggy，The Boathouse和The Fall Tree。"
    assert reason(("在市中心附近给我找一家不错的餐厅。", "", names), ZH) is None
    # Python code with English strings, though no line opens with def or ends with a brace.
    code = 'if temperature > 25:\n    print("It is hot outside.")\nelse:\n    print("It is a comfortable temperature.")'
    assert reason(("生成一个 if-else 语句：如果温度大于25度，打印“外面很热”，否则打印“温度很舒适”。", "", code), ZH) is None
    # English prose stays the wrong language, with Chinese words in it or not.
    assert reason(("介绍一下长城。", "", "长城 is a series of walls that were built across the northern borders of the ancient empire."), ZH) == "output-language"


def test_output_too_short_only_when_the_long_form_is_what_is_asked():
    # The topic asked, not the essay it is for; a question the hero must answer, not the story;
    # the summary of an article, not the article.
    assert reason(("选择一个主题来写一篇文章。", "", "学习外语的好处。"), ZH) is None
    assert reason(("写一个主人公在故事中必须回答的问题。", "主角是一个迷茫的年轻女孩。", "我想成为什么样的人？"), ZH) is None
    assert reason(("写一篇文章的摘要。", "文章讨论了电动汽车在中国的兴起和它带来的变化。", "电动汽车正在兴起。"), ZH) is None
    # A yes/no or one-number question may take one character.
    assert reason(("这句话是事实吗？回答是或否。", "地球绕着太阳转。", "是"), ZH) is None
    assert reason(("计算 17 和 5 的和。", "", "22"), ZH) is None
    # The essay, letter or poem asked, with or without the means named, is still one.
    assert reason(("用“太阳”和“月亮”来写一首诗。", "", "太阳月亮。"), ZH) == "output-too-short"
    assert reason(("给老师写一封感谢信。", "", "谢谢老师！"), ZH) == "output-too-short"


def test_digits_formulas_urls_and_names_do_not_vote_for_a_script():
    # Each was rejected as wrong-language or too-short on the 52K Chinese set.
    for text in ("-625是什么类型的数字？", "计算 3x^2 + 2x - 5 = 0 的根", "比较和对比Google Home和Amazon Echo。",
                 "iOS和安卓手机有什么区别？", "总结 https://www.example.org/a-long-article-name 的内容", "解释熵"):
        assert reason((text, "", "这是一个足够长的回答，内容完整，讲清楚了要点。"), ZH) is None, text
    assert reason(("将下面的句子翻译成法语：I love reading books in the morning.", "", "J'aime lire le matin."), ZH) is None


def test_simplified_and_traditional_are_different_targets():
    hans = ("解释一下光合作用的过程。", "", "光合作用是植物利用光能制造养分的过程。")
    hant = ("解釋一下光合作用的過程。", "", "光合作用是植物利用光能製造養分的過程。")
    assert reason(hans, ZH) is None and reason(hant, RuleSettings(lang="zh-Hant")) is None
    assert reason(hans, RuleSettings(lang="zh-Hant")) == "wrong-script"
    assert reason(hant, ZH) == "wrong-script"
    assert variant_counts("後") == (1, 0) and variant_counts("后") == (0, 0)  # 后 serves both scripts
    assert reason(("把这句话翻译成日语", "她是一位优秀的老师", "彼女は優秀な教師です。"), ZH) is None  # kanji keep old forms


def test_blacklist_medium_as_task_not_as_topic():
    for topic in ("写一篇影片评论。", "介绍一个在线照片编辑器。", "解释文件系统的作用。", "短视频平台为什么流行？", "描述一幅画的常见构图。",
                  "列出使用Blender创建3D模型的步骤。", "创建一个类比来解释照片编辑的过程。"):
        assert reason((topic, "", "这是一个足够长的回答，内容完整，讲清楚了要点。"), ZH) is None, topic
    for task in ("画一张猫的图。", "看这段视频并总结。", "上传文件到网站。", "描述这张照片。", "解释光合作用，并配一张图片。",
                 "创建一个动画来解释 AI 是什么以及它是如何工作的。"):  # what the animation is for does not excuse making it
        assert reason((task, "", "这是一个足够长的回答，内容完整，讲清楚了要点。"), ZH) == "blacklist", task
    # A photo the record describes in words can be worked on.
    assert reason(("描述给定的照片。", "一张女孩坐在田野里拿着一篮花的照片，背景是蓝天", "女孩坐在田野里。"), ZH) is None


def test_refusal_only_opening_a_short_answer():
    assert reason(("写一段对话。", "", "甲：帮我搬家吧。乙：抱歉，我无法帮你，我明天要上班。"), ZH) is None
    assert reason(("改写成非正式的语气。", "我很遗憾地通知你，我将无法出席。", "抱歉，我无法参加。"), ZH) is None
    assert reason(("写一首诗。", "", "抱歉，我无法完成这个任务。"), ZH) == "refusal"


def test_generate_leaves_personal_data_to_filter():
    # A teacher's phone numbers are invented, and extracting one is a fair task.
    record = ("从下面的文字中找出手机号码。", "请拨打13912345678联系我。", "13912345678")
    assert "pii" not in RuleSettings().enabled and reason(record, RuleSettings(lang="zh")) is None
    assert reason(record, ZH) == "pii"


def test_pii_kinds_with_their_checksums():
    kinds = lambda text: [k for k, _, _ in find_pii(text)]
    assert kinds("邮箱 zhang.san@qq.com") == ["email"]
    assert kinds("写信到 someone@example.com") == []  # documentation addresses name no one
    assert kinds("手机 13812345678，台湾 0912-345-678，座机 (02) 2345-6789") == ["phone", "phone", "phone"]
    assert kinds("身份证 11010519491231002X") == ["resident-id"]
    assert kinds("身份证 110105194912310021") == []  # wrong check character
    assert kinds("卡号 4111 1111 1111 1111") == ["bank-card"]
    assert kinds("卡号 4111 1111 1111 1112") == []  # fails Luhn
    assert kinds("斜边是 6.4031242374328485") == []  # a decimal fraction
    assert kinds("服务器 192.168.1.20") == ["ip-address"]
    assert redact_pii("打 13812345678 或写信到 a.b@qq.com") == ("打 [PHONE] 或写信到 [EMAIL]", 2)


def test_script_and_measure():
    assert script_of("你好世界") == "zh"
    assert script_of("こんにちは世界") == "ja"
    assert script_of("hello world") == "latin"
    assert script_of("。。") == "none"
    assert measure("你好 世界") == (4, "chars")
    assert script_of("用Python写一个list排序函数") == "zh"
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


@pytest.mark.parametrize("phrase", REFUSALS)
def test_every_refusal_fires_as_written_by_a_model(phrase):
    # Models write full-width commas and capitals; the list is written folded.
    written = phrase.replace(",", "，") if script_of(phrase) == "zh" else phrase.capitalize()
    settings = ZH if script_of(phrase) == "zh" else EN
    settings = RuleSettings(lang=settings.lang, enabled=frozenset(REASONS) - {"wrong-script"})  # 作為… is Traditional
    zh = settings.lang == "zh"
    good = GOOD_ZH if zh else GOOD_EN
    assert reason((good[0], "", f"{written} 这个请求。" if zh else f"{written} do that for you."), settings) == "refusal"


def test_translated_sql_is_code_translated_even_on_one_line():
    for sql in ("更新用户设置年龄 = 35，其中 user_id = 1;", "从订单中选择计数（*）;", "创建表客户 （ id INT, 名字 瓦尔查尔（255） );"):
        assert reason(("构造一个 SQL 查询。", "", sql), ZH) == "code-translated", sql
    # Naming SQL's operations, or prose about them, is not translated code.
    assert reason(("命名用于查询数据库的三个 SQL 操作。", "", "选择、插入、更新。"), ZH) is None
    assert reason(("什么是 SQL 查询？", "", "SQL 查询是用结构化查询语言编写的语句，用于从数据库中检索、插入、更新或删除信息。"), ZH) is None
    assert reason(("构造一个 SQL 查询。", "", "UPDATE users SET age = 35 WHERE user_id = 1;"), ZH) is None
