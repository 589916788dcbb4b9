"""Run-directory files: torn last lines are cut, bad middle lines are errors, the manifest is atomic."""

from __future__ import annotations

import json

import pytest

from selfinstruct.errors import InputError, OutputError
from selfinstruct.rundir import RunDir, read_jsonl


def test_torn_last_line_is_dropped_and_cut_off(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "instr')
    assert [r["id"] for r in read_jsonl(path, repair=True)] == ["a", "b"]
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'


def test_complete_json_without_newline_counts_as_torn(tmp_path):
    # The newline is written with the line; a line without it may be a prefix that happens to parse.
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": 12}')
    assert [r["id"] for r in read_jsonl(path)] == ["a"]


def test_bad_line_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(InputError, match=f"{path}:2"):
        read_jsonl(path)


def test_append_then_resume_appends_after_repair(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare()
    run.append("records.jsonl", [{"id": "a", "text": "中文"}])
    run.close()
    with open(tmp_path / "run" / "records.jsonl", "ab") as fh:
        fh.write(b'{"id": "b"')  # a kill -9 mid-write
    again = RunDir(tmp_path / "run")
    assert [r["id"] for r in again.load("records.jsonl")] == ["a"]
    again.append("records.jsonl", [{"id": "c"}])
    again.close()
    assert [r["id"] for r in read_jsonl(tmp_path / "run" / "records.jsonl")] == ["a", "c"]


def test_manifest_is_replaced_atomically(tmp_path):
    run = RunDir(tmp_path)
    run.write_manifest({"n": 1})
    run.write_manifest({"n": 2})
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"n": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp files left behind


def test_unwritable_directory_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot write the run directory"):
        RunDir(blocker / "run").prepare()
