"""selfinstruct filter: the generate path's rules and exact near-duplicate removal, for any dataset.

Stages, each timed and shown with a progress bar: read → rules (streamed in slices) →
contamination (--against) → exact duplicates → near-duplicates → write. A record gets the
reason of the first stage that drops it; every input record ends in kept or rejected.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from selfinstruct import __version__
from selfinstruct.corpus import compared_text, merge, read_one, read_records
from selfinstruct.errors import ConfigError, InputError, OutputError
from selfinstruct.rundir import FILTER_KEPT, FILTER_REPORT, LEDGER, RECORDS, REJECTED
from selfinstruct.rules import REASONS, RULES, RuleSettings, UserRule, check, load_rules, redact_frame, same_text_key, script_of
from selfinstruct.similarity import FIELDS, BatchDedup, rouge_l, topic_text

EXACT_DUPLICATE = "exact-duplicate"
CONTAMINATED = "contaminated"
NEAR_DUPLICATE = "near-duplicate"
# Every rule filter knows, in the order they run; user rules run after the built-ins.
FILTER_RULES = (*REASONS, CONTAMINATED, EXACT_DUPLICATE, NEAR_DUPLICATE)
FORMATS = tuple(FILTER_KEPT)
DEDUP_MODES = ("exact", "minhash")
PII_MODES = ("drop", "redact")
# Languages the wrong-language rule can tell apart; any other code would expect Latin script and
# silently reject a whole Chinese dataset.
LANGS = ("zh", "zh-Hant", "en", "ja", "ko")
# Files whose presence marks a generate or evolve run directory, which filter must never write into.
# A run's files filter would clobber or sit beside confusingly; a lone manifest.json of some other tool is not one.
RUN_MARKERS = (RECORDS, LEDGER)
# Records handed to the Python rules at a time: bounded memory, steady progress.
RULE_SLICE = 20_000
# From this many records the rules run in one process per core (start-up costs about a second).
PARALLEL_RULES_FROM = 100_000


def topic_texts(df: pl.DataFrame) -> list[str]:
    """What --field topic compares, a record at a time (see similarity.topic_text)."""
    cols = [df[c].cast(pl.String).fill_null("").to_list() for c in ("instruction", "input")]
    return [topic_text(i, x) for i, x in zip(*cols)]


@dataclass(frozen=True)
class FilterSettings:
    """Everything `selfinstruct filter` was asked to do."""

    inputs: tuple[Path, ...]
    out: Path
    field: str = "topic"
    similarity: float = 0.7
    dedup: str = "exact"
    rules: tuple[str, ...] | None = None
    no_rules: tuple[str, ...] = ()
    rule_file: Path | None = None
    lang: str | None = None
    against: tuple[Path, ...] = ()
    format: str = "jsonl"
    quiet: bool = False
    pii: str = "drop"  # or redact: personal data replaced by [EMAIL], [PHONE]... and the record kept


@dataclass
class FilterReport:
    """What filter_report.json records: counts per rule, seconds per stage, and the settings."""

    total: int = 0
    kept: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    seconds: dict[str, float] = field(default_factory=dict)
    inputs: list[dict] = field(default_factory=list)
    lang: str = ""
    lang_inferred: bool = False
    enabled: list[str] = field(default_factory=list)
    dedup: dict = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    pii_redacted: int = 0

    def to_json(self, settings: FilterSettings) -> dict:
        return {
            "selfinstruct_version": __version__,
            "total": self.total,
            "kept": self.kept,
            "rejected": sum(self.rejected.values()),
            "rejected_by_rule": {r: self.rejected[r] for r in self.enabled if self.rejected[r]},
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "inputs": self.inputs,
            "outputs": self.outputs,
            "rules": self.enabled,
            "lang": self.lang,
            "lang_inferred": self.lang_inferred,
            "field": settings.field,
            "similarity": settings.similarity,
            "dedup": {"mode": settings.dedup, **self.dedup},
            "against": [str(p) for p in settings.against],
            "rule_file": str(settings.rule_file) if settings.rule_file else None,
            "pii": {"mode": settings.pii, "records_redacted": self.pii_redacted},
        }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def infer_lang(texts: list[str], sample: int = 2000) -> str:
    """zh, ja, ko or en: the script most of the texts are written in."""
    step = max(1, len(texts) // sample)
    scripts = collections.Counter(script_of(t) for t in texts[::step])
    scripts.pop("none", None)
    if not scripts:
        return "zh"
    top = scripts.most_common(1)[0][0]
    return {"latin": "en"}.get(top, top)


class StageProgress:
    """One progress bar per stage on a terminal; one plain line per finished stage otherwise."""

    def __init__(self, console: Console, quiet: bool) -> None:
        self.console = console
        self.quiet = quiet
        self._progress: Progress | None = None
        if not quiet and console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console, transient=False,
            )

    def __enter__(self) -> "StageProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def stage(self, name: str, total: int) -> Callable[..., None]:
        """Start a stage; returns the callback that reports done so far (and, optionally, a new total)."""
        if self._progress is None:
            return lambda done, total=None: None
        progress = self._progress
        task = progress.add_task(name, total=max(total, 1))
        size = [total]

        def advance(done: int, total: int | None = None) -> None:
            if total is not None:
                size[0] = total
                progress.update(task, total=max(total, 1))
            progress.update(task, completed=min(done, size[0]) if size[0] else 1)

        return advance

    def done(self, name: str, count: int, seconds: float, note: str = "") -> None:
        if not self.quiet and self._progress is None:
            self.console.print(f"{name}: {count:,} records in {seconds:.1f} s{note}")


@dataclass
class _Stage:
    """What a finished stage reports: records it looked at, and a note for the plain-line display."""

    count: int = 0
    note: str = ""


class _StageTimer:
    """Times a stage into the report and tells the progress display when it ends."""

    def __init__(self, report: FilterReport, stages: StageProgress, name: str) -> None:
        self.report, self.stages, self.name = report, stages, name

    def __enter__(self) -> _Stage:
        self.start = time.perf_counter()
        self.stage = _Stage()
        return self.stage

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            took = time.perf_counter() - self.start
            self.report.seconds[self.name] = took
            self.stages.done(self.name, self.stage.count, took, self.stage.note)


class Filtering:
    """One `selfinstruct filter` run: owns the table, the per-record verdicts and the report."""

    def __init__(self, settings: FilterSettings, console: Console | None = None) -> None:
        self.settings = settings
        self.console = console or Console(stderr=True)
        self.report = FilterReport()
        self._check_settings()
        self.user_rules: list[UserRule] = load_rules(settings.rule_file, FILTER_RULES) if settings.rule_file else []
        self.enabled = self._enabled_rules()
        self.report.enabled = self.enabled
        # Exact duplicates are the same words, whatever the near-duplicate check compares.
        self.exact_field = "instruction+input" if settings.field == "topic" else settings.field

    # ---- settings ----------------------------------------------------------------------------

    def _check_settings(self) -> None:
        s = self.settings
        if not 0.0 < s.similarity <= 1.0:
            raise ConfigError(f"--similarity {s.similarity:g} is outside (0, 1]", "0.7 is the Self-Instruct default; 1.0 removes only exact token matches")
        if s.dedup not in DEDUP_MODES:
            raise ConfigError(f"--dedup {s.dedup!r} is not a mode", f"use one of {', '.join(DEDUP_MODES)}")
        if s.format not in FORMATS:
            raise ConfigError(f"--format {s.format!r} is not an output format", f"use one of {', '.join(FORMATS)}")
        if s.field not in FIELDS:
            raise ConfigError(f"--field {s.field!r} is not supported", f"use one of {', '.join(FIELDS)}")
        if s.pii not in PII_MODES:
            raise ConfigError(f"--pii {s.pii!r} is not a mode", f"use one of {', '.join(PII_MODES)}")
        if s.lang is not None and s.lang not in LANGS:
            raise ConfigError(f"--lang {s.lang!r} is not supported", f"use one of {', '.join(LANGS)}, or leave it out to use the data's language")
        if not s.inputs:
            raise ConfigError("no INPUT given", "pass one or more run directories or dataset files")
        self._check_out()

    def _check_out(self) -> None:
        """Refuse an --out whose kept/rejected/report files would overwrite a run or an input; nothing is written yet."""
        s = self.settings
        out = Path(s.out).resolve()
        touched = {out / FILTER_KEPT[s.format]: "overwrite", out / REJECTED: "overwrite", out / FILTER_REPORT: "overwrite"}
        # The kept file of the other --format is removed after writing (see _write): an input too.
        touched |= {out / name: "delete" for fmt, name in FILTER_KEPT.items() if fmt != s.format}
        for p in (*s.inputs, *s.against):
            src = Path(p).resolve()
            # Only a real collision counts: --out . beside data/x.jsonl overwrites nothing.
            if src == out:
                raise OutputError(f"--out {s.out}: would overwrite the input {p}", "choose a new directory, e.g. --out filtered")
            for target, verb in touched.items():
                # samefile: a hard link is the same file under another name.
                if src == target or (src.is_file() and target.is_file() and os.path.samefile(src, target)):
                    raise OutputError(f"--out {s.out}: would {verb} the input {p}", "choose a new directory, e.g. --out filtered")
        marker = next((m for m in RUN_MARKERS if (out / m).exists()), None)
        if marker is not None:
            raise OutputError(f"--out {s.out}: is a run directory (it has {marker}), whose {REJECTED} filter would overwrite", "choose a new directory, e.g. --out filtered")

    def _enabled_rules(self) -> list[str]:
        s = self.settings
        known = [*REASONS, *(r.name for r in self.user_rules), CONTAMINATED, EXACT_DUPLICATE, NEAR_DUPLICATE]
        for name in [*(s.rules or ()), *s.no_rules]:
            if name not in known:
                raise ConfigError(f"unknown rule {name!r}", f"rules are {', '.join(known)}")
        chosen = [r for r in known if (s.rules is None or r in s.rules) and r not in s.no_rules]
        if s.against and CONTAMINATED not in chosen:
            raise ConfigError("--against needs the contaminated rule, which --rules/--no-rule switched off", "add contaminated to --rules")
        if not s.against and s.rules is not None and CONTAMINATED in s.rules:
            raise ConfigError("the contaminated rule needs --against FILE", "pass the seeds or a benchmark's test set with --against")
        if not s.against:
            chosen = [r for r in chosen if r != CONTAMINATED]
        return chosen

    # ---- the run -----------------------------------------------------------------------------

    def run(self) -> FilterReport:
        """Run every stage and write kept, rejected.jsonl and filter_report.json."""
        s = self.settings
        out = self._prepare_out()
        with StageProgress(self.console, s.quiet) as stages:
            with _StageTimer(self.report, stages, "read") as stage:
                # The record count is known only once read, so the bar counts inputs until then.
                advance = stages.stage("read", len(s.inputs))
                frames = []
                for k, p in enumerate(s.inputs, start=1):
                    frames.append(read_one(Path(p)))
                    advance(k)
                self._check_empty(frames)
                df = merge(frames)
                if s.pii == "redact" and "pii" in self.enabled:
                    df, self.report.pii_redacted = redact_frame(df)
                texts = compared_text(df, self.exact_field).to_list()
                # The topics only for the stages that compare them (0.3 s on 52K records otherwise spent for nothing).
                compares = CONTAMINATED in self.enabled or NEAR_DUPLICATE in self.enabled
                near_texts = topic_texts(df) if s.field == "topic" and compares else texts
                self.ids = df["id"].to_list()
                self._check_fields(df)
                stage.count = df.height
                advance(df.height, total=df.height)
            n = df.height
            self.report.total = n
            self.report.inputs = [{"path": str(p), "records": f.height} for p, f in zip(s.inputs, frames)]
            del frames
            self.reason: list[str | None] = [None] * n
            self.detail: list[str | None] = [None] * n
            self.dup_of = np.full(n, -1, dtype=np.int64)  # row of the record it repeats
            self.dup_ext: dict[int, tuple[str, str]] = {}  # row -> (id, text) of an --against record
            self.score = np.full(n, np.nan)
            self._rules(df, texts, stages)
            if CONTAMINATED in self.enabled:
                self._contamination(near_texts, stages)
            if EXACT_DUPLICATE in self.enabled:
                self._exact(texts, stages)
            if NEAR_DUPLICATE in self.enabled:
                self._near(near_texts, stages)
                if EXACT_DUPLICATE in self.enabled:
                    self._repoint_exact(near_texts)
            with _StageTimer(self.report, stages, "write") as stage:
                self._write(df, texts, out, stages.stage("write", n))
                stage.count = n
        counts = collections.Counter(r for r in self.reason if r is not None)
        self.report.rejected = counts
        self.report.kept = n - sum(counts.values())
        text = json.dumps(self.report.to_json(s), ensure_ascii=False, indent=2) + "\n"
        _write_atomic(out / FILTER_REPORT, lambda p: Path(p).write_text(text, encoding="utf-8"))
        return self.report

    def _standing(self) -> np.ndarray:
        """Rows no stage has dropped yet."""
        return np.flatnonzero(np.fromiter((r is None for r in self.reason), dtype=bool, count=len(self.reason)))

    def _drop(self, row: int, reason: str, detail: str) -> None:
        self.reason[row] = reason
        self.detail[row] = detail

    # ---- stages ------------------------------------------------------------------------------

    def _rules(self, df: pl.DataFrame, texts: list[str], stages: StageProgress) -> None:
        builtin = [r for r in self.enabled if r in RULES]
        users = [r for r in self.user_rules if r.name in self.enabled]
        if not builtin and not users:
            return
        lang = self.settings.lang
        if lang is None and "wrong-language" in builtin:
            lang = infer_lang(texts)
            self.report.lang_inferred = True
        self.report.lang = lang or ""
        settings = RuleSettings(lang=lang or "zh", enabled=frozenset(builtin))
        n = df.height
        with _StageTimer(self.report, stages, "rules") as stage:
            advance = stages.stage("rules", n)
            columns = sorted({"instruction", "input", "output", *(r.field for r in users)})
            slices = (
                (start, {c: part[c].to_list() for c in columns})
                for start in range(0, n, RULE_SLICE)
                for part in [df.slice(start, RULE_SLICE).select(pl.col(c).cast(pl.String).fill_null("") for c in columns)]
            )
            for start, verdicts in _map_slices(slices, settings, users, parallel=n >= PARALLEL_RULES_FROM):
                for k, verdict in enumerate(verdicts):
                    if verdict is not None:
                        self._drop(start + k, *verdict)
                advance(start + len(verdicts))
            stage.count = n
            if self.report.lang_inferred:
                stage.note = f" (language {lang}, from the data)"

    def _contamination(self, texts: list[str], stages: StageProgress) -> None:
        s = self.settings
        with _StageTimer(self.report, stages, "contamination") as stage:
            ref = read_records(s.against)
            ref_texts = compared_text(ref, self.exact_field).to_list()
            ref_near = topic_texts(ref) if s.field == "topic" else ref_texts
            ref_ids = ref["id"].to_list()
            rows = self._standing()
            advance = stages.stage("contamination", len(rows))
            best, score = BatchDedup(s.similarity, on_progress=advance).nearest([texts[i] for i in rows], ref_near)
            names = ", ".join(p.name for p in s.against)
            for i in np.flatnonzero(best >= 0):
                row, j = int(rows[i]), int(best[i])
                self._drop(row, CONTAMINATED, f"ROUGE-L {score[i]:.3f} with {ref_ids[j]} in {names}")
                self.dup_ext[row] = (ref_ids[j], ref_texts[j])
                self.score[row] = score[i]
            stage.count = len(rows)
            stage.note = f" ({int((best >= 0).sum()):,} match {len(ref_texts):,} --against records)"

    def _exact(self, texts: list[str], stages: StageProgress) -> None:
        with _StageTimer(self.report, stages, "exact-duplicate") as stage:
            rows = self._standing()
            advance = stages.stage("exact-duplicate", len(rows))
            first: dict[str, int] = {}
            self.exact_rows: list[int] = []
            for k, row in enumerate(rows.tolist()):
                key = same_text_key(texts[row])
                seen = first.setdefault(key, row)
                if seen != row:
                    self._drop(row, EXACT_DUPLICATE, f"same {self.exact_field} as {self.ids[seen]} after normalisation")
                    self.dup_of[row] = seen
                    self.score[row] = 1.0
                    self.exact_rows.append(row)
                if k % 50_000 == 0:
                    advance(k)
            advance(len(rows))
            stage.count = len(rows)

    def _near(self, texts: list[str], stages: StageProgress) -> None:
        s = self.settings
        with _StageTimer(self.report, stages, "near-duplicate") as stage:
            rows = self._standing()
            advance = stages.stage("near-duplicate", len(rows))
            dedup = BatchDedup(s.similarity, method=s.dedup, on_progress=advance)
            result = dedup.run([texts[i] for i in rows])
            for i in np.flatnonzero(result.duplicate_of >= 0):
                row, kept = int(rows[i]), int(rows[result.duplicate_of[i]])
                self._drop(row, NEAR_DUPLICATE, f"ROUGE-L {result.score[i]:.3f} with {self.ids[kept]}")
                self.dup_of[row] = kept
                self.score[row] = result.score[i]
            self.report.dedup = {"candidates_verified": dedup.candidates, "pairs_at_threshold": dedup.pairs}
            stage.count = len(rows)
            stage.note = f" ({dedup.candidates:,} candidate pairs verified)"

    def _repoint_exact(self, texts: list[str]) -> None:
        """Point exact duplicates whose first copy the near-duplicate stage dropped at the record that kept it out."""
        # The exact stage runs first, so its first copies can later lose to an earlier, similar
        # record; duplicate_of must always name a record that is in kept.
        for row in self.exact_rows:
            first = target = int(self.dup_of[row])
            while self.reason[target] is not None and self.dup_of[target] >= 0:
                target = int(self.dup_of[target])
            if target != first:
                self.dup_of[row] = target
                self.score[row] = rouge_l(texts[row], texts[target])
                self.detail[row] = (
                    f"same {self.exact_field} as {self.ids[first]} after normalisation, "
                    f"which is a {self.reason[first]} of {self.ids[target]}"
                )

    # ---- output ------------------------------------------------------------------------------

    def _prepare_out(self) -> Path:
        out = Path(self.settings.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-probe"
            probe.write_text("ok", encoding="utf-8")
            probe.unlink()
        except OSError as exc:
            raise OutputError(f"{out}: cannot write the output directory ({exc.strerror or exc})", "choose another --out") from None
        return out

    def _check_empty(self, frames: list[pl.DataFrame]) -> None:
        """Say which inputs hold no records; when none holds any there is nothing to filter."""
        empty = [str(p) for p, f in zip(self.settings.inputs, frames) if f.height == 0]
        if empty and len(empty) == len(frames):
            raise InputError(f"every input is empty: {', '.join(empty)}", "check the paths; a 0-byte file or an empty list has no records")
        for name in empty:
            self.console.print(f"warning: {name}: empty, no records read", markup=False, highlight=False)

    def _check_fields(self, df: pl.DataFrame) -> None:
        for rule in self.user_rules:
            if rule.name in self.enabled and rule.field not in df.columns:
                raise InputError(
                    f"{self.settings.rule_file}: rule {rule.name!r}: no field {rule.field!r} in the input",
                    f"columns are {', '.join(df.columns)}",
                )

    def _write(self, df: pl.DataFrame, texts: list[str], out: Path, advance: Callable[[int], None]) -> None:
        n = df.height
        ids = df["id"]
        reason = pl.Series("reason", self.reason, dtype=pl.String)
        has_dup = self.dup_of >= 0
        dup_rows = np.where(has_dup, self.dup_of, 0)
        dup_id = ids.gather(dup_rows).to_list() if n else []
        dup_text = [texts[i] for i in dup_rows.tolist()] if n else []
        for row, (ext_id, ext_text) in self.dup_ext.items():
            dup_id[row], dup_text[row] = ext_id, ext_text
        linked = has_dup.copy()
        if self.dup_ext:
            linked[list(self.dup_ext)] = True
        extra = pl.DataFrame({
            "reason": reason,
            "detail": pl.Series("detail", self.detail, dtype=pl.String),
            "duplicate_of": pl.Series("duplicate_of", dup_id, dtype=pl.String),
            "duplicate_text": pl.Series("duplicate_text", dup_text, dtype=pl.String),
            "score": pl.Series("score", np.round(self.score, 4), dtype=pl.Float64),
            "_linked": pl.Series("_linked", linked, dtype=pl.Boolean),
        })
        extra = extra.with_columns(
            pl.when(pl.col("_linked")).then(pl.col(c)).otherwise(None).alias(c) for c in ("duplicate_of", "duplicate_text", "score")
        ).drop("_linked")
        kept_mask = reason.is_null()
        kept = df.filter(kept_mask)
        rejected = pl.concat([df, extra], how="horizontal").filter(~kept_mask)
        kept_path = out / FILTER_KEPT[self.settings.format]
        _write_atomic(kept_path, lambda p: kept.write_parquet(p) if self.settings.format == "parquet" else kept.write_ndjson(p))
        # An earlier run in the other --format left its kept file: it would be read (and published) as this one.
        for fmt, name in FILTER_KEPT.items():
            if fmt != self.settings.format:
                (out / name).unlink(missing_ok=True)
        advance(kept.height)
        _write_atomic(out / REJECTED, rejected.write_ndjson)
        advance(n)
        self.report.outputs = {"kept": str(kept_path), "rejected": str(out / REJECTED), "report": str(out / FILTER_REPORT)}


def judge(cols: dict[str, list[str]], settings: RuleSettings, users: list[UserRule]) -> list[tuple[str, str] | None]:
    """The first rule each record of a slice breaks: built-ins in their order, then the user's."""
    ins, inp, out = cols["instruction"], cols["input"], cols["output"]
    verdicts: list[tuple[str, str] | None] = []
    for k in range(len(ins)):
        verdict = check(ins[k], inp[k], out[k], settings) if settings.enabled else None
        if verdict is None:
            for rule in users:
                why = rule.check(cols[rule.field][k])
                if why is not None:
                    verdict = (rule.name, why)
                    break
        verdicts.append(verdict)
    return verdicts


