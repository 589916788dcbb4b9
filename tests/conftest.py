"""Shared test fixtures: paths to the third-party files in ../shared and a seed-file writer."""

from __future__ import annotations

import json
import os
import subprocess
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


def run_selfinstruct(*args: str, key: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI in a child process, with `key` as OPENAI_API_KEY and no SELFINSTRUCT_ settings from outside."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SELFINSTRUCT_")} | {"OPENAI_API_KEY": key}
    return subprocess.run([sys.executable, "-m", "selfinstruct", *args], env=environ, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSONL file; none when the file does not exist."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []
