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
    return "" if stripped.lower() in _NO_INPUT else stripped


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
    instruction = fields.get("instruction", "").strip()
    output = fields.get("output", "").strip()
    if not instruction:
        return ParsedItem(index, "", "", "", raw, "unparseable", "no instruction found")
    if "output" not in fields:
        return ParsedItem(index, instruction, "", "", raw, "unparseable", "no output found")
    return ParsedItem(index, instruction, normalise_input(fields.get("input", "")), output, raw)


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
