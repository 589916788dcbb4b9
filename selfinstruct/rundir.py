"""The run directory: append-only JSONL files plus an atomically rewritten manifest."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

from selfinstruct.errors import InputError, OutputError

RECORDS = "records.jsonl"
REJECTED = "rejected.jsonl"
LEDGER = "requests.jsonl"
# Valid generated records beyond --n, held back so a later, larger --n uses them instead of paying again.
SURPLUS = "surplus.jsonl"
MANIFEST = "manifest.json"
# What `selfinstruct filter --out DIR` writes beside its REJECTED: kept records in one format, and a report.
FILTER_KEPT = {"jsonl": "kept.jsonl", "parquet": "kept.parquet"}
FILTER_REPORT = "filter_report.json"


def dump_line(obj: Any) -> str:
    """One JSON line, UTF-8 text kept readable."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Read a JSONL file; a torn last line (from kill -9) is dropped, and cut off when `repair`."""
    if not path.exists():
        return []
    data = path.read_bytes()
    rows: list[dict] = []
    good_end = 0
    pos = 0
    line_no = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        line_no += 1
        raw = data[pos:end]
        last = end >= len(data)
        if raw.strip():
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                if last:
                    break  # torn write of the final line: the process died mid-append
                raise InputError(
                    f"{path}:{line_no}: not a JSON object ({exc})",
                    "the run directory was edited by hand; fix or delete that line",
                ) from None
            if last and nl < 0:
                break  # complete JSON but no newline: the write was cut, treat as torn
            rows.append(obj)
        good_end = end
        pos = end
    if repair and good_end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(good_end)
    return rows


# What a manifest's fields must be when present: the readers (resume checks, cards) index into them.
_MANIFEST_FIELDS: dict[str, tuple[type, ...]] = {
    "created": (str,), "updated": (str,), "status": (str,), "command": (str,), "selfinstruct_version": (str,),
    "config": (dict,), "seeds": (dict,), "templates": (dict,), "teacher": (dict,), "filters": (dict,), "counts": (dict,),
    "usage": (dict,), "cost": (dict,), "stages": (dict,), "evol": (dict,), "input": (dict,),
    "counts.rejected": (dict,), "counts.attempt_errors": (dict,), "evol.rounds_completed": (int,),
    "evol.ops_enabled": (list,), "input.sha256": (str,), "seeds.sha256": (str,),
}
# Sections whose every value is an object ({stage: {...}}, {name: {...}}).
_MANIFEST_MAPS = ("templates", "stages")
_JSON_TYPES = {dict: "a JSON object", list: "a list", str: "a string", int: "an integer"}


def _json_type(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", float: "a number"}.get(type(value)) or _JSON_TYPES.get(type(value), type(value).__name__)


def check_manifest(manifest: Any, path: Path) -> dict:
    """The manifest if its fields have the shapes the readers expect; else a user error naming the first wrong field."""
    hint = "the manifest was edited by hand; restore that field, or delete manifest.json and re-run (it is rebuilt from the JSONL files)"
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: the manifest must be a JSON object, got {_json_type(manifest)}", hint)
    for name, types in _MANIFEST_FIELDS.items():
        section, _, key = name.partition(".")
        holder = manifest if not key else manifest.get(section)
        field = key or section
        if not isinstance(holder, dict) or field not in holder:
            continue
        value = holder[field]
        if not isinstance(value, types) or (int in types and isinstance(value, bool)):
            raise InputError(f"{path}: {name} must be {_JSON_TYPES[types[0]]}, got {_json_type(value)}", hint)
    for section in _MANIFEST_MAPS:
        for key, value in (manifest.get(section) or {}).items():
            if not isinstance(value, dict):
                raise InputError(f"{path}: {section}.{key} must be a JSON object, got {_json_type(value)}", hint)
    return manifest


def replace_atomically(path: Path, write: Callable[[TextIO], Any]) -> None:
    """Write a file through `write` into a temp file and rename it over `path`, so a reader (or a kill) never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file and rename it over `path`, so a reader never sees half a file."""
    replace_atomically(path, lambda fh: (json.dump(obj, fh, ensure_ascii=False, indent=2), fh.write("\n")))


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    """Write JSONL rows whole or not at all (a kill leaves the old file or the new one)."""
    replace_atomically(path, lambda fh: fh.writelines(dump_line(r) for r in rows))


class RunDir:
    """Owns the files of one run; every append is flushed before it returns."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._handles: dict[str, TextIO] = {}

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists() or (self.path / LEDGER).exists()

    def prepare(self) -> None:
        """Create the directory, prove it is writable before any money is spent, and start its records file."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-probe"
            probe.write_text("ok", encoding="utf-8")
            probe.unlink()
            # Even a run that keeps (or rejects) nothing has both files: export, filter and evolve know it as a run.
            for name in (RECORDS, REJECTED):
                (self.path / name).open("a", encoding="utf-8").close()
        except OSError as exc:
            raise OutputError(
                f"{self.path}: cannot write the run directory ({exc.strerror or exc})",
                "choose another --out or fix the directory's permissions",
            ) from None

    def load(self, name: str) -> list[dict]:
        """Read one of the run's JSONL files, cutting off a torn last line."""
        return read_jsonl(self.path / name, repair=True)

    def load_manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InputError(
                f"{self.manifest_path}: not valid JSON ({exc})",
                "the manifest is rebuilt from the JSONL files; delete it and re-run",
            ) from None
        return check_manifest(manifest, self.manifest_path)

    def append(self, name: str, rows: Iterable[dict]) -> None:
        """Append rows to a JSONL file and flush them to the OS (survives kill -9)."""
        fh = self._handles.get(name)
        try:
            if fh is None:
                fh = open(self.path / name, "a", encoding="utf-8")
                self._handles[name] = fh
            for row in rows:
                fh.write(dump_line(row))
            fh.flush()
        except OSError as exc:
            raise OutputError(
                f"{self.path / name}: cannot append ({exc.strerror or exc})",
                "free disk space or fix permissions, then re-run the same command to resume",
            ) from None

    def write_manifest(self, manifest: dict) -> None:
        try:
            write_json_atomic(self.manifest_path, manifest)
        except OSError as exc:
            raise OutputError(
                f"{self.manifest_path}: cannot write ({exc.strerror or exc})",
                "free disk space or fix permissions, then re-run the same command to resume",
            ) from None

    def close(self) -> None:
        for fh in self._handles.values():
            try:
                fh.flush()
                os.fsync(fh.fileno())
            except OSError:
                pass
            try:
                fh.close()  # flushes again: on a full disk it fails like the append that stopped the run
            except OSError:
                pass
        self._handles.clear()
