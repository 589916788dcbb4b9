"""Redaction: what a public artefact (card, manifest, log) must not show: secrets, endpoints, the maker's disk layout."""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PureWindowsPath
from typing import Iterable

_SECRET_LIKE = re.compile(r"(sk-[A-Za-z0-9_-]{8,}|hf_[A-Za-z0-9]{8,})")
_SECRET_FLAG = re.compile(r"(--[\w-]*(?:key|token|secret|password)[\w-]*)(=|\s+)(?!-)(\S+)", re.IGNORECASE)
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_LOCAL_PATH = re.compile(r"^(?:/|~|[A-Za-z]:[\\/]|\\\\)")  # /abs, ~/x, C:\x or C:/x, \\server\share


def mask_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask the given secrets, anything shaped like a key, and values of key/token flags."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    # --api-key-env NAME names a variable, not a secret: keep it so the command stays reproducible.
    text = _SECRET_FLAG.sub(lambda m: m.group(0) if m.group(1).endswith("-env") else f"{m.group(1)}{m.group(2)}***", text)
    return _SECRET_LIKE.sub("***", text)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """A command line fit for a public card: secrets masked, every URL hidden (endpoints can be private), ~ for home."""
    text = _URL.sub("<endpoint>", mask_secrets(text, secrets))
    home = str(Path.home())
    return text.replace(home, "~") if len(home) > 1 else text


def file_name(path: str) -> str:
    """The last part of a local path (POSIX or Windows): where a file sat on the maker's disk is private."""
    return PureWindowsPath(path).name or path


def local_paths_to_names(command: str) -> str:
    """A command line with every absolute or ~ path (alone or as --flag=PATH) cut to its file name; relative paths stay."""
    try:
        args = shlex.split(command)
    except ValueError:  # unbalanced quotes: fall back to whitespace-separated words
        args = command.split()

    def short(arg: str) -> str:
        flag, eq, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
        return flag + eq + file_name(value) if _LOCAL_PATH.match(value) else arg

    shortened = [short(a) for a in args]
    return command if shortened == args else shlex.join(shortened)  # untouched commands keep their exact spelling
