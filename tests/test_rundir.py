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


@pytest.mark.parametrize(
    "manifest, field",
    [
        ({"config": 5, "seeds": "x"}, "config"),
        ({"seeds": "x"}, "seeds"),
        ({"templates": {"generate": "abc"}}, "templates.generate"),
        ({"evol": {"rounds_completed": "two"}}, "evol.rounds_completed"),
        ({"created": 7}, "created"),
        ([1, 2], "the manifest"),
    ],
)
def test_a_manifest_of_the_wrong_shape_names_the_field(tmp_path, manifest, field):
    run = RunDir(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(InputError) as err:
        run.load_manifest()
    assert err.value.exit_code == 2
    assert f"{tmp_path / 'manifest.json'}: {field}" in err.value.message and "must be" in err.value.message


def test_a_well_formed_manifest_loads(tmp_path):
    run = RunDir(tmp_path)
    good = {"created": "2026-01-01T00:00:00+00:00", "config": {"model": "m"}, "seeds": {"sha256": "x"},
            "templates": {"generate": {"sha256": "y"}}, "teacher": {"model": "m"}, "evol": {"rounds_completed": 1},
            "counts": {"kept": 3}, "stages": {"generate": {"requests": 1}}}
    (tmp_path / "manifest.json").write_text(json.dumps(good), encoding="utf-8")
    assert run.load_manifest() == good


def test_a_prepared_run_always_has_records_jsonl(tmp_path):
    run = RunDir(tmp_path / "new")
    run.prepare()
    assert (tmp_path / "new" / "records.jsonl").read_bytes() == b""
    (tmp_path / "new" / "records.jsonl").write_text('{"id": "a"}\n', encoding="utf-8")
    run.prepare()  # a resumed run keeps what it had
    assert (tmp_path / "new" / "records.jsonl").read_text(encoding="utf-8") == '{"id": "a"}\n'
