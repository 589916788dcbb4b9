"""Rows: a run's or filter output's kept records read, converted to alpaca, sharegpt or messages rows, and split."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfinstruct.errors import ConfigError, InputError
from selfinstruct.redaction import file_name
from selfinstruct.rundir import FILTER_KEPT, FILTER_REPORT, MANIFEST, RECORDS, check_manifest, read_jsonl

FORMATS = ("alpaca", "sharegpt", "messages", "dpo", "dpo-messages")
# Preference formats (respond --models): a row per judged pair, prompt/chosen/rejected as TRL's DPOTrainer reads them,
# as plain text (dpo) or as chat messages (dpo-messages: prompt is the system and user turns, chosen/rejected one assistant turn).
PREFERENCE_FORMATS = ("dpo", "dpo-messages")
LINEAGE = ("id", "seed_ids", "evol_ops", "model")
DATA_DIR = "data"  # the layout push_to_hub uses, so an export folder uploads as-is
SHAREGPT_ROLES = {"user": "human", "assistant": "gpt"}

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


@dataclass
class Build:
    """A run converted to rows: the splits, their format and the manifest they came from."""

    run_dir: Path
    fmt: str
    splits: dict[str, list[dict]]
    manifest: dict
    slim: bool = False
    system: str | None = None
    seed: int = 42
    test_size: float | None = None
    evol_ops: dict[str, int] = field(default_factory=dict)
    # Records answered under a system prompt (respond --system-prompts) that an alpaca row has no place for.
    systems_dropped: int = 0

    @property
    def rows(self) -> int:
        return sum(len(rows) for rows in self.splits.values())

    def features(self):
        """The `datasets` schema; explicit, so empty lists still get a string type."""
        from datasets import Features, List, Value

        text = Value("string")
        columns: dict[str, Any] = {
            "alpaca": {"instruction": text, "input": text, "output": text},
            "sharegpt": {"conversations": List({"from": text, "value": text})},
            "messages": {"messages": List({"role": text, "content": text})},
            "dpo": {"prompt": text, "chosen": text, "rejected": text},
            "dpo-messages": {"prompt": List({"role": text, "content": text}), "chosen": List({"role": text, "content": text}),
                             "rejected": List({"role": text, "content": text})},
        }[self.fmt]
        if not self.slim:
            columns |= {"id": text, "seed_ids": List(text), "evol_ops": List(text), "model": text}
            if self.fmt in PREFERENCE_FORMATS:
                columns["rejected_model"] = text
        return Features(columns)

    def dataset_dict(self):
        """The splits as a `datasets.DatasetDict`."""
        from datasets import Dataset, DatasetDict

        features = self.features()
        return DatasetDict({name: Dataset.from_list(rows, features=features) for name, rows in self.splits.items()})


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}",
                          "pass --format alpaca, sharegpt or messages (dpo or dpo-messages for a respond --models run)")
    return fmt


def _read_json(path: Path, hint: str) -> dict:
    """A JSON object file, {} if missing or not an object."""
    if not path.exists():
        return {}
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})", hint) from None
    return loaded if isinstance(loaded, dict) else {}


def _filter_manifest(report: dict) -> dict:
    """What the card needs from a `selfinstruct filter` report, in the manifest's shape."""
    if not report:
        return {}
    lang = report.get("lang")
    inputs = [file_name(str(i.get("path", ""))) for i in report.get("inputs") or [] if isinstance(i, dict)]
    return {
        "kind": "filter",
        "filter": {"inputs": inputs, "total": report.get("total"), "field": report.get("field"),
                   "dedup": (report.get("dedup") or {}).get("mode")},
        "selfinstruct_version": report.get("selfinstruct_version"),
        "config": {"lang": lang, "similarity": report.get("similarity")},
        "filters": {"rules": report.get("rules") or [], "similarity": report.get("similarity"), "lang": lang},
        "counts": {"kept": report.get("kept"), "rejected": report.get("rejected_by_rule") or {}},
    }


