"""Tolerant parsing of teacher replies into task items; what cannot be parsed is kept as data."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"^\s*```[\w-]*\s*\n(.*?)\n?```\s*$", re.DOTALL)
_SEPARATOR = re.compile(r"^\s*#{3,}\s*$", re.MULTILINE)

# Kept narrow on purpose: words like 问题/question often start lines inside real outputs.
_INSTRUCTION = r"指令|指示|instruction"
_INPUT = r"输入|輸入|input"
_OUTPUT = r"输出|輸出|回答|output|response|answer"
# A field label at the start of a line: optional item number, optional markdown emphasis,
# the label, optional emphasis again, then a half- or full-width colon.
_LABEL = re.compile(
    rf"^[ \t>*_#-]*(?:(?P<num>\d+)\s*[.、)．:：]\s*)?[*_]*\s*(?P<label>{_INSTRUCTION}|{_INPUT}|{_OUTPUT})\s*[*_]*\s*[:：]\s*[*_]*[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
# "No input" written as a tag, the way templates show it: <noinput>, {noinput}, [noinput], <无输入>, 【无输入】…
_NO_INPUT_TAG = r"[<{\[(（【]\s*(?:no[\s_-]*input|无输入|無輸入)\s*[>}\])）】]"
_NO_INPUT_TAG_RE = re.compile(_NO_INPUT_TAG, re.IGNORECASE)
_EDGE_TAGS_RE = re.compile(rf"^(?:\s*{_NO_INPUT_TAG})+\s*|(?:\s*{_NO_INPUT_TAG})+\s*$", re.IGNORECASE)
# An input that is a fill-in-the-blank instead of content: [insert text here], <your code>, 【在此插入段落】,
# {input}, {{ input }}. Bracketed data ([1, 2, 3], <input type="text">, {"a": 1}) has none of these words.
_FILL_IN_RE = re.compile(
    r"""^(?:
        [\[【]\s*(?:insert|enter|paste|add|put|your|placeholder|sample|在此|此处|这里|這裡|此處|插入|填写|填寫|填入|粘贴|貼上)[^\[\]【】\n]{0,80}[\]】]
      | <\s*(?:insert|enter|paste|your|placeholder|在此|此处|插入|填写)[^<>\n]{0,80}>
      | \{\{?\s*(?:input|insert|placeholder|text|输入|輸入)[^{}\n]{0,40}\}\}?
    )$""",
    re.IGNORECASE | re.VERBOSE,
)
_NO_INPUT = {
    "", "<无输入>", "<無輸入>", "<noinput>", "<no input>", "无输入", "無輸入", "无", "無", "空",
    "none", "n/a", "no input", "<none>", "(无)", "（无）", "<无>", "<無>", "null", "-",
}


@dataclass(frozen=True)
class ParsedItem:
    """One item of a reply: a task, or the raw text and why it could not be used."""

    index: int
    instruction: str
    input: str
    output: str
    raw: str
    problem: str | None = None  # a rejection reason: unparseable or truncated
    detail: str = ""


def _kind(label: str) -> str:
    label = label.lower()
    if re.fullmatch(_INSTRUCTION, label, re.IGNORECASE):
        return "instruction"
    if re.fullmatch(_INPUT, label, re.IGNORECASE):
        return "input"
    return "output"


def clean_reply(content: str) -> str:
    """Drop reasoning blocks and an enclosing code fence, which some teachers add."""
    text = _THINK.sub("", content or "").strip()
    fenced = _FENCE.match(text)
    return fenced.group(1).strip() if fenced else text


def normalise_input(value: str) -> str:
    """Map the many spellings of "no input" to the empty string."""
    stripped = value.strip()
    folded = stripped.lower().rstrip(".。")
    return "" if folded in _NO_INPUT or _NO_INPUT_TAG_RE.fullmatch(stripped) else stripped


def strip_markers(text: str) -> str:
    """The text without a "no input" tag a model glued to its start or end ("{noinput}A room is…")."""
    return _EDGE_TAGS_RE.sub("", text).strip()


def placeholder_problem(instruction: str, input: str) -> str | None:
    """Why an item still holds a template placeholder (a "no input" tag mid-instruction, a fill-in input), or None."""
    tag = _NO_INPUT_TAG_RE.search(instruction)
    if tag:
        return f"the instruction holds a {tag.group(0)} marker"
    if _FILL_IN_RE.match(input.strip()):
        return f"the input is a placeholder, not content: {input.strip()[:60]!r}"
    return None


def _from_json(text: str) -> list[dict] | None:
    """Tasks from a JSON reply ({"tasks": [...]}, a bare list, or one task), or None."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        data, _ = json.JSONDecoder().raw_decode(text[start:])
    except ValueError:
        return None
    if isinstance(data, dict):
        for key in ("tasks", "data", "items", "instructions", "任务"):
            if isinstance(data.get(key), list):
                return data[key]
        return [data]
    return data if isinstance(data, list) else None


