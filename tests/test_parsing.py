"""Reply parsing: Chinese and English numbered lists, JSON mode, quirks, and failures kept as data."""

from __future__ import annotations

from hypothesis import given, strategies as st

from selfinstruct.parsing import normalise_input, parse_reply

ZH = """好的，下面是任务：
1. 指令：解释什么是光合作用。
输入：<无输入>
输出：光合作用是植物利用光能把二氧化碳和水变成有机物的过程。
###
2. 指令: 把下面的句子翻译成英文
输入: 我爱北京
输出: I love Beijing.
###
3. 指令：写一段产品介绍
输出：这款保温杯……
问题：这一行属于输出。
###
希望对你有帮助！"""


def test_chinese_numbered_list_with_both_colons():
    items = parse_reply(ZH, "stop")
    assert [i.instruction for i in items] == ["解释什么是光合作用。", "把下面的句子翻译成英文", "写一段产品介绍"]
    assert items[0].input == "" and items[1].input == "我爱北京"
    assert items[2].output.endswith("问题：这一行属于输出。")
    assert all(i.problem is None for i in items)


def test_english_alpaca_style_numbers_on_every_label():
    text = "1. Instruction: Name three rivers.\n1. Input:\n<noinput>\n1. Output:\nNile, Amazon, Yangtze\n###\n2. Instruction: Add the numbers.\n2. Input: 1, 2\n2. Output: 3"
    items = parse_reply(text)
    assert [(i.instruction, i.input, i.output) for i in items] == [
        ("Name three rivers.", "", "Nile, Amazon, Yangtze"),
        ("Add the numbers.", "1, 2", "3"),
    ]


def test_traditional_labels_markdown_and_no_separators():
    text = "**1. 指令**：介紹夜市文化\n**輸入**：<無輸入>\n**輸出**：夜市是台灣……\n2. 指令：列出三種小吃\n輸出：蚵仔煎、臭豆腐、珍珠奶茶"
    items = parse_reply(text)
    assert [i.instruction for i in items] == ["介紹夜市文化", "列出三種小吃"]
    assert items[0].input == "" and items[1].output.startswith("蚵仔煎")


def test_truncated_reply_drops_only_the_last_item():
    cut = ZH.rsplit("###", 1)[0] + "###\n4. 指令：写一个故事\n输出：从前有"
    items = parse_reply(cut, "length")
    assert [i.problem for i in items] == [None, None, None, "truncated"]
    assert items[-1].raw.startswith("4. 指令")


def test_json_mode_think_blocks_and_code_fences():
    text = '<think>let me plan</think>\n```json\n{"tasks": [{"instruction": "列出三个成语", "input": "", "output": "画蛇添足"}, "oops", {"input": "x"}]}\n```'
    items = parse_reply(text, "stop", json_mode=True)
    assert items[0].instruction == "列出三个成语" and items[0].problem is None
    assert items[1].problem == "unparseable" and items[2].problem == "unparseable"


def test_garbage_is_one_unparseable_item_with_raw_text():
    items = parse_reply("I'm not able to produce a list today.")
    assert len(items) == 1 and items[0].problem == "unparseable"
    assert items[0].raw == "I'm not able to produce a list today."


def test_item_without_output_is_unparseable():
    items = parse_reply("1. 指令：只有指令没有输出\n###\n2. 指令：完整的\n输出：好")
    assert items[0].problem == "unparseable" and items[1].problem is None


def test_empty_reply_cut_by_length_is_recorded():
    items = parse_reply("", "length")
    assert len(items) == 1 and items[0].problem == "truncated"


def test_no_input_spellings():
    for spelling in ("<无输入>", "<noinput>", "无", "N/A", " <無輸入> ", ""):
        assert normalise_input(spelling) == ""
    assert normalise_input("无人机") == "无人机"


@given(st.text(max_size=400), st.sampled_from([None, "stop", "length"]), st.booleans())
def test_parse_never_raises(text, finish, json_mode):
    for item in parse_reply(text, finish, json_mode):
        assert item.problem in (None, "unparseable", "truncated")


def test_placeholder_spellings_of_no_input_become_empty():
    for spelling in ("{noinput}", "<noinput>", "<无输入>", "[noinput]", "{无输入}", "【无输入】", "(no input)", "N/A", "n/a.", "<No_Input>"):
        assert normalise_input(spelling) == "", spelling
    # Real inputs that merely look bracketed stay.
    for real in ("[1, 2, 3]", '<input type="text">', "{\"a\": 1}", "N/A 表示不适用"):
        assert normalise_input(real) == real


def test_a_leaked_noinput_marker_is_stripped_from_the_instruction():
    # JSON mode, a real llama.cpp teacher: the marker ended up glued to the instruction.
    reply = '{"tasks": [{"instruction": "{noinput}A room is 5 meters long and 4 meters wide. What is its area?", "input": "{noinput}", "output": "20 square meters."},' \
            ' {"instruction": "把下面的句子翻译成英文<无输入>", "input": "我爱北京", "output": "<noinput> I love Beijing."}]}'
    first, second = parse_reply(reply, "stop", json_mode=True)
    assert first.problem is None and first.instruction == "A room is 5 meters long and 4 meters wide. What is its area?" and first.input == ""
    assert second.problem is None and second.instruction == "把下面的句子翻译成英文" and second.output == "I love Beijing."


def test_a_marker_inside_the_instruction_or_a_fill_in_input_is_rejected():
    reply = """1. Instruction: Summarise the <noinput> article below.
Input: An article about tides.
Output: Tides come from the moon.
###
2. Instruction: Translate the sentence into French.
Input: [insert sentence here]
Output: Voici la phrase.
###
3. 指令：总结下面的段落。
输入：【在此插入段落】
输出：这段话讲的是潮汐。
###
4. Instruction: Fix the bug in this function.
Input: {input}
Output: Done."""
    items = parse_reply(reply, "stop")
    assert [i.problem for i in items] == ["unparseable"] * 4
    assert "<noinput>" in items[0].detail and "[insert sentence here]" in items[1].detail
    assert "placeholder" in items[2].detail and "{input}" in items[3].detail
