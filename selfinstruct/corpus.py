"""Any instruction dataset the project can read, as one table: id, instruction, input, output (+ its other columns).

Inputs are run directories, JSON lists, JSONL (either gzipped), parquet, or a `datasets`
save_to_disk directory; records in Alpaca (instruction/input/output), ShareGPT (conversations),
chat (messages) or Self-Instruct seed (instruction + instances[{input, output}]) shape. Reading goes through polars and pyarrow, never a Python loop per
record, so a few million records load in seconds.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Sequence

import polars as pl

from selfinstruct.errors import InputError
from selfinstruct.rundir import RECORDS, read_jsonl

CORE = ("instruction", "input", "output")
# Column names other datasets use for the Alpaca fields.
ALIASES = {
    "instruction": ("instruction", "prompt", "question", "query"),
    "input": ("input", "context"),
    "output": ("output", "response", "completion", "answer"),
}
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "chatgpt", "bard", "bing", "model")

_HINT = "inputs are run directories, .json/.jsonl(.gz), .parquet or a datasets save_to_disk directory"


def read_records(paths: Sequence[Path]) -> pl.DataFrame:
    """Read and merge inputs in order: columns id, instruction, input, output first, then any others."""
    return merge([read_one(Path(p)) for p in paths])


def merge(frames: Sequence[pl.DataFrame]) -> pl.DataFrame:
    """Stack inputs read by `read_one` in order; columns one input lacks are null in the others' rows."""
    if not frames:
        raise InputError("no inputs given", _HINT)
    try:
        df = pl.concat(frames, how="diagonal_relaxed")
    except (pl.exceptions.PolarsError, TypeError):
        # Inputs whose extra columns disagree in type (a list in one, text in another): keep the
        # shared record shape, and each input's extras as JSON text so no content is lost.
        frames = [_extras_as_json(f) for f in frames]
        df = pl.concat(frames, how="diagonal_relaxed")
    return _unique_ids(df)


def read_one(path: Path) -> pl.DataFrame:
    """One input as a table in the project's record shape."""
    raw = _load(path)
    if raw.height == 0:
        return pl.DataFrame({"id": [], **{c: [] for c in CORE}}, schema={"id": pl.String, **{c: pl.String for c in CORE}})
    df = _normalise(raw, path)
    name = path.name
    made = pl.format("{}:{}", pl.lit(name), pl.int_range(1, pl.len() + 1))
    if "id" in df.columns:
        df = df.with_columns(pl.coalesce(pl.col("id").cast(pl.String), made).alias("id"))
    else:
        df = df.with_columns(made.alias("id"))
    rest = [c for c in df.columns if c not in ("id", *CORE)]
    return df.select("id", *CORE, *rest)


def compared_text(df: pl.DataFrame, field: str) -> pl.Series:
    """The text the near-duplicate rules compare: one column, or several joined by newlines (`instruction+input`)."""
    names = [f.strip() for f in field.split("+") if f.strip()]
    if not names:
        raise InputError(f"--field {field!r} names no column", "use e.g. instruction or instruction+input")
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise InputError(
            f"--field {field!r}: no column {missing[0]!r} in the input",
            f"columns are {', '.join(df.columns)}",
        )
    if len(names) == 1:
        expr = pl.col(names[0]).cast(pl.String).fill_null("")
    else:
        # Blank parts are left out, as similarity.dedup_text does: "instruction" alone, not "instruction\n".
        parts = [pl.when(pl.col(n).cast(pl.String).str.strip_chars().fill_null("") == "").then(None).otherwise(pl.col(n).cast(pl.String)) for n in names]
        expr = pl.concat_str(parts, separator="\n", ignore_nulls=True).fill_null("")
    return df.select(expr.alias("text")).to_series()


# ---- reading one input --------------------------------------------------------------------------


def _load(path: Path) -> pl.DataFrame:
    """The input's rows as they are, in any supported container."""
    if not path.exists():
        raise InputError(f"{path}: no such file or directory", _HINT)
    if path.is_dir():
        if (path / RECORDS).exists():
            return _read_run(path / RECORDS)
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _read_saved(path)
        raise InputError(f"{path}: a directory with neither {RECORDS} (a run) nor a datasets save_to_disk layout", _HINT)
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            return pl.read_parquet(path)
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})", "check the path and permissions") from None
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"{path}: not a readable parquet file ({_first_line(exc)})", _HINT) from None
    if name.endswith(".gz") or data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise InputError(f"{path}: broken gzip ({exc})", "re-download or re-compress the file") from None
    return _read_json_bytes(path, _utf8(path, data))