def load_run(run_dir: Path, *, allow_empty: bool = False) -> tuple[dict, list[dict]]:
    """The manifest (empty if missing) and kept records of a run or a filter output, read without modifying anything."""
    run_dir = Path(run_dir)
    hint = "pass the --out directory of a generate, evolve or filter run"
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run directory", hint)
    records_path = run_dir / RECORDS
    if records_path.exists():
        manifest = check_manifest(_read_json(run_dir / MANIFEST, "re-run generate to rewrite it"), run_dir / MANIFEST)
        # repair=False: exporting must never truncate a run that may still be writing.
        records = read_jsonl(records_path, repair=False)
    else:
        report = _read_json(run_dir / FILTER_REPORT, "re-run filter to rewrite it")
        # The kept file the report names (by file name: the folder may have moved), else whichever is there.
        named = file_name(str((report.get("outputs") or {}).get("kept") or ""))
        kept_names = (named,) if named in FILTER_KEPT.values() else tuple(FILTER_KEPT.values())
        records_path = next((run_dir / name for name in kept_names if (run_dir / name).exists()), None)
        if records_path is None:
            raise InputError(f"{run_dir}: no {RECORDS} here", hint)
        manifest = _filter_manifest(report)
        if records_path.name == FILTER_KEPT["parquet"]:
            import polars as pl

            records = pl.read_parquet(records_path).to_dicts()
        else:
            records = read_jsonl(records_path, repair=False)
    if not records and not allow_empty:  # a report still shows why nothing was kept
        raise InputError(f"{records_path}: no kept records to export", "let the run finish, or check rejected.jsonl")
    for line_no, rec in enumerate(records, 1):
        if not isinstance(rec.get("instruction"), str) or not rec["instruction"].strip() or not isinstance(rec.get("output"), str):
            raise InputError(f"{records_path}:{line_no}: record has no instruction or output", "the file was edited by hand; fix or delete that line")
    return manifest, records


def _meta(rec: dict) -> dict:
    meta = rec.get("meta")
    return meta if isinstance(meta, dict) else {}


def _evol_ops(rec: dict) -> list[str]:
    steps = _meta(rec).get("evol") or []
    return [str(s["op"]) for s in steps if isinstance(s, dict) and s.get("op")]


def prompt_text(instruction: str, input_text: str) -> str:
    """The user turn of a chat format: the instruction, then the input after a blank line."""
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def record_system(rec: dict) -> str | None:
    """The system prompt a record was answered under (respond --system-prompts), if any."""
    system = _meta(rec).get("system")
    return system if isinstance(system, str) and system.strip() else None


def record_turns(rec: dict) -> list[dict]:
    """A record's user and assistant turns: every turn of a conversation (selfinstruct chat), else its one exchange."""
    turns = rec.get("messages")
    if isinstance(turns, list) and len(turns) >= 2 and all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str) for m in turns):
        return [{"role": m["role"], "content": m["content"]} for m in turns]
    input_text = rec.get("input") if isinstance(rec.get("input"), str) else ""
    return [{"role": "user", "content": prompt_text(rec["instruction"], input_text)}, {"role": "assistant", "content": rec["output"]}]


