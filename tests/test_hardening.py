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


# ---- hostile teachers ---------------------------------------------------------------------------


def ask(fake, max_tokens: int = 1000, retries: int = 3):
    """One request through the real Teacher; returns the Completion or the exception it raised."""
    import asyncio

    from selfinstruct.teacher import Teacher, TeacherSettings

    async def go():
        settings = TeacherSettings(model="fake-model", base_url=fake.base_url, timeout=5, retries=retries, concurrency=4,
                                   max_tokens=max_tokens)
        teacher = Teacher(settings, "sk-hardening-SECRET-123456")
        try:
            return await teacher.complete([{"role": "user", "content": "请写 3 个新任务"}])
        except Exception as exc:  # noqa: BLE001 - the test looks at what came out
            return exc
        finally:
            await teacher.aclose()

    return asyncio.run(go())


def test_no_credit_is_not_retried_and_says_check_billing():
    from fakes.openai_server import FakeTeacher
    from selfinstruct.errors import TeacherError

    with FakeTeacher(no_credit=True, retry_after=0.01) as fake:
        exc = ask(fake)
        stats = fake.stats
    assert isinstance(exc, TeacherError) and exc.exit_code == 1, repr(exc)
    assert "no credit" in exc.message and "billing" in exc.hint
    assert stats["requests_received"] == 1


def test_a_reply_far_beyond_max_tokens_is_rejected_as_oversized_with_a_bounded_prefix():
    from fakes.openai_server import FakeTeacher
    from selfinstruct.teacher import RequestFailed

    with FakeTeacher(reply_chars=300_000) as fake:
        exc = ask(fake, max_tokens=1000)
        stats = fake.stats
    assert isinstance(exc, RequestFailed), repr(exc)
    assert exc.errors == ["oversized"] and stats["requests_received"] == 1  # billed, and not asked again
    assert "300,000 characters" in exc.message and "--max-tokens 1000" in exc.message
    assert 100 < len(exc.message) <= 700 and "\n" not in exc.message
    assert exc.wasted.completion_tokens > 1000  # what the server billed is counted


def test_a_reply_within_its_limit_is_not_oversized():
    from fakes.openai_server import FakeTeacher

    with FakeTeacher(reply_chars=6000) as fake:
        done = ask(fake, max_tokens=1000)
    assert len(done.content) == 6000


@pytest.mark.parametrize(
    "body, needles",
    [
        ("html", ["text/html", "<!DOCTYPE html>", "/v1", "login"]),
        ("event-stream", ["text/event-stream", "data: {", "stream"]),
    ],
)
def test_a_200_that_is_not_a_completion_says_what_arrived(body, needles):
    from fakes.openai_server import FakeTeacher
    from selfinstruct.teacher import RequestFailed

    with FakeTeacher(body=body) as fake:
        exc = ask(fake)
        stats = fake.stats
    assert isinstance(exc, RequestFailed), repr(exc)
    for needle in needles:
        assert needle in exc.message, exc.message
    assert "Expecting value" not in exc.message
    assert stats["requests_received"] == 1  # the same page would come back: not retried


def test_generate_stops_at_once_with_exit_1_when_the_account_has_no_credit(tmp_path):
    import time

    from fakes.openai_server import FakeTeacher
    from test_generate import KEY, run_cli, seeds_file

    started = time.monotonic()
    with FakeTeacher(no_credit=True, retry_after=0.01) as fake:
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "5", "--base-url", fake.base_url, "--model", "m",
                       "--out", str(tmp_path / "run"), "--quiet", timeout=60)
        stats = fake.stats
    assert done.returncode == 1, done.stderr
    assert "no credit" in done.stderr and "billing" in done.stderr and "--concurrency" not in done.stderr
    assert "Traceback" not in done.stderr and "report it" not in done.stderr and KEY not in done.stderr
    assert stats["requests_received"] <= 16  # one wave of in-flight requests at most, no retries
    assert time.monotonic() - started < 30


def test_oversized_replies_are_never_stored_in_full(tmp_path):
    from fakes.openai_server import FakeTeacher
    from test_generate import run_cli, seeds_file

    out = tmp_path / "run"
    with FakeTeacher(reply_chars=2_000_000) as fake:
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "5", "--base-url", fake.base_url, "--model", "m",
                       "--out", str(out), "--max-tokens", "500", "--max-requests", "4", "--concurrency", "2", "--quiet", timeout=120)
        sent = fake.stats["requests_received"]
    assert "Traceback" not in done.stderr, done.stderr
    assert sent >= 1
    # 2,000,000 characters a reply: a single copy would be ~6 MB. What is kept is a bounded prefix per request.
    stored = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    assert stored < 20_000 * sent + 50_000, stored
    ledger = [json.loads(line) for line in (out / "requests.jsonl").read_text(encoding="utf-8").splitlines()]
    failed = [e for e in ledger if e.get("status") == "failed"]
    assert failed and all("oversized reply" in e["error"] and "2,000,000 characters" in e["error"] for e in failed)
    # Rejected under its own name, with the size and a bounded prefix, never as a generic request failure.
    assert all(e["error_kind"] == "oversized" for e in failed)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rejected and {r["reason"] for r in rejected} == {"oversized"} and all(len(r["detail"]) < 1000 for r in rejected)


def test_doctor_says_no_credit_and_names_an_html_reply(tmp_path):
    from fakes.openai_server import FakeTeacher
    from test_doctor import doctor

    with FakeTeacher(no_credit=True, retry_after=0.01) as fake:
        code, checks, _ = doctor(fake.base_url)
    assert code == 1
    row = checks["chat works"]
    assert row["status"] == "fail" and "no credit" in row["detail"] and "billing" in row["fix"] and "--concurrency" not in row["fix"]

    with FakeTeacher(body="html") as fake:
        code, checks, _ = doctor(fake.base_url)
    row = checks["chat works"]
    assert code == 1 and row["status"] == "fail" and "text/html" in row["detail"] and "/v1" in row["detail"]
    # GET /models got the page too: named as such, never "reachable ok (HTTP None)" nor an SDK internal error.
    row = checks["reachable"]
    assert row["status"] == "warn" and "HTML page" in row["detail"] and "HTTP None" not in row["detail"]


def test_a_body_over_the_byte_cap_is_oversized_even_without_max_tokens():
    from fakes.openai_server import FakeTeacher
    from selfinstruct.teacher import MAX_REPLY_BYTES, RequestFailed

    with FakeTeacher(reply_chars=MAX_REPLY_BYTES // 2) as fake:  # mostly Chinese: nearly 3 bytes a character
        exc = ask(fake, max_tokens=None)
    assert isinstance(exc, RequestFailed) and exc.errors == ["oversized"], repr(exc)[:300]
    assert "bytes" in exc.message and len(exc.message) <= 700
