"""Shared test fixtures: paths to the third-party files in ../shared and a seed-file writer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
# tests/fakes is importable as `fakes` from every test.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def fixture_path(name: str) -> Path:
    """A third-party fixture file; the test is skipped when ../shared is not checked out beside the repo."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {path} not available")
    return path


@pytest.fixture
def write_seeds(tmp_path):
    """Write seed lines (strings or bytes) to a file and return its path."""

    def write(lines, name="seeds.jsonl") -> Path:
        path = tmp_path / name
        if isinstance(lines, bytes):
            path.write_bytes(lines)
        else:
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write


def finished(ledger: list[dict]) -> list[dict]:
    """The ledger lines of requests that came back (ok or failed), without the `dispatched` lines written before each request left."""
    return [entry for entry in ledger if entry.get("status") in ("ok", "failed")]
