"""The records a stage reads: any dataset the project reads, its language, its fingerprint and the seeds behind it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

from selfinstruct.errors import ConfigError
from selfinstruct.redaction import file_name


def infer_lang(instructions: Iterable[str]) -> str:
    """zh when at least half the instructions are mainly Han, else en."""
    from selfinstruct.rules import script_of

    scripts = [script_of(t) for t in instructions]
    return "zh" if scripts and scripts.count("zh") * 2 >= len(scripts) else "en"


def records_sha256(records: Sequence[dict]) -> str:
    """A fingerprint of the parents a run evolves, so a resume into another input is refused."""
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps([rec["id"], rec["instruction"], rec["input"]], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def input_seeds(paths: Sequence[Path]) -> dict | None:
    """The seeds the input run directories' manifests record; None unless every input is a run that records them."""
    found: list[dict] = []
    for path in map(Path, paths):
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8")) if path.is_dir() else None
        except (OSError, ValueError):
            manifest = None
        seeds = manifest.get("seeds") if isinstance(manifest, dict) else None
        if not isinstance(seeds, dict) or not seeds.get("path"):
            return None  # records not made from seeds (or not recorded): claiming a seed file would mislead the card
        # Only the file name: a published card must not show where the seeds sat on the maker's disk.
        found.append({**seeds, "path": file_name(str(seeds["path"]))})
    unique = list({json.dumps(s, sort_keys=True): s for s in found}.values())
    if len(unique) <= 1:
        return unique[0] if unique else None
    # Runs from several seed files: name them all; a licence holds only if they all declare the same.
    counts = [s.get("count") for s in unique]
    licences = {s.get("license") for s in unique}
    return {"path": ", ".join(dict.fromkeys(s["path"] for s in unique)),
            "count": sum(counts) if all(isinstance(c, int) for c in counts) else None,
            "sha256": None, "license": licences.pop() if len(licences) == 1 else None}


def read_base(paths: Sequence[Path], limit: int | None = None) -> list[dict]:
    """Records of any dataset the project reads, in the run's record shape (meta kept when the input has one)."""
    from selfinstruct.corpus import read_records

    df = read_records(paths)
    if limit is not None:
        df = df.head(limit)
    base: list[dict] = []
    for row in df.to_dicts():
        meta = row.get("meta")
        if isinstance(meta, str):
            try:
                meta = json.loads(meta)
            except ValueError:
                meta = None
        meta = {k: v for k, v in meta.items() if v is not None} if isinstance(meta, dict) else {}
        base.append({"id": str(row["id"]), "instruction": row["instruction"] or "", "input": row["input"] or "",
                     "output": row["output"] or "", "meta": meta})
    return base


def stage_input(inputs: Sequence[Path], out: Path, limit: int | None, lang: str | None, what: str,
                out_hint: str) -> tuple[list[dict], str, dict]:
    """What a stage over a dataset reads: its records, their language (given, else inferred) and the manifest's `input` section.

    Refuses an --out that is one of the inputs (the run would overwrite what it reads) and inputs with no records.
    """
    if any(Path(p).resolve() == Path(out).resolve() for p in inputs):
        raise ConfigError(f"--out {out} is also an input", out_hint)
    records = read_base(inputs, limit)
    if not records:
        raise ConfigError(f"no records {what} in {', '.join(map(str, inputs))}", "check the input files")
    lang = lang or infer_lang(r["instruction"] for r in records)
    source = {"paths": [Path(p).name for p in inputs], "records": len(records), "limit": limit, "sha256": records_sha256(records)}
    return records, lang, source