def _read_run(path: Path) -> pl.DataFrame:
    try:
        return pl.read_ndjson(io.BytesIO(path.read_bytes()), infer_schema_length=None)
    except pl.exceptions.PolarsError:
        # A run killed mid-append leaves a torn last line; the run reader knows how to skip it.
        return _rows_frame(read_jsonl(path))


def _read_saved(path: Path) -> pl.DataFrame:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise InputError(f"{path}: reading save_to_disk directories needs the datasets package", "pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a broken directory
        raise InputError(f"{path}: not a readable datasets directory ({_first_line(exc)})", _HINT) from None
    if isinstance(ds, datasets.DatasetDict):
        parts = [pl.from_arrow(ds[split].with_format("arrow")[:]) for split in ds]
        return pl.concat(parts, how="diagonal_relaxed") if parts else pl.DataFrame()
    return pl.from_arrow(ds.with_format("arrow")[:])


def _utf8(path: Path, data: bytes) -> bytes:
    """UTF-8 bytes without BOM; GB18030 (a GBK superset) files are converted."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("gb18030").encode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 or GBK text", "save the file as UTF-8") from None


def _read_json_bytes(path: Path, data: bytes) -> pl.DataFrame:
    head = data.lstrip()[:1]
    if not head:
        return pl.DataFrame()
    try:
        if head == b"[":
            return pl.read_json(io.BytesIO(data), infer_schema_length=None)
        return pl.read_ndjson(io.BytesIO(data), infer_schema_length=None)
    except pl.exceptions.PolarsError:
        pass
    # Values polars will not type (a number where text is expected, mixed nesting): parse in
    # Python, which also names the broken line when the JSON itself is bad.
    return _rows_frame(_parse_rows(path, data, head == b"["))


def _parse_rows(path: Path, data: bytes, is_list: bool) -> list[dict]:
    if is_list:
        try:
            rows = json.loads(data)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})", "fix the file; a JSON list or one object per line") from None
        if not isinstance(rows, list):
            raise InputError(f"{path}: expected a JSON list of records", _HINT)
    else:
        rows = []
        for line_no, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno})", "fix or delete that line") from None
    for k, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise InputError(f"{path}: record {k} is a {type(row).__name__}, not a JSON object", _HINT)
    return rows


def _rows_frame(rows: list[dict]) -> pl.DataFrame:
    """A frame from parsed rows: the record fields as text, anything irregular as JSON text."""
    if not rows:
        return pl.DataFrame()
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    columns = {}
    for key in keys:
        values = [row.get(key) for row in rows]
        try:
            columns[key] = pl.Series(key, values, strict=True)
        except (TypeError, ValueError, pl.exceptions.PolarsError):
            columns[key] = pl.Series(key, [_as_text(v) for v in values], dtype=pl.String)
    return pl.DataFrame(columns)


def _as_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


# ---- record shapes ---------------------------------------------------------------------------


def _normalise(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    """Add instruction/input/output as text columns, from whichever shape the input has."""
    cols = set(df.columns)
    if "instruction" not in cols and "conversations" in cols:
        pairs = _turns(df, "conversations", "from", "value", path)
    elif "instruction" not in cols and "messages" in cols:
        pairs = _turns(df, "messages", "role", "content", path)
    else:
        pairs = None
    if pairs is not None:
        instruction, output = pairs
        return df.with_columns(instruction.alias("instruction"), pl.lit("").alias("input"), output.alias("output"))
    found = {}
    for target, names in ALIASES.items():
        name = next((n for n in names if n in cols), None)
        if name is None and target == "instruction":
            raise InputError(
                f"{path}: no instruction column (columns: {', '.join(df.columns)})",
                "records need instruction/input/output (Alpaca), conversations (ShareGPT) or messages",
            )
        if name is None and "instances" in cols:
            found[target] = _first_instance(df, target, path)
        else:
            found[target] = _text(df, name) if name else pl.lit("")
    return df.with_columns(*(expr.alias(target) for target, expr in found.items()))


def _first_instance(df: pl.DataFrame, key: str, path: Path) -> pl.Expr:
    """`key` (input or output) of each record's first instance, for Self-Instruct/BELLE seed files."""
    # One record per seed task, not one per instance: ids stay the seeds' own and unique, and
    # kept + rejected still counts the input's lines. The first is the instance every seed task
    # has (the format needs at least one; the Alpaca and BELLE seed files have exactly one).
    dtype = df.schema["instances"]
    column = pl.col("instances")
    if dtype == pl.String:
        # Rows polars would not type arrive as JSON text (see _rows_frame), already a Python-loop
        # path; decode per row so one odd task (a number as output, no list) does not sink the file.
        return column.map_elements(lambda text: _instance_text(text, key), return_dtype=pl.String).fill_null("")
    if dtype == pl.Null:
        return pl.lit("")
    if not (isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)):
        raise InputError(
            f"{path}: `instances` must be a list of {{input, output}} objects",
            "Self-Instruct seed tasks use instances: [{input, output}]",
        )
    if key not in {f.name for f in dtype.inner.fields}:
        return pl.lit("")
    return column.list.first().struct.field(key).cast(pl.String).fill_null("")


