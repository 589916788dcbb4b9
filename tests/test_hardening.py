"""Hostile inputs and servers (issue 12): each gets one clear error, and no file is ever lost."""

from __future__ import annotations

import gzip
import json
import sys

import pytest


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"instruction": "解释一下光合作用的过程。", "input": "", "output": "植物利用阳光把二氧化碳和水变成糖和氧气。"},
    {"instruction": "写一首关于秋天的五言绝句。", "input": "", "output": "西风吹落叶，孤雁过寒塘。"},
    {"instruction": "给出保持健康的三个建议。", "input": "", "output": "早睡早起，均衡饮食，坚持运动。"},
]


@pytest.fixture
def main_cli(monkeypatch, capsys):
    """The console entry point in-process: (exit code, captured out/err)."""
    from selfinstruct.cli import main

    def call(*args):
        monkeypatch.setattr(sys, "argv", ["selfinstruct", *map(str, args)])
        try:
            main()
        except SystemExit as exc:
            return exc.code or 0, capsys.readouterr()
        return 0, capsys.readouterr()

    return call


# ---- filter never deletes or overwrites what it reads -------------------------------------------


def test_filter_refuses_to_delete_its_own_input_when_the_format_changes(main_cli, tmp_path):
    data = jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "D"
    assert main_cli("filter", data, "--out", out, "--quiet")[0] == 0
    kept, rejected = (out / "kept.jsonl").read_bytes(), (out / "rejected.jsonl").read_bytes()
    code, captured = main_cli("filter", out / "kept.jsonl", "--out", out, "--format", "parquet", "--quiet")
    assert code == 2
    assert "would delete the input" in captured.err and "kept.jsonl" in captured.err
    assert (out / "kept.jsonl").read_bytes() == kept and (out / "rejected.jsonl").read_bytes() == rejected
    assert not (out / "kept.parquet").exists()


def test_filter_refuses_an_input_hard_linked_to_an_output(main_cli, tmp_path):
    import os

    data = jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "D"
    out.mkdir()
    os.link(data, out / "rejected.jsonl")
    code, captured = main_cli("filter", data, "--out", out, "--quiet")
    assert code == 2 and "would overwrite the input" in captured.err
    assert data.read_text(encoding="utf-8").count("\n") == 3


# ---- empty inputs -------------------------------------------------------------------------------


def _empty(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.jsonl.gz"])
def test_filter_on_only_empty_inputs_exits_2_naming_them(main_cli, tmp_path, name):
    path = _empty(tmp_path, name)
    code, captured = main_cli("filter", path, "--out", tmp_path / "o", "--quiet")
    assert code == 2, captured.err
    assert "every input is empty" in captured.err and name in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_filter_warns_about_an_empty_input_beside_real_ones(main_cli, tmp_path):
    data = jsonl(tmp_path / "in.jsonl", ROWS)
    empty = tmp_path / "none.jsonl.gz"
    empty.write_bytes(gzip.compress(b""))
    code, captured = main_cli("filter", data, empty, "--out", tmp_path / "o", "--quiet")
    assert code == 0, captured.err
    assert "warning:" in captured.err and "none.jsonl.gz" in captured.err and "no records" in captured.err
    assert len((tmp_path / "o" / "kept.jsonl").read_text(encoding="utf-8").splitlines()) == 3


# ---- usage errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, suggestion",
    [
        (["generate", "--max_cost", "3"], "--max-cost"),
        (["genrate"], "generate"),
    ],
)
def test_a_typo_prints_clicks_usage_with_its_suggestion_and_exits_2(main_cli, args, suggestion):
    code, captured = main_cli(*args)
    assert code == 2
    assert "Usage:" in captured.err and suggestion in captured.err
    assert "unexpected" not in captured.err and "report it" not in captured.err


# ---- run directories ----------------------------------------------------------------------------


def test_a_run_that_kept_nothing_is_still_a_run(main_cli, tmp_path):
    from fakes.openai_server import FakeTeacher
    from test_generate import run_cli, seeds_file

    out = tmp_path / "run"
    with FakeTeacher(p_garbage=1.0) as fake:
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "5", "--base-url", fake.base_url, "--model", "m",
                       "--out", str(out), "--max-requests", "2", "--quiet")
    assert done.returncode == 3, done.stderr
    assert (out / "records.jsonl").read_bytes() == b""
    code, captured = main_cli("export", out, "--to", tmp_path / "exported")
    assert code == 2 and "no kept records to export" in captured.err, captured.err
    code, captured = main_cli("filter", out, "--out", tmp_path / "filtered", "--quiet")
    assert code == 2 and "every input is empty" in captured.err, captured.err


@pytest.mark.parametrize("command", ["generate", "export"])
def test_a_hand_edited_manifest_of_the_wrong_shape_names_the_field(main_cli, tmp_path, command):
    from test_generate import run_cli, seeds_file

    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text('{"config": 5, "seeds": "x"}', encoding="utf-8")
    jsonl(run / "records.jsonl", [{"id": "a", **ROWS[0]}])
    if command == "generate":
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "5", "--out", str(run), "--model", "m",
                       "--base-url", "http://127.0.0.1:9/v1")
        code, err = done.returncode, done.stderr
    else:
        code, captured = main_cli("export", run, "--to", tmp_path / "exported")
        err = captured.err
    assert code == 2, err
    assert "manifest.json: config must be a JSON object, got an integer" in err
    assert "unexpected" not in err and "Traceback" not in err
