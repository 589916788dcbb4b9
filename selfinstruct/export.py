"""Exports: a run's kept rows written as parquet (and JSONL) shards with a dataset card, laid out the way the Hub stores them."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from selfinstruct.errors import OutputError
# Re-exported: evolution imports prompt_text from here, and older callers build rows through export.
from selfinstruct.rows import (DATA_DIR, FORMATS, Build, build, check_format, convert, holdout_count, infer_lang,  # noqa: F401
                               load_run, prompt_text, split, status_note)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    path: Path
    files: list[Path]
    rows: dict[str, int]


_OURS = re.compile(r"^(data/[A-Za-z0-9_.-]+-\d{5}-of-\d{5}\.parquet|[A-Za-z0-9_.-]+\.jsonl|figures/[a-z_-]+\.png|README\.md)$")


def _previous_export(to: Path) -> bool:
    """Whether `to` holds only what an earlier export wrote, so it may be replaced."""
    from selfinstruct.card import is_generated

    readme = to / "README.md"
    if not readme.exists() or not is_generated(readme.read_text(encoding="utf-8", errors="replace")):
        return False
    for path in to.rglob("*"):
        if path.is_file() and not _OURS.match(path.relative_to(to).as_posix()):
            return False
    return True


def _check_target(run_dir: Path, to: Path) -> None:
    if to.resolve() == Path(run_dir).resolve():
        raise OutputError(f"{to}: is the run directory itself", "export to another directory, e.g. --to exports/<name>")
    if to.exists() and not to.is_dir():
        raise OutputError(f"{to}: exists and is not a directory", "choose another --to")
    if to.is_dir() and any(to.iterdir()) and not _previous_export(to):
        raise OutputError(f"{to}: is not empty and was not written by selfinstruct export", "choose an empty or new --to directory")


def export_run(
    run_dir: Path,
    to: Path,
    fmt: str = "alpaca",
    *,
    jsonl: bool = False,
    test_size: float | None = None,
    seed: int = 42,
    slim: bool = False,
    system: str | None = None,
    license: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write parquet shards (and JSONL) plus a dataset card to `to`, laid out the way the Hub stores them."""
    from selfinstruct.card import local_card
    from selfinstruct.report import card_figures

    check_format(fmt)
    to = Path(to)
    _check_target(run_dir, to)
    b = build(run_dir, fmt, test_size=test_size, seed=seed, slim=slim, system=system)
    quiet_datasets()
    dd = b.dataset_dict()
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        # Write next to the target and move into place: a failed export leaves no half-written shards.
        stage = Path(tempfile.mkdtemp(prefix=f".{to.name}.", dir=to.parent))
    except OSError as exc:
        raise OutputError(f"{to}: cannot write ({exc.strerror or exc})", "choose another --to or fix permissions") from None
    try:
        written: list[str] = []
        sizes: dict[str, int] = {}
        (stage / DATA_DIR).mkdir()
        for name, ds in dd.items():
            rel = f"{DATA_DIR}/{name}-00000-of-00001.parquet"
            ds.to_parquet(str(stage / rel))
            sizes[name] = (stage / rel).stat().st_size
            written.append(rel)
            if jsonl:
                ds.to_json(str(stage / f"{name}.jsonl"), lines=True, force_ascii=False)
                written.append(f"{name}.jsonl")
        figures = card_figures(run_dir)
        for rel, png in figures.items():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_bytes(png)
            written.append(rel)
        existing = (to / "README.md").read_text(encoding="utf-8") if (to / "README.md").exists() else None
        (stage / "README.md").write_text(local_card(b, dd, sizes, to, existing=existing, license=license, figures=figures), encoding="utf-8")
        written.append("README.md")
        to.mkdir(exist_ok=True)
        for old in list(to.rglob("*")):  # only our files are left here: _check_target made sure
            if old.is_file() and old.relative_to(to).as_posix() not in written:
                old.unlink()
        for rel in written:
            (to / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, to / rel)
    except OSError as exc:
        raise OutputError(f"{to}: cannot write the export ({exc.strerror or exc})", "free disk space or fix permissions, then re-run") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if echo:
        for line in status_note(b):
            echo(line)
    return ExportResult(to, [to / rel for rel in written], {name: len(rows) for name, rows in b.splits.items()})


def quiet_datasets() -> None:
    """Keep `datasets` and the Hub client from drawing bars and logging internals into a CLI's output."""
    import datasets
    from huggingface_hub.utils import disable_progress_bars

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    disable_progress_bars()
