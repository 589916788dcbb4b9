"""The quality gate: verdict parsing, and `judge` / `generate --judge` end to end against the fake teacher.

End-to-end runs use the real CLI in a subprocess against the shared fake server on 127.0.0.1, whose
replies to rubric prompts come from fakes.judge_replies (deterministic; trigger words in a record's
instruction pick the verdict's score and form). They prove the plumbing, not the judge's judgement.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, finished
from fakes.judge_replies import JudgeReplies
from fakes.openai_server import FakeTeacher
from selfinstruct.config import resolve
from selfinstruct.errors import ConfigError
from selfinstruct.judging import Verdict, parse_verdict

KEY = "sk-test-JUDGE-0123456789abcdef"


def cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "OPENAI_API_KEY": KEY, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "selfinstruct", *args], env=full_env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    proc = cli(*args, **kw)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []


def write_records(path: Path, words: list[str]) -> Path:
    """One record per trigger word (its position makes each instruction distinct)."""
    rows = [{"id": f"k{i}", "instruction": f"写一首关于春天的短诗 {w} 第{i}首", "input": "", "output": "春风吹绿江南岸，燕子归来筑新巢。"}
            for i, w in enumerate(words)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def by_id(rows: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in rows}


# ---- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, score", [
    ('{"score": 4, "safe": true, "reason": "good"}', 4),
    ('{"score": "5", "reason": "很好"}', 5),
    ('{"Score": 4.0, "reason": "x"}', 4),
    ('```json\n{"score": 2, "reason": "wrong fact"}\n```', 2),
    ('<think>maybe score: 1? no.</think>\n{"score": 5, "reason": "fine"}', 5),
    ("Score: 4\nReason: follows the instruction", 4),
    ("**Score**: 3 - incomplete", 3),
    ("评分：4\n理由：回答正确", 4),
    ("**评分**：2", 2),
    ("得分: 1，答非所问", 1),
    ("4/5 — minor flaws", 4),
    ("我给 3 分，因为不完整。", 3),
    ("5", 5),
    ("<think>long reasoning</think>\n\nScore: 2", 2),
    ("Score: 4/5", 4),
    ("I would rate this 4 out of 5.", 4),
    ("满分5分，我给4分。", 4),
])
def test_each_reply_form_is_read(reply, score):
    verdict = parse_verdict(reply)
    assert verdict is not None and verdict.score == score


@pytest.mark.parametrize("reply", [
    "This looks fine to me.",
    '{"score": 9, "reason": "out of range"}',
    "Score: 8/10",
    "",
    "<think>I think score: 4 but I ran out of tokens",
    '{"reason": "no score"}',
    "Score: 10",
    "Rating: 7 out of 10",
])
def test_unreadable_replies_are_none(reply):
    assert parse_verdict(reply) is None


def test_reason_and_safety_are_kept():
    assert parse_verdict('{"score": 1, "safe": false, "reason": "harmful"}') == Verdict(1, "harmful", False)
    text = parse_verdict("评分：4\n理由：翻译准确")
    assert text.reason == "翻译准确" and text.safe is None


@pytest.mark.parametrize("value", [0.5, 5.5])
def test_min_score_out_of_range_is_a_config_error(value):
    with pytest.raises(ConfigError, match="--min-score"):
        resolve({"min_score": value}, environ={})


# ---- the judge command -----------------------------------------------------------------------

FORMS = ["JS5", "JS4", "JS2", "JTEXT JS4", "JZH JS5", "JFRAC JS4", "JFENCE JS3", "JTHINK JS4", "JBAD", "JBAD1 JS5", "JRANGE", "JS1"]


@pytest.fixture
def judge_fake():
    replies = JudgeReplies()
    with FakeTeacher(reply=replies) as fake:
        fake.replies = replies
        yield fake


def judge_cli(fake, inputs: Path, out: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    return run_cli("judge", str(inputs), "--out", str(out), "--base-url", fake.base_url, "--model", "fake-judge",
                   "--price-in", "1", "--price-out", "2", "--quiet", *extra, **kw)


def test_judge_scores_thresholds_and_parse_fallbacks(tmp_path, judge_fake):
    inputs = write_records(tmp_path / "in.jsonl", FORMS)
    out = tmp_path / "out"
    result = judge_cli(judge_fake, inputs, out)
    assert result.returncode == 0, result.stderr
    kept, rejected = by_id(read_jsonl(out / "records.jsonl")), by_id(read_jsonl(out / "rejected.jsonl"))
    assert set(kept) | set(rejected) == {f"k{i}" for i in range(len(FORMS))} and not set(kept) & set(rejected)
    # Every text form was read: its score decides, against the default --min-score 4.
    for i, word in enumerate(FORMS):
        rid = f"k{i}"
        if word in ("JBAD", "JRANGE"):
            assert rejected[rid]["reason"] == "judge-failed" and "twice" in rejected[rid]["detail"]
            assert rejected[rid]["meta"]["judge_request_ids"] == [f"rate:1:{rid}", f"rate:2:{rid}"]
            continue
        score = int(word.split("JS")[-1][0])
        rec = kept.get(rid) or rejected.get(rid)
        assert rec["meta"]["judge"]["score"] == score, word
        if score >= 4:
            assert rid in kept, word
            assert rec["meta"]["judge"]["reason"]
        else:
            assert rejected[rid]["reason"] == "low-score" and rejected[rid]["detail"].startswith(f"{score}/5 < --min-score 4")
    # The unreadable first reply was asked again once, and the retry's verdict kept.
    assert kept["k9"]["meta"]["judge_request_ids"] == ["rate:1:k9", "rate:2:k9"]

    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["status"] == "completed"
    assert m["judge"]["histogram"] == {"1": 1, "2": 1, "3": 1, "4": 4, "5": 3}
    assert m["judge"]["min_score"] == 4 and m["judge"]["template"]["name"] == "judge_zh.jinja" and len(m["judge"]["template"]["sha256"]) == 64
    assert m["counts"]["kept"] == len(kept) == 7 and m["counts"]["rejected"] == {"judge-failed": 2, "low-score": 3}
    ledger = finished(read_jsonl(out / "requests.jsonl"))
    # 12 records, 3 retries (JBAD, JBAD1, JRANGE): every request reached the teacher once and is ledgered as the judge stage.
    assert len(ledger) == 15 == judge_fake.stats["requests_received"] == m["stages"]["judge"]["requests"]
    assert {e["stage"] for e in ledger} == {"judge"} and {e["route"] for e in ledger} == {"judge"}
    assert judge_fake.stats["last_request"]["response_format"] == {"type": "json_object"}
    assert judge_fake.stats["last_request"]["temperature"] == 0.0
    usage = sum(e["usage"]["prompt_tokens"] for e in ledger), sum(e["usage"]["completion_tokens"] for e in ledger)
    assert m["stages"]["judge"]["usd"] == pytest.approx((usage[0] * 1 + usage[1] * 2) / 1e6, abs=1e-6)

    # Resuming this run with another threshold would mix two gates: refused, one line.
    again = judge_cli(judge_fake, inputs, out, "--min-score", "3")
    assert again.returncode == 2 and "--min-score (was 4.0)" in again.stderr and "Traceback" not in again.stderr

    # A lower threshold keeps what scored 3 and up: a new run over the same records, replies identical.
    low = tmp_path / "low"
    assert judge_cli(judge_fake, inputs, low, "--min-score", "3").returncode == 0
    assert {r["id"] for r in read_jsonl(low / "records.jsonl")} == set(kept) | {"k6"}


def test_failed_judge_requests_are_rejected_never_kept(tmp_path):
    inputs = write_records(tmp_path / "in.jsonl", ["JS5", "JS4", "JS5"])
    with FakeTeacher(reply=JudgeReplies(), p_500=1.0) as fake:
        result = run_cli("judge", str(inputs), "--out", str(tmp_path / "out"), "--base-url", fake.base_url, "--model", "m",
                         "--retries", "0", "--quiet")
    assert result.returncode == 0, result.stderr
    assert read_jsonl(tmp_path / "out" / "records.jsonl") == []
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert [r["reason"] for r in rejected] == ["judge-failed"] * 3
    assert all(r["detail"].startswith("the judge request failed") for r in rejected)


def test_a_server_without_json_mode_gets_the_rubric_as_text(tmp_path):
    inputs = write_records(tmp_path / "in.jsonl", ["JS5", "JTEXT JS2", "JS4"])
    with FakeTeacher(reply=JudgeReplies(), no_json_mode=True) as fake:
        result = run_cli("judge", str(inputs), "--out", str(tmp_path / "out"), "--base-url", fake.base_url, "--model", "m",
                         "--concurrency", "1", "--quiet")
        stats = fake.stats
    assert result.returncode == 0, result.stderr
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "out" / "records.jsonl")) == ["k0", "k2"]
    m = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert "response_format" in m["judge"]["json_mode_fallback"]
    # Refused once, then every verdict asked as text: one 400, three answers.
    assert stats["by_status"] == {"400": 1, "200": 3}


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL])
def test_resume_pays_nothing_twice(tmp_path, kill):
    words = [f"JS{1 + i % 5}" for i in range(40)] + ["JBAD1 JS5"] * 4
    inputs = write_records(tmp_path / "in.jsonl", words)
    out = tmp_path / "out"
    with FakeTeacher(reply=JudgeReplies(), latency=0.15) as fake:
        args = ("judge", str(inputs), "--out", str(out), "--base-url", fake.base_url, "--model", "m", "--concurrency", "4",
                "--grace", "5", "--quiet")
        proc = cli(*args)
        deadline = time.monotonic() + 30
        while len(finished(read_jsonl(out / "requests.jsonl"))) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(kill)
        proc.communicate(timeout=30)
        first = read_jsonl(out / "requests.jsonl")
        paid = {e["request_id"] for e in finished(first)}
        assert 10 <= len(paid) < 48
        sent_before = fake.stats["requests_received"]
        if kill == signal.SIGKILL:
            # As if every kill fell between a verdict's ledger line and its record: the ledger alone must replay them.
            (out / "records.jsonl").write_text("", encoding="utf-8")
            (out / "rejected.jsonl").unlink(missing_ok=True)
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        total = fake.stats["requests_received"]
    ledger = finished(read_jsonl(out / "requests.jsonl"))
    ids = [e["request_id"] for e in ledger]
    # 44 verdicts and 4 retries, each finished exactly once across both runs; the resume sent only what was not paid.
    assert len(ids) == len(set(ids)) == 48
    assert total - sent_before == 48 - len(paid)
    kept, rejected = read_jsonl(out / "records.jsonl"), read_jsonl(out / "rejected.jsonl")
    assert len(kept) + len(rejected) == 44 and len({r["id"] for r in kept + rejected}) == 44
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["status"] == "completed" and m["stages"]["judge"]["requests"] == 48


# ---- moderation ------------------------------------------------------------------------------


def test_moderation_flags_kept_records(tmp_path):
    inputs = write_records(tmp_path / "in.jsonl", ["JS5", "JS5 FLAGME", "JS2 FLAGME", "JUNSAFE"])
    with FakeTeacher(reply=JudgeReplies(), moderation="FLAGME") as fake:
        result = run_cli("judge", str(inputs), "--out", str(tmp_path / "out"), "--base-url", fake.base_url, "--model", "m",
                         "--moderate", "--quiet")
        stats = fake.stats
    assert result.returncode == 0, result.stderr
    kept, rejected = by_id(read_jsonl(tmp_path / "out" / "records.jsonl")), by_id(read_jsonl(tmp_path / "out" / "rejected.jsonl"))
    assert rejected["k1"]["reason"] == "moderation" and rejected["k1"]["detail"] == "flagged: harassment, violence"
    assert rejected["k1"]["meta"]["moderation"] == {"source": "endpoint", "flagged": True, "categories": ["harassment", "violence"]}
    assert rejected["k2"]["reason"] == "low-score"  # the judge first: moderation screens only what it keeps
    # With an endpoint, the endpoint decides (the judge's "safe": false is recorded, not acted on).
    assert set(kept) == {"k0", "k3"} and kept["k0"]["meta"]["moderation"]["flagged"] is False
    assert stats["moderation_requests"] == 3
    m = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert m["judge"]["moderation"] == "endpoint" and m["counts"]["rejected"] == {"low-score": 1, "moderation": 1}


def test_no_moderation_endpoint_falls_back_to_the_judges_safety_verdict(tmp_path):
    inputs = write_records(tmp_path / "in.jsonl", ["JS5", "JUNSAFE", "JS4", "JS5", "JS4"])
    with FakeTeacher(reply=JudgeReplies()) as fake:  # no moderation knob: POST /v1/moderations is a 404
        result = run_cli("judge", str(inputs), "--out", str(tmp_path / "out"), "--base-url", fake.base_url, "--model", "m",
                         "--moderate", "--concurrency", "1", "--quiet")
        stats = fake.stats
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("has no /v1/moderations") == 1
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert [(r["id"], r["reason"]) for r in rejected] == [("k1", "moderation")]
    assert "unsafe (judge)" in rejected[0]["detail"]
    assert stats["moderation_requests"] == 1  # asked once, then never again
    m = json.loads((tmp_path / "out" / "manifest.json").read_text(encoding="utf-8"))
    assert m["judge"]["moderation"] == "judge-safety"


# ---- generate --judge ------------------------------------------------------------------------


def seeds_file(tmp_path: Path) -> Path:
    rows = [("解释为什么天空是蓝色的", "", "因为大气对短波长的蓝光散射更强。"), ("写一首关于秋天的五言绝句", "", "西风吹落叶，孤雁过寒塘。"),
            ("把下面的句子翻译成英文", "我喜欢读书", "I like reading."), ("判断下面评论的情感倾向", "这家店的菜太难吃了", "负面")]
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps({"id": f"s{i}", "name": "t", "instruction": a, "instances": [{"input": b, "output": c}],
                                        "is_classification": False}, ensure_ascii=False) + "\n" for i, (a, b, c) in enumerate(rows)),
                    encoding="utf-8")
    return path


def test_generate_judge_gates_the_run_with_a_judge_of_another_price(tmp_path, judge_fake):
    out = tmp_path / "run"
    base = ("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "30", "--out", str(out), "--base-url", judge_fake.base_url,
            "--model", "teacher-m", "--price-in", "0.5", "--price-out", "1.5")
    args = (*base, "--judge", "--judge-model", "judge-m", "--judge-price-in", "10", "--judge-price-out", "20", "--quiet")
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    kept = read_jsonl(out / "records.jsonl")
    gated = [r for r in read_jsonl(out / "rejected.jsonl") if r["meta"]["stage"] == "judge"]
    assert kept and gated  # hash scores 1-5: some of each
    assert all(r["meta"]["judge"]["score"] >= 4 for r in kept)
    assert all(r["reason"] == "low-score" and r["meta"]["judge"]["score"] < 4 and r["meta"]["gated_stage"] == "generate" for r in gated)
    assert len(kept) + len(gated) == 30
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["counts"]["kept"] == len(kept) and m["counts"]["rejected"]["low-score"] == len(gated)
    assert m["teachers"]["judge"]["model"] == "judge-m" and m["teachers"]["judge"]["price_in_per_1m"] == 10
    assert m["judge"]["completed"] and sum(m["judge"]["histogram"].values()) == 30
    ledger = finished(read_jsonl(out / "requests.jsonl"))
    for stage, (pin, pout) in (("generate", (0.5, 1.5)), ("judge", (10, 20))):
        lines = [e for e in ledger if e["stage"] == stage]
        tokens = sum(e["usage"]["prompt_tokens"] for e in lines), sum(e["usage"]["completion_tokens"] for e in lines)
        assert m["stages"][stage]["usd"] == pytest.approx((tokens[0] * pin + tokens[1] * pout) / 1e6, abs=1e-6)
        assert m["stages"][stage]["requests"] == len(lines)
    assert m["cost"]["usd"] == pytest.approx(m["stages"]["generate"]["usd"] + m["stages"]["judge"]["usd"], abs=1e-6)

    # Re-running the finished command pays for nothing and changes nothing.
    before = judge_fake.stats["requests_received"]
    again = run_cli(*args[:-1])
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr and judge_fake.stats["requests_received"] == before
    assert read_jsonl(out / "records.jsonl") == kept
    # Without the gate, a re-run would refill records.jsonl with unjudged records: refused.
    ungated = run_cli(*base, "--quiet")
    assert ungated.returncode == 2 and "re-run with --judge" in ungated.stderr and "Traceback" not in ungated.stderr
    assert judge_fake.stats["requests_received"] == before and read_jsonl(out / "records.jsonl") == kept


# ---- the card --------------------------------------------------------------------------------


def test_card_names_the_judge_rubric_threshold_histogram_and_cost(tmp_path):
    from fakes.sample_run import JUDGE_SHA, make_run
    from selfinstruct.card import hub_card
    from selfinstruct.export import build

    card = hub_card(build(make_run(tmp_path / "run", judge=True), "alpaca"), None, "alice/x")
    for needle in ("| Quality judge | `gpt-4o-mini`, records scored below 4 of 5 rejected |",
                   f"(`judge_zh.jinja`, sha256 `{JUDGE_SHA}`)", "| 5 | 7 | 53.8% |", "| 2 | 1 | 7.7% |", "| **judged** | **13** | |",
                   "kept records were sent to the endpoint's moderation", "| judge | 13 | 9,000 | 600 | $0.0017 |",
                   "| `low-score` | the quality judge scored it below the threshold"):
        assert needle in card, needle
    plain = hub_card(build(make_run(tmp_path / "plain"), "alpaca"), None, "alice/x")
    assert "Quality judge" not in plain and "low-score" not in plain


# ---- in place, after generate and evolve ------------------------------------------------------


def test_generate_judge_killed_in_the_gate_resumes_without_paying_twice(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(reply=JudgeReplies(), latency=0.1) as fake:
        args = ("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "60", "--out", str(out), "--base-url", fake.base_url,
                "--model", "m", "--concurrency", "4", "--judge", "--quiet")
        proc = cli(*args)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(e.get("stage") == "judge" for e in finished(read_jsonl(out / "requests.jsonl"))) < 10:
            time.sleep(0.05)
        proc.kill()
        proc.communicate(timeout=30)
        first = finished(read_jsonl(out / "requests.jsonl"))
        generated = [e for e in first if e["stage"] == "generate"]
        paid = {e["request_id"] for e in first if e["stage"] == "judge"}
        assert 10 <= len(paid) < 60
        # Killed mid-gate: records.jsonl is still the generation's; the gate's rejections so far are in rejected.jsonl.
        assert len(read_jsonl(out / "records.jsonl")) == 60
        sent = fake.stats["requests_received"]
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        resent = fake.stats["requests_received"] - sent
    ledger = finished(read_jsonl(out / "requests.jsonl"))
    assert [e for e in ledger if e["stage"] == "generate"] == generated  # generation was complete: nothing asked again
    judged = [e["request_id"] for e in ledger if e["stage"] == "judge"]
    assert len(judged) == len(set(judged)) == 60 and resent == 60 - len(paid)
    kept = read_jsonl(out / "records.jsonl")
    gated = [r for r in read_jsonl(out / "rejected.jsonl") if r["meta"]["stage"] == "judge"]
    assert len(kept) + len(gated) == 60 and len({r["id"] for r in kept + gated}) == 60
    assert all(r["meta"]["judge"]["score"] >= 4 for r in kept)
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["counts"]["kept"] == len(kept) and m["counts"]["rejected"].get("low-score") == len(gated)


class EvolAndJudge:
    """Evol-Instruct replies from fakes.evol_replies, verdicts from fakes.judge_replies."""

    def __init__(self) -> None:
        from fakes.evol_replies import EvolReplies

        self.evol, self.judge = EvolReplies(), JudgeReplies()

    def __call__(self, body, rng):
        users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
        if users and ("### 回答" in users[0] or "### Response" in users[0]):
            return self.judge(body, rng)
        return self.evol(body, rng)


def test_evolve_judge_gates_originals_and_evolutions(tmp_path):
    from fakes.evol_replies import task_rows

    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in task_rows(12, "zh")), encoding="utf-8")
    out = tmp_path / "evolved"
    with FakeTeacher(reply=EvolAndJudge()) as fake:
        args = ("evolve", str(inputs), "--out", str(out), "--base-url", fake.base_url, "--model", "m", "--judge", "--min-score", "3",
                "--quiet")
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        kept = read_jsonl(out / "records.jsonl")
        gated = [r for r in read_jsonl(out / "rejected.jsonl") if r["meta"]["stage"] == "judge"]
        assert kept and gated and all(r["meta"]["judge"]["score"] >= 3 for r in kept)
        assert {r["meta"]["gated_stage"] for r in gated} <= {"input", "evolve"}
        m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        assert m["counts"]["kept"] == len(kept) and m["counts"]["rejected"]["low-score"] == len(gated)
        assert m["judge"]["judged"] == len(kept) + len(gated) and "evol" in m and m["input"]["records"] == 12
        before = fake.stats["requests_received"]
        again = run_cli(*args[:-1])  # without --quiet, to read what it says
        assert again.returncode == 0 and "nothing to do" in again.stderr
        assert fake.stats["requests_received"] == before and read_jsonl(out / "records.jsonl") == kept


def test_moderate_without_judge_stops_where_the_endpoint_has_no_moderation(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(reply=JudgeReplies()) as fake:
        result = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "10", "--out", str(out), "--base-url", fake.base_url,
                         "--model", "m", "--moderate", "--quiet")
    assert result.returncode == 1 and "has no /v1/moderations" in result.stderr and "add --judge" in result.stderr
    assert len(read_jsonl(out / "records.jsonl")) == 10  # nothing rejected or rewritten unscreened


def test_records_judged_before_are_judged_again_by_this_gate(tmp_path, judge_fake):
    first = tmp_path / "first"
    assert judge_cli(judge_fake, write_records(tmp_path / "in.jsonl", ["JS5", "JS4", "JS3"]), first, "--min-score", "3").returncode == 0
    evolved = tmp_path / "evolved"
    # The judged records (meta.judge from the first judge) as the input of an evolve --judge with a stricter threshold.
    with FakeTeacher(reply=EvolAndJudge()) as fake:
        result = run_cli("evolve", str(first), "--out", str(evolved), "--base-url", fake.base_url, "--model", "m", "--judge",
                         "--min-score", "4", "--quiet")
    assert result.returncode == 0, result.stderr
    gated = {r["id"]: r for r in read_jsonl(evolved / "rejected.jsonl") if r["meta"]["stage"] == "judge"}
    assert gated["k2"]["reason"] == "low-score"  # kept at 3 by the first judge, not by this one
    assert all(r["meta"]["judge"]["score"] >= 4 for r in read_jsonl(evolved / "records.jsonl"))
