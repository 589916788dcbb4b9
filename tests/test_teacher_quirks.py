"""Teachers as they really are: each quirk of local and hosted servers, reproduced by the fake teacher."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from fractions import Fraction

import pytest

from conftest import finished
from fakes.openai_server import FakeTeacher, make_garbage, make_item, render_items
from selfinstruct.parsing import parse_reply
from selfinstruct.prompts import load_template
from selfinstruct.teacher import JsonModeUnsupported, Teacher, TeacherSettings
from test_generate import read_jsonl, run_cli, seeds_file

EXAMPLES = [
    {"instruction": "解释为什么天空是蓝色的", "input": "", "output": "因为大气对短波长的蓝光散射更强。"},
    {"instruction": "把下面的句子翻译成英文", "input": "我喜欢读书", "output": "I like reading."},
    {"instruction": "判断下面评论的情感倾向", "input": "这家店的菜太难吃了", "output": "负面"},
]
SEED_INSTRUCTIONS = {"解释为什么天空是蓝色的", "写一首关于秋天的五言绝句", "把下面的句子翻译成英文", "判断下面评论的情感倾向", "用三句话总结下面的段落"}


def prompt(json_mode: bool) -> list[dict[str, str]]:
    """The shipped Chinese template, rendered as a run renders it."""
    return load_template("generate_zh.jinja").render(examples=EXAMPLES, num_tasks=10, start_index=1, json_mode=json_mode)


def complete(fake: FakeTeacher, count: int = 1, json_mode: bool = False, fallback: bool = True, concurrency: int = 16):
    """`count` concurrent requests through the real Teacher; returns (results or exceptions, teacher)."""

    async def go():
        settings = TeacherSettings(model="fake-model", base_url=fake.base_url, timeout=5, retries=2, concurrency=concurrency)
        teacher = Teacher(settings, None)
        text = (lambda: prompt(False)) if fallback else None
        try:
            results = await asyncio.gather(
                *(teacher.complete(prompt(json_mode), json_mode=json_mode, text_messages=text) for _ in range(count)),
                return_exceptions=True,
            )
        finally:
            await teacher.aclose()
        return results, teacher

    return asyncio.run(go())


@pytest.mark.parametrize("mode", ["exact", "absent", "zero", "completion_one"])
def test_usage_as_reported_or_estimated(mode):
    with FakeTeacher(usage_mode=mode, seed=1) as fake:
        [result], _ = complete(fake)
        stats = fake.stats
    usage = result.usage
    if mode == "exact":
        assert (usage.prompt_tokens, usage.completion_tokens) == (stats["prompt_tokens_sent"], stats["completion_tokens_sent"])
        assert not usage.estimated
    else:
        assert usage.estimated and usage.prompt_tokens > 100 and usage.completion_tokens > 100
    if mode == "completion_one":
        # The prompt count it did report is plausible, so it is kept; only the completion is estimated.
        assert usage.prompt_tokens == stats["prompt_tokens_sent"]


def test_neither_n_nor_stop_strings_are_sent():
    # Servers that ignore `n` or stop sequences cannot change what we get, because we rely on neither.
    seen: list[dict] = []

    def reply(req, rng):
        seen.append(req)
        return "1. 指令：解释潮汐的成因\n输入：<无输入>\n输出：月球引力。"

    with FakeTeacher(reply=reply) as fake:
        [result], _ = complete(fake)
    assert result.content.startswith("1. 指令")
    assert seen and not {"n", "stop"} & set(seen[0])


@pytest.mark.parametrize("json_mode", [False, True])
@pytest.mark.parametrize("knobs", [{"think": True}, {"code_fence": True}, {"think": True, "code_fence": True}])
def test_reasoning_blocks_and_code_fences_are_stripped(knobs, json_mode):
    with FakeTeacher(seed=2, **knobs) as fake:
        [result], _ = complete(fake, json_mode=json_mode)
    assert "```" in result.content or "<think>" in result.content
    items = parse_reply(result.content, result.finish_reason, result.json_mode)
    assert len(items) == 10 and all(item.problem is None for item in items)
    assert not any("<think>" in i.instruction + i.output or "```" in i.instruction + i.output for i in items)


def test_max_completion_tokens_fallback_holds_under_concurrency():
    # All of the first wave is sent with max_tokens before the first 400 comes back: every one must recover.
    with FakeTeacher(reject_max_tokens=True, latency=0.05, seed=3) as fake:
        results, teacher = complete(fake, count=40, concurrency=16)
        stats = fake.stats
    assert all(not isinstance(r, Exception) for r in results), [r for r in results if isinstance(r, Exception)][:1]
    assert teacher.token_param == "max_completion_tokens"
    assert stats["last_request"]["max_completion_tokens"] == 3072 and stats["last_request"]["max_tokens"] is None
    assert 1 <= stats["by_status"]["400"] <= 16
    # Every request the server saw is an attempt of ours, and the 400s are named.
    assert sum(r.attempts for r in results) == stats["requests_received"]
    assert sum(r.errors.count("http-400") for r in results) == stats["by_status"]["400"]


def test_server_without_json_mode_gets_the_text_template():
    with FakeTeacher(no_json_mode=True, latency=0.05, seed=4) as fake:
        results, teacher = complete(fake, count=24, json_mode=True, concurrency=8)
        stats = fake.stats
    assert all(not isinstance(r, Exception) for r in results)
    assert "response_format" in teacher.json_mode_error
    assert all(r.json_mode is False for r in results)
    for r in results:
        items = parse_reply(r.content, r.finish_reason, r.json_mode)
        assert len(items) == 10 and all(item.problem is None for item in items)
    assert 1 <= stats["by_status"]["400"] <= 8  # one wave at most, then every request goes out as text
    assert stats["last_request"]["response_format"] is None


def test_json_mode_refusal_is_raised_when_there_is_no_text_rendering():
    with FakeTeacher(no_json_mode=True) as fake:
        [result], _ = complete(fake, json_mode=True, fallback=False)
        assert fake.stats["requests_received"] == 1  # not retried: it would fail the same way
    assert isinstance(result, JsonModeUnsupported)


def test_empty_reply_cut_by_length_is_data_not_an_error():
    with FakeTeacher(p_empty_length=1.0) as fake:
        [result], _ = complete(fake)
    assert result.content == "" and result.finish_reason == "length" and result.attempts == 1
    [item] = parse_reply(result.content, result.finish_reason)
    assert item.problem == "truncated"


def generate(fake: FakeTeacher, tmp_path, *extra: str, n: int = 1000):
    out = tmp_path / "run"
    done = run_cli(
        "generate", "--seeds", str(seeds_file(tmp_path)), "--n", str(n), "--base-url", fake.base_url, "--model", "m",
        "--out", str(out), "--concurrency", "8", "--quiet", *extra,
    )
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return done, out, manifest


def test_local_teacher_with_every_quirk_at_once(tmp_path):
    quirks = dict(
        think=True, code_fence=True, reject_max_tokens=True, no_json_mode=True, usage_mode="completion_one",
        p_truncated=0.2, latency=0.005, seed=5,
    )
    with FakeTeacher(**quirks) as fake:
        done, out, manifest = generate(fake, tmp_path, "--json-mode", n=300)
        stats = fake.stats
    assert done.returncode == 0, done.stderr
    records = read_jsonl(out / "records.jsonl")
    rejected = read_jsonl(out / "rejected.jsonl")
    ledger = finished(read_jsonl(out / "requests.jsonl"))
    assert len(records) == 300 and len({r["id"] for r in records}) == 300
    assert not any("<think>" in r["instruction"] + r["output"] or "```" in r["instruction"] + r["output"] for r in records)
    assert "response_format" in manifest["teacher"]["json_mode_fallback"]
    assert all(e["json_mode"] is False for e in ledger)
    assert manifest["usage"]["estimated"] is True
    assert "truncated" in {r["reason"] for r in rejected}
    assert not any(r["reason"] == "request-failed" for r in rejected)
    # The 400s that taught us the server's dialect are attempts like any other.
    assert manifest["counts"]["attempts"] == stats["requests_received"]
    assert manifest["counts"]["attempt_errors"].get("http-400", 0) == stats["by_status"]["400"] <= 16


def test_ignored_stop_and_count_items_are_used_and_the_echo_is_not(tmp_path):
    # A server that ignores stop sequences runs past the asked count, echoes the prompt's
    # examples and is cut by the length limit: the extra items are paid for and used, the echo
    # ends in the cut item and is never a record.
    with FakeTeacher(overrun=3, latency=0.005, seed=10) as fake:
        done, out, manifest = generate(fake, tmp_path, n=200)
    assert done.returncode == 0, done.stderr
    records = read_jsonl(out / "records.jsonl")
    rejected = read_jsonl(out / "rejected.jsonl")
    assert len(records) == 200
    assert any(r["id"].endswith((".10", ".11", ".12")) for r in records)
    assert not SEED_INSTRUCTIONS & {r["instruction"] for r in records}
    assert not any("示例" in r["instruction"] + r["input"] + r["output"] for r in records)
    truncated = [r for r in rejected if r["reason"] == "truncated"]
    assert len(truncated) == manifest["counts"]["requests"] and all("示例" in r["meta"]["raw"] for r in truncated)


def test_collapsed_parse_yield_stops_with_a_sample_reply(tmp_path):
    with FakeTeacher(p_garbage=1.0, latency=0.005, seed=6) as fake:
        done, out, manifest = generate(fake, tmp_path)
        received = fake.stats["requests_received"]
        sent = fake.stats["sent_contents"]
    assert done.returncode == 1, done.stderr
    assert "of the last 50 requests gave a usable record" in done.stderr
    assert any(reply[:40] in done.stderr for reply in sent)  # a sample raw reply, as the server sent it
    assert "Traceback" not in done.stderr
    assert 50 <= received <= 50 + 2 * 8  # the window, plus what was in flight and refilled as it ended
    assert manifest["stop_reason"] == "low-yield" and manifest["counts"]["requests"] == received
    assert all(r["reason"] == "unparseable" for r in read_jsonl(out / "rejected.jsonl"))


def test_empty_replies_cut_by_length_stop_with_the_max_tokens_hint(tmp_path):
    # A reasoning model that spends the whole budget thinking: every reply is empty, finish_reason=length.
    with FakeTeacher(p_empty_length=1.0, latency=0.005) as fake:
        done, out, manifest = generate(fake, tmp_path)
    assert done.returncode == 1, done.stderr
    assert "raise --max-tokens" in done.stderr
    rejected = read_jsonl(out / "rejected.jsonl")
    assert len(rejected) == manifest["counts"]["requests"] and {r["reason"] for r in rejected} == {"truncated"}


def usable_share(share: Fraction, items: int = 10):
    """A `reply` knob: exactly `share` of replies, evenly spread, carry `items` good tasks; the rest are prose.

    Even spacing, not a coin per reply: any 50 consecutive replies then hold share x 50 usable ones (give or
    take one), so a run near the threshold stops, or not, for the threshold and not for a run of bad luck.
    """
    counter = itertools.count(1)  # replies are made one at a time on the fake's event loop

    def reply(req, rng):
        i = next(counter)
        if math.floor(i * share) > math.floor((i - 1) * share):
            return render_items([make_item(rng, "zh") for _ in range(items)], "zh", False)
        return make_garbage(rng, "zh")

    return reply


def test_yield_at_5_percent_stops_as_collapsed(tmp_path):
    # Under the 10%-of-the-last-50 threshold: 2 or 3 usable replies per 50.
    with FakeTeacher(reply=usable_share(Fraction(5, 100)), latency=0.005) as fake:
        done, out, manifest = generate(fake, tmp_path)
        received = fake.stats["requests_received"]
    assert done.returncode == 1, done.stderr
    assert manifest["stop_reason"] == "low-yield"
    stopped = [line for line in done.stderr.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and any(f"only {k} of the last 50 requests gave a usable record" in stopped[0] for k in (2, 3, 4)), done.stderr
    assert 50 <= received <= 50 + 2 * 8 and 0 < manifest["counts"]["kept"] <= 40


def test_yield_at_15_percent_is_slow_but_not_collapsed(tmp_path):
    # Over the threshold (7 or 8 usable per 50): the run must finish, however many windows it takes.
    with FakeTeacher(reply=usable_share(Fraction(15, 100)), latency=0.005) as fake:
        done, out, manifest = generate(fake, tmp_path, n=150)
        received = fake.stats["requests_received"]
    assert done.returncode == 0, done.stderr
    assert manifest["status"] == "completed" and manifest["stop_reason"] is None
    assert manifest["counts"]["kept"] == len(read_jsonl(out / "records.jsonl")) == 150
    assert received >= 90  # the yield check had many full windows to judge


def test_default_request_cap_is_ten_times_what_n_needs_plus_100(tmp_path):
    # One usable task in every 8 replies: above the low-yield threshold (6 or 7 in any 50), yet --n 20
    # is out of reach in ceil(20 / 10) x 10 + 100 = 120 requests (15 records). Without --max-requests the
    # default cap must stop it there. (The fake's own cap and --retries 0 end a run that has no cap.)
    with FakeTeacher(reply=usable_share(Fraction(1, 8), items=1), latency=0.005, max_requests=400) as fake:
        done, out, manifest = generate(fake, tmp_path, "--retries", "0", n=20)
        received = fake.stats["requests_received"]
    assert done.returncode == 3, done.stderr
    assert manifest["stop_reason"] == "max-requests" and "stopped after 120 requests (the --max-requests cap)" in done.stderr
    assert received == manifest["counts"]["requests"] == 120 and manifest["counts"]["failed_requests"] == 0
    assert manifest["counts"]["kept"] == len(read_jsonl(out / "records.jsonl")) == 15


def test_max_requests_is_a_hard_cap(tmp_path):
    # 30% of replies are usable: above the collapse threshold, far below what --n needs.
    with FakeTeacher(p_garbage=0.7, latency=0.005, seed=8) as fake:
        done, out, manifest = generate(fake, tmp_path, "--max-requests", "40")
        received = fake.stats["requests_received"]
    assert done.returncode == 3, done.stderr
    assert "--max-requests" in done.stderr
    assert received == 40 and manifest["counts"]["requests"] == 40
    assert manifest["stop_reason"] == "max-requests" and 0 < manifest["counts"]["kept"] < 1000


def test_stop_message_quotes_a_reply_with_brackets_verbatim_on_one_line(tmp_path):
    # Replies are the teacher's text, not markup for our terminal: "[/think]" once crashed the stop path.
    with FakeTeacher(reply=lambda req, rng: "[/think] [bold]好的[/bold]，但我不列任务。", latency=0.005) as fake:
        done, _, manifest = generate(fake, tmp_path)
    assert done.returncode == 1, done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("stopped:")]
    assert "'[/think] [bold]好的[/bold]，但我不列任务。'" in line and line.endswith("then re-run to resume)")
    assert manifest["stop_reason"] == "low-yield"