def preference_rows(rec: dict, fmt: str, *, system: str | None = None, slim: bool = False) -> list[dict]:
    """A record's judged pairs (respond --models) as dpo or dpo-messages rows; none when no pair was chosen."""
    meta = _meta(rec)
    answers = {a.get("model"): a.get("output", "") for a in meta.get("answers") or [] if isinstance(a, dict)}
    system = record_system(rec) or system
    prompt = prompt_text(rec["instruction"], rec.get("input") if isinstance(rec.get("input"), str) else "")
    rows = []
    for pair in meta.get("pairs") or []:
        if not isinstance(pair, dict) or pair.get("outcome") != "chosen" or pair.get("chosen") not in answers or pair.get("rejected") not in answers:
            continue
        chosen, rejected = answers[pair["chosen"]], answers[pair["rejected"]]
        if fmt == "dpo":
            # Plain text has no system slot: the system prompt leads the prompt, as a chat template without one would show it.
            row: dict[str, Any] = {"prompt": f"{system}\n\n{prompt}" if system else prompt, "chosen": chosen, "rejected": rejected}
        else:
            turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            row = {"prompt": turns, "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}]}
        if not slim:
            row |= {"id": str(rec.get("id", "")), "seed_ids": [str(s) for s in meta.get("seed_ids") or []], "evol_ops": _evol_ops(rec),
                    "model": str(pair["chosen"]), "rejected_model": str(pair["rejected"])}
        rows.append(row)
    return rows


def convert(rec: dict, fmt: str, *, system: str | None = None, slim: bool = False, default_model: str = "") -> dict:
    """One kept record as a row of `fmt`, with lineage columns unless `slim`; the record's own system prompt wins over `system`."""
    system = record_system(rec) or system if fmt in ("sharegpt", "messages") else system
    instruction = rec["instruction"]
    input_text = rec.get("input") if isinstance(rec.get("input"), str) else ""
    output = rec["output"]
    if fmt == "alpaca":
        row: dict[str, Any] = {"instruction": instruction, "input": input_text, "output": output}
    elif fmt == "sharegpt":
        turns = [{"from": "system", "value": system}] if system else []
        turns += [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in record_turns(rec)]
        row = {"conversations": turns}
    else:
        messages = [{"role": "system", "content": system}] if system else []
        messages += record_turns(rec)
        row = {"messages": messages}
    if not slim:
        meta = _meta(rec)
        row |= {
            "id": str(rec.get("id", "")),
            "seed_ids": [str(s) for s in meta.get("seed_ids") or []],
            "evol_ops": _evol_ops(rec),
            "model": str(meta.get("model") or default_model),
        }
    return row


def _lineage_root(rec: dict) -> str:
    """The record an evolved record descends from, so a task and its variants share a split."""
    steps = _meta(rec).get("evol") or []
    if steps and isinstance(steps[0], dict) and steps[0].get("parent_id"):
        return str(steps[0]["parent_id"])
    return str(rec.get("id", id(rec)))


def holdout_count(test_size: float, n: int) -> int:
    """--test-size as a row count: a fraction below 1, a whole number of rows from 1 up."""
    if 0 < test_size < 1:
        k = max(1, round(n * test_size))
    elif test_size >= 1 and float(test_size).is_integer():
        k = int(test_size)
    else:
        raise ConfigError(f"--test-size {test_size:g} is neither a fraction in (0, 1) nor a whole number of rows", "pass e.g. --test-size 0.05 or --test-size 500")
    if k >= n:
        raise ConfigError(f"--test-size {test_size:g} leaves no training rows out of {n:,}", "pass a smaller --test-size")
    return k


def split(records: list[dict], test_size: float | None, seed: int) -> dict[str, list[dict]]:
    """Seeded shuffle, then a test split grouped by lineage so evolved variants never straddle splits."""
    rng = random.Random(seed)
    if not test_size:
        rows = list(records)
        rng.shuffle(rows)
        return {"train": rows}
    k = holdout_count(test_size, len(records))
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(_lineage_root(rec), []).append(rec)
    roots = sorted(groups)
    rng.shuffle(roots)
    test: list[dict] = []
    train: list[dict] = []
    for root in roots:
        (test if len(test) < k else train).extend(groups[root])
    if not train:
        raise ConfigError(f"--test-size {test_size:g} leaves no training rows (records are grouped by lineage)", "pass a smaller --test-size")
    rng.shuffle(train)
    rng.shuffle(test)
    return {"train": train, "test": test}


def build(
    run_dir: Path,
    fmt: str = "alpaca",
    *,
    test_size: float | None = None,
    seed: int = 42,
    slim: bool = False,
    system: str | None = None,
) -> Build:
    """Read a run and convert its kept records into split rows of one format."""
    check_format(fmt)
    if system is not None and fmt == "alpaca":
        raise ConfigError("--system needs a chat format; alpaca has no system field", "pass --format messages or --format sharegpt")
    manifest, records = load_run(run_dir)
    model = str((manifest.get("teacher") or {}).get("model") or (manifest.get("config") or {}).get("model") or "")
    ops: dict[str, int] = {}
    for rec in records:
        for op in _evol_ops(rec):
            ops[op] = ops.get(op, 0) + 1
    if fmt in PREFERENCE_FORMATS:
        splits = {name: [row for rec in rows for row in preference_rows(rec, fmt, system=system, slim=slim)]
                  for name, rows in split(records, test_size, seed).items()}
        if not any(splits.values()):
            raise InputError(f"{run_dir}: no preference pairs to export as {fmt}",
                             "make them with selfinstruct respond INPUT --models A,B --out DIR, or pass --format alpaca, sharegpt or messages")
    else:
        splits = {
            name: [convert(rec, fmt, system=system, slim=slim, default_model=model) for rec in rows]
            for name, rows in split(records, test_size, seed).items()
        }
    dropped = sum(1 for rec in records if record_system(rec)) if fmt == "alpaca" else 0
    return Build(Path(run_dir), fmt, splits, manifest, slim=slim, system=system, seed=seed, test_size=test_size, evol_ops=ops,
                 systems_dropped=dropped)


def infer_lang(build: Build) -> str:
    """The run's language: from the manifest, else from how much of the text is Chinese."""
    cfg = build.manifest.get("config") or {}
    lang = cfg.get("lang") or (build.manifest.get("filters") or {}).get("lang")
    if isinstance(lang, str) and lang:
        return lang
    rows = [r for rows in build.splits.values() for r in rows][:200]
    text = [json.dumps(r, ensure_ascii=False) for r in rows]
    return "zh" if sum(bool(_CJK.search(t)) for t in text) * 2 >= max(1, len(text)) else "en"


def status_note(b: Build) -> list[str]:
    notes = []
    status = b.manifest.get("status")
    if status and status != "completed":
        notes.append(f"note: the run's status is {status!r}; exported the {b.rows:,} records kept so far")
    if b.systems_dropped:
        notes.append(f"note: {b.systems_dropped:,} records were answered under a system prompt, which alpaca has no place for; "
                     "--format sharegpt or messages keeps it as the first turn")
    return notes
