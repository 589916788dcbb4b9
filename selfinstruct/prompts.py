"""Prompt templates: Jinja files rendered with strict undefined variables into chat messages."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from selfinstruct.errors import InputError

_ROLE_LINE = re.compile(r"^<<(system|user|assistant)>>[ \t]*$", re.MULTILINE)
# The template's own marker lines are swapped for this before compiling, so that a `<<system>>` line
# inside a seed, an input or an evolved instruction is text and can never start a message: the
# split happens on markers only the template source could have written.
_NONCE = secrets.token_hex(16)
_SENTINEL = re.compile(rf"<<(system|user|assistant):{_NONCE}>>[ \t]*")


def prompts_dir() -> Path:
    """The shipped templates: inside the wheel, or the repo's prompts/ in an editable install."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "prompts", here.parent / "prompts"):
        if candidate.is_dir():
            return candidate
    raise InputError("the shipped prompts/ directory is missing", "reinstall selfinstruct")


@dataclass(frozen=True)
class Template:
    """A loaded template: its name, source hash and compiled form."""

    name: str
    path: Path
    sha256: str
    compiled: jinja2.Template

    def render(self, **variables: Any) -> list[dict[str, str]]:
        """Render to chat messages; an undefined variable is a user error naming the file and line."""
        try:
            text = self.compiled.render(**variables)
        except jinja2.UndefinedError as exc:
            line = _error_line(exc, str(self.path))
            raise InputError(
                f"{self.path}{line}: undefined variable in template ({exc.message})",
                f"templates may use: {', '.join(sorted(variables))}",
            ) from None
        except jinja2.TemplateError as exc:
            raise InputError(f"{self.path}{_error_line(exc, str(self.path))}: template error ({exc})", "fix the template") from None
        return _split(_SENTINEL, text)


def _error_line(exc: Exception, filename: str) -> str:
    """The template line of a render error, read from the traceback Jinja rewrites."""
    lineno = getattr(exc, "lineno", None)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename in (filename, "<template>"):
            lineno = tb.tb_lineno
        tb = tb.tb_next
    return f":{lineno}" if lineno else ""


def split_messages(text: str) -> list[dict[str, str]]:
    """Split rendered text on `<<role>>` lines; text with no marker is one user message."""
    return _split(_ROLE_LINE, text)


def _split(markers: re.Pattern, text: str) -> list[dict[str, str]]:
    parts = markers.split(text)
    messages = []
    if parts[0].strip():
        messages.append({"role": "user", "content": parts[0].strip()})
    for role, content in zip(parts[1::2], parts[2::2]):
        if content.strip():
            messages.append({"role": role, "content": content.strip()})
    return messages


def load_template(name_or_path: str | Path) -> Template:
    """Load a template by shipped name (e.g. `generate_zh.jinja`) or by file path."""
    path = Path(name_or_path)
    if not path.exists():
        shipped = prompts_dir() / str(name_or_path)
        if not shipped.exists():
            raise InputError(f"{name_or_path}: no such template", f"pass a file path, or a name in {prompts_dir()}")
        path = shipped
    try:
        source = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read template ({exc})", "save it as UTF-8 text") from None
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    try:
        compiled = env.from_string(_ROLE_LINE.sub(lambda m: f"<<{m.group(1)}:{_NONCE}>>", source))
    except jinja2.TemplateSyntaxError as exc:
        raise InputError(f"{path}:{exc.lineno}: template syntax error ({exc.message})", "fix the Jinja syntax") from None
    compiled.filename = str(path)
    return Template(
        name=path.name,
        path=path,
        sha256=hashlib.sha256(source.encode("utf-8")).hexdigest(),
        compiled=compiled,
    )


def generation_template_name(lang: str) -> str:
    """The shipped generation template for a language."""
    return f"generate_{lang}.jinja"