def _item_from_fields(index: int, fields: dict[str, str], raw: str) -> ParsedItem:
    instruction = strip_markers(fields.get("instruction", ""))
    output = strip_markers(fields.get("output", ""))
    if not instruction:
        return ParsedItem(index, "", "", "", raw, "unparseable", "no instruction found")
    if "output" not in fields:
        return ParsedItem(index, instruction, "", "", raw, "unparseable", "no output found")
    input_text = normalise_input(fields.get("input", ""))
    problem = placeholder_problem(instruction, input_text)
    if problem:
        return ParsedItem(index, instruction, input_text, output, raw, "unparseable", problem)
    return ParsedItem(index, instruction, input_text, output, raw)


def _parse_json_items(items: list) -> list[ParsedItem]:
    parsed = []
    for k, obj in enumerate(items):
        raw = json.dumps(obj, ensure_ascii=False)
        if not isinstance(obj, dict):
            parsed.append(ParsedItem(k, "", "", "", raw, "unparseable", "JSON item is not an object"))
            continue
        fields = {}
        for key, value in obj.items():
            if isinstance(key, str) and re.fullmatch(f"{_INSTRUCTION}|{_INPUT}|{_OUTPUT}", key, re.IGNORECASE):
                fields.setdefault(_kind(key), "" if value is None else str(value))
        parsed.append(_item_from_fields(k, fields, raw))
    return parsed


def _chunks(text: str) -> list[str]:
    """Split a numbered list into item texts: on ### lines and where a new instruction label starts."""
    chunks = []
    for block in _SEPARATOR.split(text):
        # A new item starts at a numbered instruction label; an unnumbered one may be output text.
        starts = [
            m.start()
            for i, m in enumerate(_LABEL.finditer(block))
            if _kind(m.group("label")) == "instruction" and (m.group("num") or i == 0)
        ]
        if not starts:
            chunks.append(block)
            continue
        if block[: starts[0]].strip():
            chunks.append(block[: starts[0]])
        for a, b in zip(starts, starts[1:] + [len(block)]):
            chunks.append(block[a:b])
    return [c.strip() for c in chunks if c.strip()]


def _fields(chunk: str) -> dict[str, str]:
    """The labelled fields of one item, in order instruction, input, output; the output runs to the end."""
    order = {"instruction": 0, "input": 1, "output": 2}
    marks = []
    for m in _LABEL.finditer(chunk):
        kind = _kind(m.group("label"))
        if marks and order[kind] <= order[marks[-1][0]]:
            continue  # a label-like line inside a field's text, not a new field
        marks.append((kind, m))
        if kind == "output":
            break  # everything after the output label is output, whatever it looks like
    fields: dict[str, str] = {}
    for (kind, m), nxt in zip(marks, marks[1:] + [None]):
        fields[kind] = chunk[m.end() : nxt[1].start() if nxt else len(chunk)].strip()
    return fields


def parse_reply(content: str, finish_reason: str | None = None, json_mode: bool = False) -> list[ParsedItem]:
    """Parse a reply into items; never raises. A reply cut by the length limit loses only its last item."""
    text = clean_reply(content)
    items: list[ParsedItem] = []
    json_items = _from_json(text) if (json_mode or text[:1] in "{[") else None
    if json_items is not None:
        items = _parse_json_items(json_items)
    else:
        labelled = False
        for chunk in _chunks(text):
            fields = _fields(chunk)
            if not fields:
                continue  # chatter before or after the list ("好的，以下是…"), not an item
            labelled = True
            items.append(_item_from_fields(len(items), fields, chunk))
        if not labelled and text:
            items.append(ParsedItem(0, "", "", "", text, "unparseable", "no task items found in the reply"))
    if finish_reason == "length" and items:
        last = items[-1]
        items[-1] = ParsedItem(last.index, last.instruction, last.input, last.output, last.raw, "truncated", "reply was cut by the token limit")
    if not items and finish_reason == "length":
        items.append(ParsedItem(0, "", "", "", content or "", "truncated", "empty reply cut by the token limit"))
    return items


# What to do about a reply the server's context cut: the prompt and the reply must fit in it together.
CONTEXT_FIX = ("fewer --num-examples or --per-request, or a bigger context (--ctx-size with --local; "
               "llama.cpp's -c, vLLM's --max-model-len)")


# No server runs a context smaller than this: a shorter prompt + reply stopped by "length" hit some other limit.
SMALLEST_CONTEXT = 512


def context_cut(finish_reason: str | None, usage: dict | None, max_tokens: int | None) -> str | None:
    """Why a reply stopped, when it was the server's context and not --max-tokens: finish_reason length
    with fewer completion tokens than were allowed (prompt + completion filled the context). Else None."""
    if finish_reason != "length" or not usage or usage.get("estimated") or not max_tokens:
        return None
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    if not prompt or completion >= max_tokens or prompt + completion < SMALLEST_CONTEXT:
        return None
    return (f"reply was cut by the server's context, not --max-tokens {max_tokens}: prompt {prompt:,} + reply "
            f"{completion:,} = {prompt + completion:,} tokens filled it")
