"""Seed tasks: read Self-Instruct, BELLE and plain Alpaca files into one shape."""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from selfinstruct.errors import InputError

_HINT = "fix that line, or see seeds/README.md for the accepted schemas"
# Characters of one seed task (instruction plus every input and output). Prompts show a few seed
# tasks together, so a longer one cannot fit a teacher's context; a 10 MB line is a broken file.
MAX_TASK_CHARS = 32_000


@dataclass(frozen=True)
class Instance:
    """One worked example of a seed task."""

    input: str
    output: str


@dataclass(frozen=True)
class SeedTask:
    """A seed task, whichever file format it came from."""

    id: str
    name: str
    instruction: str
    instances: tuple[Instance, ...]
    is_classification: bool = False
    line: int = 0


@dataclass(frozen=True)
class SeedSet:
    """The seed tasks of one file, with what the manifest and card need to know about it."""

    path: Path
    tasks: tuple[SeedTask, ...]
    sha256: str
    license: str | None = None
    extra: dict = field(default_factory=dict)


def _wide_encoding(data: bytes) -> str | None:
    """UTF-16 or UTF-32, from a byte-order mark or from where the NUL bytes fall; None for anything else."""
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if data.startswith(bom):
            return name
    # JSON text never holds a raw NUL byte, but every ASCII character of UTF-16 (one of two bytes)
    # and UTF-32 (three of four) comes with them, which UTF-8 decoding accepts without complaint.
    head = data[:4096]
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if not even and not odd:
        return None
    if odd > 2 * even:
        return "UTF-16 little-endian"
    if even > 2 * odd:
        return "UTF-16 big-endian"
    return "UTF-32"


def _decode(path: Path, data: bytes) -> str:
    """Decode UTF-8 (with or without BOM), else GB18030 (a GBK superset), else fail clearly."""
    wide = _wide_encoding(data)
    if wide is not None:
        raise InputError(f"{path}: the file is {wide}, not UTF-8", f"save it as UTF-8, e.g. iconv -f {wide.split()[0]} -t UTF-8 FILE > FILE.utf8")
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise InputError(f"{path}: not UTF-8 or GBK text", "save the file as UTF-8")


def _text(value: object, where: str, key: str, required: bool) -> str:
    if value is None:
        if required:
            raise InputError(f"{where}: missing `{key}`", _HINT)
        return ""
    if not isinstance(value, str):  # a number too: 42 as an instruction is a broken file, not the text "42"
        raise InputError(f"{where}: `{key}` must be a string, got {type(value).__name__}", _HINT)
    return value


def _task(obj: object, where: str, line: int, index: int, stem: str) -> SeedTask:
    """Turn one JSON object (Self-Instruct or Alpaca shape) into a SeedTask."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}", _HINT)
    instruction = _text(obj.get("instruction"), where, "instruction", required=True).strip()
    if not instruction:
        raise InputError(f"{where}: `instruction` is empty", _HINT)
    if "instances" in obj:
        raw = obj["instances"]
        if not isinstance(raw, list) or not raw:
            raise InputError(f"{where}: `instances` must be a non-empty list of {{input, output}}", _HINT)
        instances = []
        for k, inst in enumerate(raw):
            if not isinstance(inst, dict):
                raise InputError(f"{where}: instances[{k}] must be an object with input and output", _HINT)
            instances.append(
                Instance(
                    _text(inst.get("input"), where, f"instances[{k}].input", required=False),
                    _text(inst.get("output"), where, f"instances[{k}].output", required=True),
                )
            )
    else:
        instances = [
            Instance(
                _text(obj.get("input"), where, "input", required=False),
                _text(obj.get("output"), where, "output", required=True),
            )
        ]
    size = len(instruction) + sum(len(i.input) + len(i.output) for i in instances)
    if size > MAX_TASK_CHARS:
        raise InputError(
            f"{where}: seed task is {size:,} characters, over the {MAX_TASK_CHARS:,} that fit in a prompt with other examples",
            "shorten or split that task",
        )
    cls = obj.get("is_classification", False)
    if not isinstance(cls, bool):
        raise InputError(f"{where}: `is_classification` must be true or false", _HINT)
    task_id = obj.get("id")
    task_id = str(task_id) if task_id not in (None, "") else f"{stem}-{index + 1}"
    name = obj.get("name")
    return SeedTask(
        id=task_id,
        name=str(name) if name else "",
        instruction=instruction,
        instances=tuple(instances),
        is_classification=cls,
        line=line,
    )


def read_seeds(path: Path, license: str | None = None) -> SeedSet:
    """Read a seed file: JSONL (any extension) or a JSON list; every error names FILE:LINE."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such seed file", "pass --seeds with an existing file, e.g. seeds/zh.jsonl") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})", "check the path and permissions") from None
    text = _decode(path, data)
    stem = path.stem
    tasks: list[SeedTask] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})", _HINT) from None
        for k, obj in enumerate(items):
            tasks.append(_task(obj, f"{path}: item {k + 1}", 0, k, stem))
    else:
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})", _HINT) from None
            tasks.append(_task(obj, where, line_no, len(tasks), stem))
    if not tasks:
        raise InputError(f"{path}: no seed tasks in the file", "add at least one task; see seeds/README.md")
    seen: dict[str, SeedTask] = {}
    for task in tasks:
        if task.id in seen:
            raise InputError(f"{path}:{task.line}: duplicate id {task.id!r} (first at line {seen[task.id].line})", _HINT)
        seen[task.id] = task
    return SeedSet(path=path, tasks=tuple(tasks), sha256=hashlib.sha256(data).hexdigest(), license=license or declared_license(path))


def declared_license(path: Path) -> str | None:
    """The SPDX id in a REUSE-style sidecar `<seed file>.license`, if there is one."""
    sidecar = path.with_name(path.name + ".license")
    if not sidecar.exists():
        return None
    for line in sidecar.read_text(encoding="utf-8").splitlines():
        if "SPDX-License-Identifier:" in line:
            return line.split("SPDX-License-Identifier:", 1)[1].strip() or None
    return None