def _instance_text(text: str, key: str) -> str:
    try:
        instances = json.loads(text)
    except ValueError:
        return ""
    first = instances[0] if isinstance(instances, list) and instances else None
    return (_as_text(first.get(key)) or "") if isinstance(first, dict) else ""


def _text(df: pl.DataFrame, name: str) -> pl.Expr:
    dtype = df.schema[name]
    if dtype == pl.String:
        return pl.col(name).fill_null("")
    if dtype.is_numeric() or dtype == pl.Boolean or dtype == pl.Null:
        return pl.col(name).cast(pl.String).fill_null("")
    # Nested values (a list of strings as output, say) are compared as their JSON text.
    return pl.col(name).map_elements(lambda v: _as_text(v.to_list() if hasattr(v, "to_list") else v) or "", return_dtype=pl.String)


def _turns(df: pl.DataFrame, column: str, role_key: str, text_key: str, path: Path) -> tuple[pl.Expr, pl.Expr]:
    """First user turn and first assistant turn of a conversation column."""
    dtype = df.schema[column]
    inner = getattr(dtype, "inner", None)
    fields = {f.name: f.dtype for f in getattr(inner, "fields", [])}
    if not isinstance(dtype, pl.List) or role_key not in fields or text_key not in fields:
        raise InputError(
            f"{path}: `{column}` must be a list of {{{role_key}, {text_key}}} objects",
            "ShareGPT uses conversations: [{from, value}], chat data messages: [{role, content}]",
        )
    if fields[text_key] != pl.String:
        raise InputError(f"{path}: `{column}[].{text_key}` must be text", "multi-part message content is not supported")

    def first(roles: tuple[str, ...]) -> pl.Expr:
        turn = pl.element().struct
        return (
            pl.col(column)
            .list.eval(pl.element().filter(turn.field(role_key).str.to_lowercase().is_in(list(roles))).struct.field(text_key))
            .list.first()
            .fill_null("")
        )

    return first(USER_ROLES), first(ASSISTANT_ROLES)


# ---- merging ---------------------------------------------------------------------------------


def _extras_as_json(df: pl.DataFrame) -> pl.DataFrame:
    """Every extra column as text (JSON for nested values), so frames of different schemas concatenate."""
    out = {}
    for name, dtype in df.schema.items():
        if name in ("id", *CORE) or dtype == pl.String:
            continue
        values = df[name].to_list()
        out[name] = pl.Series(name, [_as_text(v) for v in values], dtype=pl.String)
    return df.with_columns(**out) if out else df


def _unique_ids(df: pl.DataFrame) -> pl.DataFrame:
    """Ids name records in rejected.jsonl, so they must be unique: a repeated id gets #1, #2... on its repeats."""
    if df["id"].is_unique().all():
        return df
    ids = pl.col("id")
    k = pl.int_range(pl.len()).over("id")
    return df.with_columns(pl.when(k > 0).then(pl.format("{}#{}", ids, k)).otherwise(ids).alias("id"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