def _judge_slice(job: tuple[int, dict, RuleSettings, list[UserRule]]) -> tuple[int, list]:
    start, cols, settings, users = job
    return start, judge(cols, settings, users)


def _map_slices(slices, settings: RuleSettings, users: list[UserRule], parallel: bool):
    """Yield (start, verdicts) in order; big inputs use one process per core, a few slices in flight."""
    workers = os.cpu_count() or 1
    if not parallel or workers < 2:
        for start, cols in slices:
            yield start, judge(cols, settings, users)
        return
    import concurrent.futures
    import multiprocessing

    # spawn, not fork: polars and rapidfuzz keep thread pools a fork could copy mid-lock.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        window: collections.deque = collections.deque()
        for start, cols in slices:
            window.append(pool.submit(_judge_slice, (start, cols, settings, users)))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """Write through a temp file renamed over `path`: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private; outputs get the permissions any new file would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})", "free disk space or fix permissions") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summary_table(report: FilterReport, settings: FilterSettings) -> Table:
    """The on-screen summary: kept, rejected per rule, seconds per stage."""
    table = Table(title="selfinstruct filter", show_header=True)
    table.add_column("")
    table.add_column("records", justify="right")
    table.add_column("share", justify="right")
    total = max(report.total, 1)
    table.add_row("input", f"{report.total:,}", "100%")
    table.add_row("[green]kept[/]", f"{report.kept:,}", f"{report.kept / total:.1%}")
    if report.pii_redacted:
        table.add_row("  of which pii redacted", f"{report.pii_redacted:,}", f"{report.pii_redacted / total:.1%}")
    for rule in report.enabled:
        count = report.rejected.get(rule, 0)
        if count:
            table.add_row(f"rejected: {rule}", f"{count:,}", f"{count / total:.1%}")
    table.add_section()
    for stage, seconds in report.seconds.items():
        table.add_row(f"time: {stage}", f"{seconds:.2f} s", "")
    table.add_row("peak memory", f"{peak_rss_mb():,.0f} MiB", "")
    table.add_row("output", str(settings.out), "")
    return table
