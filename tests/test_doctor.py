"""`selfinstruct doctor` against the fake teacher: each problem found, with its fix, in seconds."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from fakes.openai_server import FakeTeacher
from selfinstruct.doctor import RunShape, diagnose
from selfinstruct.pricing import resolve_price
from selfinstruct.teacher import TeacherSettings
from test_generate import KEY, run_cli


def doctor(fake_url: str, *extra: str, model: str = "fake-teacher", env: dict | None = None) -> tuple[int, dict, float]:
    started = time.monotonic()
    done = run_cli("doctor", "--base-url", fake_url, "--model", model, "--json", *extra, env=env, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    report = json.loads(done.stdout)
    return done.returncode, {c["name"]: c for c in report["checks"]}, time.monotonic() - started


def test_healthy_teacher_passes_every_check_in_a_few_requests():
    with FakeTeacher(latency=0.05) as fake:
        code, checks, seconds = doctor(fake.base_url)
        stats = fake.stats
    assert code == 0
    assert list(checks) == ["reachable", "model listed", "chat works", "quirks", "usage reported", "JSON mode", "parallel", "latency",
                            "context", "tokens/s", "price known", "flags"]
    assert all(c["status"] == "ok" for c in checks.values()), checks
    assert "10 of 10" in checks["chat works"]["detail"] and "none seen" in checks["quirks"]["detail"]
    assert checks["price known"]["detail"] == "local server: $0"
    # A full-size request, one short one alone and two at once, one JSON-mode request; /models, /props, /models.
    assert stats["requests_received"] == 5 and stats["other_requests"] == 3
    assert "in parallel" in checks["parallel"]["detail"] and checks["flags"]["detail"] == "--concurrency 16 --timeout 120"
    assert seconds < 10


def test_local_server_quirks_are_named_and_nothing_fails():
    quirks = dict(think=True, code_fence=True, reject_max_tokens=True, no_json_mode=True, usage_mode="zero")
    with FakeTeacher(**quirks) as fake:
        code, checks, _ = doctor(fake.base_url)
    assert code == 0
    seen = checks["quirks"]["detail"]
    assert "max_completion_tokens" in seen and "<think>" in seen and "code fences" in seen
    assert checks["chat works"]["status"] == "ok"
    assert checks["usage reported"]["status"] == "warn" and "estimated" in checks["usage reported"]["fix"]
    assert checks["JSON mode"]["status"] == "warn" and "falls back to the text template" in checks["JSON mode"]["fix"]


def test_json_mode_accepted_but_ignored_is_a_warning_not_ok():
    # A server that takes response_format without complaint and answers in text anyway: a run with
    # --json-mode would get nothing it could parse as JSON, so doctor must not call JSON mode supported.
    with FakeTeacher(ignore_json_mode=True) as fake:
        code, checks, _ = doctor(fake.base_url)
        stats = fake.stats
    assert code == 0  # worth knowing, not a failure
    row = checks["JSON mode"]
    assert row["status"] == "warn" and row["detail"].startswith("accepted but the reply is not JSON: ")
    assert "指令" in row["detail"] and row["fix"] == "leave --json-mode off"
    assert stats["last_request"]["response_format"] == {"type": "json_object"} and stats["requests_received"] == 5
    assert all(checks[n]["status"] == "ok" for n in checks if n != "JSON mode"), checks


def test_unreachable_teacher_fails_fast_with_the_url_fix():
    code, checks, seconds = doctor("http://127.0.0.1:9/v1")
    assert code == 1
    assert checks["reachable"]["status"] == "fail" and "--base-url" in checks["reachable"]["fix"]
    assert {checks[n]["status"] for n in ("model listed", "chat works", "JSON mode")} == {"skip"}
    assert seconds < 10


def test_unknown_model_lists_the_closest_names():
    with FakeTeacher(models=["Qwen2.5-7B-Instruct", "llama-3.1-8b", "mistral-small"]) as fake:
        code, checks, _ = doctor(fake.base_url, model="qwen2.5-7b")
    assert code == 1
    assert checks["model listed"]["status"] == "fail"
    assert checks["model listed"]["fix"].startswith("pass --model with one of: Qwen2.5-7B-Instruct")


def test_refused_key_is_a_failure_and_never_printed():
    with FakeTeacher(api_key="sk-the-right-one") as fake:
        done = run_cli("doctor", "--base-url", fake.base_url, "--model", "fake-teacher", env={"COLUMNS": "200"}, timeout=60)
    assert done.returncode == 1
    assert "refused the API key" in done.stdout and "FAIL" in done.stdout and "--api-key-env" in done.stdout
    assert KEY not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "knobs, status, needle",
    [
        ({"empty_length": True}, "fail", "raise --max-tokens"),
        ({"p_garbage": 1.0}, "fail", "--json-mode"),  # nothing parsed: not ready, whatever else works
        ({"p_429": 1.0, "retry_after": 0.05}, "fail", "--rpm"),
        ({"p_timeout": 1.0, "timeout_sleep": 5.0}, "fail", "raise --timeout"),
    ],
)
def test_chat_problems_come_with_their_fix(knobs, status, needle):
    with FakeTeacher(**knobs) as fake:
        code, checks, seconds = doctor(fake.base_url, "--timeout", "0.5")
    assert checks["chat works"]["status"] == status
    assert needle in checks["chat works"]["fix"]
    assert code == (1 if status == "fail" else 0)
    assert seconds < 15


def test_unknown_price_says_which_flags_to_pass():
    with FakeTeacher(models=["some-hosted-model"]) as fake:
        settings = TeacherSettings(model="some-hosted-model", base_url=fake.base_url, timeout=5, retries=1)
        report = asyncio.run(diagnose(settings, None, resolve_price("some-hosted-model", "hosted"), "en"))
    price = {c.name: c for c in report.checks}["price known"]
    assert price.status == "warn" and "--price-in" in price.fix
    assert report.ok  # a missing price is worth knowing, not a failure


@pytest.mark.parametrize(
    "url, secret",
    [
        ("http://user:PWSECRET1@127.0.0.1:{port}/v1", "PWSECRET1"),
        ("http://127.0.0.1:{port}/v1?api-key=QSECRET2", "QSECRET2"),
    ],
)
def test_credentials_in_the_url_never_show_in_the_table_or_the_json(url, secret):
    with FakeTeacher() as fake:
        full = url.format(port=fake.base_url.split(":")[2].split("/")[0])
        table = run_cli("doctor", "--base-url", full, "--model", "fake-teacher", env={"COLUMNS": "250"}, timeout=60)
        as_json = run_cli("doctor", "--base-url", full, "--model", "fake-teacher", "--json", timeout=60)
    for done in (table, as_json):
        assert secret not in done.stdout + done.stderr, done.stdout
        assert "Traceback" not in done.stderr
    assert "127.0.0.1" in table.stdout and "***" in table.stdout


def test_a_closed_port_is_unreachable_whatever_the_url_holds():
    code, checks, _ = doctor("http://user:PW@127.0.0.1:9/v1")
    assert code == 1
    assert checks["reachable"]["status"] == "fail" and "HTTP None" not in checks["reachable"]["detail"]
    assert "PW" not in json.dumps(checks)


def probe(fake: FakeTeacher, **shape) -> tuple[dict, object]:
    """doctor in-process against a fake, for the run `shape` describes."""
    settings = TeacherSettings(model="fake-teacher", base_url=fake.base_url, timeout=shape.get("timeout", 120.0), retries=1, concurrency=2)
    report = asyncio.run(diagnose(settings, None, resolve_price("fake-teacher", "local"), "zh", shape=RunShape(**shape)))
    return {c.name: c for c in report.checks}, report


def test_a_one_at_a_time_server_is_seen_and_the_flags_say_concurrency_1():
    # A llama.cpp server with one slot: 16 requests in flight would wait 16 × latency, past --timeout.
    with FakeTeacher(latency=0.3, slots=1) as fake:
        checks, report = probe(fake, concurrency=16, timeout=3.0)
    assert checks["parallel"].status == "warn" and "one request at a time" in checks["parallel"].detail
    assert "--concurrency 1" in checks["parallel"].fix
    latency = checks["latency"]
    assert latency.status == "warn" and "over --timeout 3 s" in latency.detail and "16 ×" in latency.detail
    assert report.flags.startswith("--concurrency 1 --timeout ")
    assert report.ok  # slow is worth knowing; a run with the flags works


def test_a_parallel_server_is_not_called_serial():
    with FakeTeacher(latency=0.3, slots=4) as fake:
        checks, report = probe(fake, concurrency=4)
    assert checks["parallel"].status == "ok" and "in parallel" in checks["parallel"].detail
    assert checks["latency"].status == "ok" and report.flags == "--concurrency 4 --timeout 120"


@pytest.mark.parametrize("where, source", [("props", "llama.cpp /props"), ("models", "vLLM max_model_len")])
def test_the_context_is_read_where_the_server_tells_it(where, source):
    # 2,048 tokens hold the probe's reply, not the prompt plus a full --max-tokens 3072.
    with FakeTeacher(context=2048, report_context=where, slots=2 if where == "props" else None, latency=0.2) as fake:
        checks, report = probe(fake, max_tokens=3072, concurrency=8)
    context = checks["context"]
    assert context.status == "warn" and context.detail.startswith(f"2,048 tokens ({source})"), context
    assert "--max-tokens" in context.fix and "--max-tokens" in report.flags
    if where == "props":  # total_slots: a run needs no more in flight than the server works on
        assert "(2 slots)" in checks["parallel"].detail and report.flags.startswith("--concurrency 2 ")


def test_a_reply_cut_by_the_context_is_named_with_its_fix_and_is_not_ready():
    with FakeTeacher(context=600) as fake:
        checks, report = probe(fake)
    context = checks["context"]
    assert context.status == "fail" and "server's context, not --max-tokens 3072" in context.detail, context
    assert "--num-examples" in context.fix and "--ctx-size" in context.fix
    assert not report.ok
