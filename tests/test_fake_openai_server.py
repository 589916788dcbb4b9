"""Tests of the fake OpenAI teacher itself (tests/fakes/openai_server.py), through the real `openai` SDK and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import select
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import openai
import pytest
from rapidfuzz import process
from rapidfuzz.distance import Indel

try:  # openai 3.x ships on httpx2; older releases on httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from fakes.openai_server import BAD_KINDS, FakeTeacher, knobs_from_args

SERVER = Path(__file__).resolve().parent / "fakes" / "openai_server.py"
ZH_PROMPT = "请设计 {n} 个全新、多样的任务，用来测试和训练一个中文 AI 助手。所有任务都必须用简体中文书写。"
EN_PROMPT = "Write {n} new tasks to train and test an AI assistant. Make them diverse."
ZH_BANNED = ("图片", "图像", "照片", "视频", "音频", "画一", "绘制", "流程图", "地图", "文件", "录音", "附件", "截图", "图表", "画出")
EN_BANNED = ("image", "picture", "photo", "video", "audio", "file", "map", "draw", "plot", "chart", "diagram", "flowchart")
BANNED_RE = re.compile("|".join(ZH_BANNED) + r"|\b(?:" + "|".join(EN_BANNED) + r")s?\b", re.IGNORECASE)
TOKEN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[a-z0-9]+")
HAN_RE = re.compile(r"[\u4e00-\u9fff]")
ITEM_RE = {
    "zh": re.compile(r"^\d+\.\s*指令：(.*)\n[输輸]入：(.*)\n[输輸]出：(.*)$", re.S),
    "en": re.compile(r"^\d+\.\s*Instruction: (.*)\nInput: (.*)\nOutput: (.*)$", re.S),
}


def sdk(fake: FakeTeacher, key: str = "sk-test", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.base_url, api_key=key, max_retries=0, **kw)


def ask(client: openai.OpenAI, tasks: int = 5, lang: str = "zh", **kw):
    prompt = (ZH_PROMPT if lang == "zh" else EN_PROMPT).format(n=tasks)
    return client.chat.completions.create(
        model=kw.pop("model", "fake-model"), messages=[{"role": "system", "content": "你是数据标注专家。"}, {"role": "user", "content": prompt}], **kw
    )


def parse(content: str, lang: str) -> list[tuple[str, str, str]]:
    """Items of a well-formed reply; raises on anything else."""
    items = []
    for block in content.split("\n###\n"):
        m = ITEM_RE[lang].match(block)
        assert m, block
        ins, inp, out = m.groups()
        items.append((ins, "" if inp in ("<无输入>", "<無輸入>", "<noinput>") else inp, out))
    return items


def tokens(text: str) -> list[str]:
    return TOKEN_RE.findall(text.lower())


def rouge(a: str, b: str) -> float:
    return Indel.normalized_similarity(tokens(a), tokens(b))


def encode_all(texts: list[str]) -> list[str]:
    """Token lists as strings, one code point per distinct token, for rapidfuzz's fast path."""
    vocab: dict[str, str] = {}
    return ["".join(vocab.setdefault(t, chr(0x100 + len(vocab))) for t in tokens(x)) for x in texts]


def exact_usage(messages: list[dict], content: str) -> tuple[int, int]:
    return sum(len(m["content"]) for m in messages) // 2 + 10, len(content) // 2 + 1


def good_item_problems(item: tuple[str, str, str], lang: str) -> list[str]:
    ins, inp, out = item
    problems = []
    if BANNED_RE.search(ins):
        problems.append("blacklisted")
    if unicodedata.category(ins[0]).startswith("P"):
        problems.append("starts with punctuation")
    if lang == "zh":
        han = len(HAN_RE.findall(ins))
        if not 12 <= han <= 30:
            problems.append(f"{han} Han characters")
        if han < 0.9 * len(tokens(ins)):
            problems.append("not mainly Chinese")
    elif len(ins.split()) < 5 or HAN_RE.search(ins):
        problems.append("not a proper English instruction")
    if not 20 <= len(out) <= 120:
        problems.append(f"output of {len(out)} characters")
    if inp and inp == out:
        problems.append("output equals input")
    return problems


# ---- the SDK sees an OpenAI server ------------------------------------------------------------


def test_completion_parses_with_the_sdk_and_usage_is_exact():
    with FakeTeacher(seed=1) as fake:
        client = sdk(fake)
        resp = ask(client, tasks=5, max_completion_tokens=900, temperature=0.7)
        stats = fake.stats
    content = resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop" and resp.object == "chat.completion"
    items = parse(content, "zh")
    assert len(items) == 5
    for item in items:
        assert not good_item_problems(item, "zh"), item
    messages = [{"content": "你是数据标注专家。"}, {"content": ZH_PROMPT.format(n=5)}]
    prompt_tokens, completion_tokens = exact_usage(messages, content)
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert resp.usage.total_tokens == prompt_tokens + completion_tokens
    assert stats["requests_received"] == 1 and stats["responses_ok"] == 1 and stats["by_status"] == {"200": 1}
    assert (stats["prompt_tokens_sent"], stats["completion_tokens_sent"]) == (prompt_tokens, completion_tokens)
    assert stats["sent_contents"] == [content]
    last = stats["last_request"]
    assert (last["model"], last["max_tokens"], last["max_completion_tokens"], last["temperature"]) == ("fake-model", None, 900, 0.7)


def test_english_prompt_gets_english_items_and_the_default_count_is_ten():
    with FakeTeacher(seed=2) as fake:
        client = sdk(fake)
        en = ask(client, tasks=7, lang="en").choices[0].message.content
        default = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "请写一些任务"}]).choices[0].message.content
        hant = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "請設計 3 個全新的任務，格式：指令：…… 輸入：…… 輸出：……"}]
        ).choices[0].message.content
    items = parse(en, "en")
    assert len(items) == 7
    for item in items:
        assert not good_item_problems(item, "en"), item
    assert len(parse(default, "zh")) == 10
    assert len(parse(hant, "zh")) == 3 and "輸出：" in hant


@pytest.mark.parametrize("mode", ["exact", "absent", "zero", "completion_one"])
def test_usage_modes(mode):
    with FakeTeacher(usage_mode=mode) as fake:
        resp = ask(sdk(fake), tasks=2)
        stats = fake.stats
    content = resp.choices[0].message.content
    p, c = exact_usage([{"content": "你是数据标注专家。"}, {"content": ZH_PROMPT.format(n=2)}], content)
    if mode == "absent":
        assert resp.usage is None
    else:
        expected = {"exact": (p, c), "zero": (0, 0), "completion_one": (p, 1)}[mode]
        assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == expected
        assert resp.usage.total_tokens == sum(expected)
    counted = {"exact": (p, c), "absent": (0, 0), "zero": (0, 0), "completion_one": (p, 1)}[mode]
    assert (stats["prompt_tokens_sent"], stats["completion_tokens_sent"]) == counted
    assert stats["responses_ok"] == 1 and stats["sent_contents"] == [content]


def test_429_carries_retry_after_and_an_openai_error_body():
    with FakeTeacher(p_429=1.0, retry_after=2) as fake:
        client = sdk(fake)
        with pytest.raises(openai.RateLimitError) as info:
            ask(client)
        err = info.value
        assert err.status_code == 429 and err.code == "rate_limit_exceeded" and err.type == "requests"
        assert err.response.headers["retry-after"] == "2"
        with httpx.Client() as raw:
            heads = [raw.post(fake.base_url + "/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}).headers for _ in range(20)]
        stats = fake.stats
    assert all(h["retry-after"] == "2" for h in heads)
    ms = [h.get("retry-after-ms") for h in heads]
    assert "2000" in ms and None in ms  # sometimes
    assert stats["by_status"] == {"429": 21} and stats["faults"]["429"] == 21
    assert stats["responses_ok"] == 0 and stats["prompt_tokens_sent"] == 0 and stats["sent_contents"] == []


def test_api_key_401_and_models_404_and_forbidden_403():
    with FakeTeacher(api_key="sk-right-key-123456", models=["teacher-a", "teacher-b"]) as fake:
        with pytest.raises(openai.AuthenticationError) as info:
            ask(sdk(fake, key="sk-wrong-key-abcdefgh"))
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        assert "sk-wrong-key-abcdefgh" not in str(info.value) and "efgh" in str(info.value)  # masked like OpenAI
        with pytest.raises(openai.AuthenticationError):
            sdk(fake, key="nope").models.list()
        good = sdk(fake, key="sk-right-key-123456")
        assert [m.id for m in good.models.list()] == ["teacher-a", "teacher-b"]
        assert good.models.retrieve("teacher-b").id == "teacher-b"
        with pytest.raises(openai.NotFoundError) as info:
            ask(good, model="gpt-unknown")
        assert info.value.code == "model_not_found" and "gpt-unknown" in info.value.message
        assert parse(ask(good, model="teacher-a", tasks=2).choices[0].message.content, "zh")
        stats = fake.stats
    assert stats["by_status"] == {"401": 2, "200": 3, "404": 1}
    assert stats["requests_received"] == 3  # chat requests, refused ones included
    with FakeTeacher(forbidden=True) as fake:
        with pytest.raises(openai.PermissionDeniedError) as info:
            ask(sdk(fake))
    assert info.value.status_code == 403


def test_json_mode_and_no_json_mode():
    with FakeTeacher(seed=3) as fake:
        resp = ask(sdk(fake), tasks=4, response_format={"type": "json_object"})
    tasks = json.loads(resp.choices[0].message.content)["tasks"]
    assert len(tasks) == 4 and all(set(t) == {"instruction", "input", "output"} for t in tasks)
    assert 0 < sum(1 for t in tasks if t["input"] == "") <= 4
    with FakeTeacher(no_json_mode=True) as fake:
        with pytest.raises(openai.BadRequestError) as info:
            ask(sdk(fake), response_format={"type": "json_object"})
        assert info.value.param == "response_format"
        assert parse(ask(sdk(fake), tasks=1).choices[0].message.content, "zh")


def test_ignore_json_mode_accepts_response_format_and_answers_in_text():
    with FakeTeacher(ignore_json_mode=True, seed=3) as fake:
        resp = ask(sdk(fake), tasks=3, response_format={"type": "json_object"})
        assert fake.stats["last_request"]["response_format"] == {"type": "json_object"}
    assert len(parse(resp.choices[0].message.content, "zh")) == 3  # the numbered list, not {"tasks": ...}


def test_429_retry_after_ms_share_and_arrival_times():
    with FakeTeacher(p_429=1.0, retry_after=1.5, p_retry_after_ms=0.0) as fake, httpx.Client() as client:
        before = time.monotonic()
        never = [raw_chat(client, fake).headers for _ in range(10)]
        fake.configure(p_retry_after_ms=1.0)
        always = [raw_chat(client, fake).headers for _ in range(10)]
        after = time.monotonic()
        arrivals = fake.stats["arrivals"]
    assert all(h["retry-after"] == "1.5" and "retry-after-ms" not in h for h in never)
    assert all(h["retry-after"] == "1.5" and h["retry-after-ms"] == "1500" for h in always)
    assert len(arrivals) == 20 and arrivals == sorted(arrivals) and before <= arrivals[0] and arrivals[-1] <= after
    with FakeTeacher(record_contents=False) as fake, httpx.Client() as client:
        raw_chat(client, fake)
        assert fake.stats["arrivals"] == []


def test_echo_key_quotes_the_authorization_header_in_400_and_5xx_bodies():
    key = "sk-echo-me-0123456789"
    with FakeTeacher(echo_key=True, p_500=1.0, no_json_mode=True) as fake, httpx.Client(headers={"Authorization": f"Bearer {key}"}) as client:
        errors = [raw_chat(client, fake) for _ in range(12)]
        refused = raw_chat(client, fake, response_format={"type": "json_object"})
    assert {r.status_code for r in errors} == {500, 502, 503}
    assert all(key in r.text for r in errors) and refused.status_code == 400 and key in refused.json()["error"]["message"]
    with FakeTeacher(echo_key=True) as fake, httpx.Client(headers={"Authorization": f"Bearer {key}"}) as client:
        assert raw_chat(client, fake).status_code == 200 and key not in raw_chat(client, fake).text  # replies never echo


def test_reject_max_tokens_answers_like_openai():
    with FakeTeacher(reject_max_tokens=True) as fake:
        with pytest.raises(openai.BadRequestError) as info:
            ask(sdk(fake), max_tokens=100)
        assert info.value.body == {
            "message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
            "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter",
        }
        ask(sdk(fake), max_completion_tokens=100)
        assert fake.stats["last_request"]["max_completion_tokens"] == 100


# ---- faults ---------------------------------------------------------------------------------


def raw_chat(client: httpx.Client, fake: FakeTeacher, tasks: int = 3, **body) -> httpx.Response:
    return client.post(fake.base_url + "/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": ZH_PROMPT.format(n=tasks)}], **body})


def test_500_and_malformed_replies_count_nothing():
    with FakeTeacher(p_500=1.0) as fake, httpx.Client() as client:
        statuses = {raw_chat(client, fake).status_code for _ in range(30)}
        with pytest.raises(openai.InternalServerError):
            ask(sdk(fake))
    assert statuses == {500, 502, 503}
    with FakeTeacher(p_malformed=1.0) as fake, httpx.Client() as client:
        kinds = set()
        for _ in range(20):
            r = raw_chat(client, fake)
            assert r.status_code == 200
            try:
                kinds.add("no choices" if "choices" not in r.json() else "??")
            except json.JSONDecodeError:
                kinds.add("not json")
        stats = fake.stats
    assert kinds == {"no choices", "not json"}
    assert stats["responses_ok"] == 0 and stats["completion_tokens_sent"] == 0 and stats["faults"]["malformed"] == 20


def test_timeout_counts_nothing_and_ends_when_the_client_leaves():
    with FakeTeacher(p_timeout=1.0, timeout_sleep=3.0) as fake:
        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            ask(sdk(fake, timeout=0.3))
        assert time.monotonic() - started < 2
        deadline = time.monotonic() + 2
        while fake.stats["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = fake.stats
    assert stats["in_flight"] == 0  # the server noticed the client had gone
    assert stats["faults"] == {"timeout": 1} and stats["by_status"] == {} and stats["prompt_tokens_sent"] == 0
    with FakeTeacher(p_timeout=1.0, timeout_sleep=0.2) as fake:  # a patient client gets a 504, still nothing counted
        with pytest.raises(openai.InternalServerError) as info:
            ask(sdk(fake, timeout=5))
        assert info.value.status_code == 504 and fake.stats["responses_ok"] == 0


def test_truncated_reply_is_cut_inside_the_last_item():
    with FakeTeacher(seed=9) as full_fake, FakeTeacher(seed=9, p_truncated=1.0) as cut_fake:
        full = ask(sdk(full_fake), tasks=6).choices[0]
        cut = ask(sdk(cut_fake), tasks=6).choices[0]
        stats = cut_fake.stats
    assert full.finish_reason == "stop" and cut.finish_reason == "length"
    text, whole = cut.message.content, full.message.content
    assert whole.startswith(text) and len(text) < len(whole)
    assert len(text) > whole.rindex("\n###\n") + 5  # the first five items are whole, the sixth is cut
    assert stats["responses_ok"] == 1 and stats["sent_contents"] == [text] and stats["faults"] == {"truncated": 1}


def test_garbage_empty_length_think_code_fence_and_n():
    with FakeTeacher(p_garbage=1.0) as fake:
        garbage = ask(sdk(fake)).choices[0].message.content
        assert fake.stats["responses_ok"] == 1 and fake.stats["completion_tokens_sent"] == len(garbage) // 2 + 1
    assert "###" not in garbage and "指令" not in garbage and "输出" not in garbage and len(garbage) > 40
    with FakeTeacher(empty_length=True) as fake:
        choice = ask(sdk(fake)).choices[0]
    assert choice.message.content == "" and choice.finish_reason == "length"
    with FakeTeacher(think=True, code_fence=True) as fake:
        content = ask(sdk(fake), tasks=2).choices[0].message.content
    thought, answer = content.split("</think>\n", 1)
    assert thought.startswith("<think>") and answer.startswith("```\n") and answer.endswith("\n```")
    assert len(parse(answer[4:-4], "zh")) == 2
    with FakeTeacher() as fake:
        resp = ask(sdk(fake), tasks=2, n=3)
        assert len(resp.choices) == 3 and len({c.message.content for c in resp.choices}) == 3
        assert fake.stats["sent_contents"] == [c.message.content for c in resp.choices]
        assert resp.usage.completion_tokens == sum(len(c.message.content) // 2 + 1 for c in resp.choices)
    with FakeTeacher(ignore_n=True) as fake:
        assert len(ask(sdk(fake), tasks=2, n=3).choices) == 1


def test_max_requests_caps_with_500():
    with FakeTeacher(max_requests=3) as fake, httpx.Client() as client:
        codes = [raw_chat(client, fake).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 500, 500]


def test_bad_items_cover_every_kind_and_good_items_stay_good():
    with FakeTeacher(seed=4, p_bad_items=1.0) as fake, httpx.Client() as client:
        replies = [raw_chat(client, fake, tasks=10).json()["choices"][0]["message"]["content"] for _ in range(40)]
        stats = fake.stats
    items = [item for reply in replies for item in parse(reply, "zh")]
    bad = {(b["kind"], b["instruction"]) for b in stats["bad_items"]}
    assert {kind for kind, _ in bad} == set(BAD_KINDS)
    assert stats["faults"]["bad_items"] == 40
    by_instruction = {ins: (ins, inp, out) for ins, inp, out in items}
    for kind, ins in bad:
        _, inp, out = by_instruction[ins]
        if kind == "blacklist":
            assert BANNED_RE.search(ins)
        elif kind == "refusal":
            assert out.startswith(("抱歉", "作为一个人工智能", "对不起"))
        elif kind == "wrong_language":
            assert not HAN_RE.search(ins)
        elif kind == "empty_output":
            assert out == ""
        elif kind == "output_equals_input":
            assert inp and inp == out
        elif kind == "punctuation_start":
            assert unicodedata.category(ins[0]).startswith("P")
        elif kind == "too_short":
            assert len(ins) < 4
    bad_instructions = {ins for _, ins in bad}
    good = [item for item in items if item[0] not in bad_instructions]
    assert len(good) > 200
    for item in good:
        assert not good_item_problems(item, "zh"), item
    share_with_input = sum(1 for item in good if item[1]) / len(good)
    assert 0.2 < share_with_input < 0.45


def test_same_seed_same_replies_other_seed_other_replies():
    def first_three(seed):
        with FakeTeacher(seed=seed) as fake:
            client = sdk(fake)
            return [ask(client, tasks=3).choices[0].message.content for _ in range(3)]

    a, b, c = first_three(5), first_three(5), first_three(6)
    assert a == b and len(set(a)) == 3 and not set(a) & set(c)


# ---- diversity ------------------------------------------------------------------------------


def collect(lang: str, requests: int, per: int, **knobs) -> tuple[list[str], dict]:
    with FakeTeacher(**knobs) as fake, httpx.Client() as client:
        instructions = []
        for _ in range(requests):
            content = raw_chat(client, fake, tasks=per, messages=[{"role": "user", "content": (ZH_PROMPT if lang == "zh" else EN_PROMPT).format(n=per)}]).json()["choices"][0]["message"]["content"]
            instructions += [ins for ins, _, _ in parse(content, lang)]
        return instructions, fake.stats


def high_pairs(texts: list[str], threshold: float = 0.7) -> list[tuple[int, int]]:
    codes = encode_all(texts)
    matrix = process.cdist(codes, codes, scorer=Indel.normalized_similarity, workers=-1, dtype=np.float32)
    np.fill_diagonal(matrix, 0)
    rows, cols = np.nonzero(np.triu(matrix) >= threshold - 1e-6)
    return list(zip(rows.tolist(), cols.tolist()))


def test_3000_chinese_instructions_have_no_near_duplicates_but_the_deliberate_ones():
    instructions, stats = collect("zh", 300, 10, seed=11, p_near_duplicate=0.05)
    assert len(instructions) == 3000
    near = {d["instruction"]: d["original"] for d in stats["near_duplicates"]}
    assert 5 <= len(near) <= 30
    for edited, original in near.items():
        assert edited != original and len(edited) == len(original)
        assert sum(a != b for a, b in zip(edited, original)) == 1  # one character changed
        assert rouge(edited, original) >= 0.7
    offending = [(instructions[i], instructions[j]) for i, j in high_pairs(instructions)]
    assert offending, "the deliberate near-duplicates must show up"
    assert all(a in near or b in near for a, b in offending), [p for p in offending if p[0] not in near and p[1] not in near]


def test_english_instructions_are_diverse_too():
    instructions, _ = collect("en", 100, 10, seed=12)
    assert len(instructions) == 1000 and not high_pairs(instructions)


# ---- concurrency, keep-alive, the process form ------------------------------------------------


def test_async_sdk_requests_overlap_on_kept_alive_connections():
    async def run(url):
        client = openai.AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0)
        prompt = [{"role": "user", "content": ZH_PROMPT.format(n=2)}]
        for _ in range(2):
            await asyncio.gather(*(client.chat.completions.create(model="m", messages=prompt) for _ in range(20)))
        await client.close()

    with FakeTeacher(latency=0.2) as fake:
        started = time.monotonic()
        asyncio.run(run(fake.base_url))
        elapsed = time.monotonic() - started
        stats = fake.stats
    assert stats["responses_ok"] == 40 and stats["max_in_flight"] >= 15  # (all 20, unless this machine is very busy)
    assert stats["connections"] <= 20  # the second wave reused the first wave's connections
    assert elapsed < 1.5


def start_server(*args: str, tmp_path: Path) -> tuple[subprocess.Popen, str, Path]:
    stats_path = tmp_path / "stats.json"
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--port", "0", "--stats-out", str(stats_path), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    if not ready:
        proc.kill()
        pytest.fail("the fake server printed nothing in 15 s: " + proc.stderr.read())
    url = proc.stdout.readline().strip()
    return proc, url, stats_path


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_process_form_prints_url_and_writes_stats(tmp_path):
    config = tmp_path / "fake.json"
    config.write_text(json.dumps({"seed": 3, "usage_mode": "completion_one", "models": ["teacher-x"]}), encoding="utf-8")
    proc, url, stats_path = start_server("--config", str(config), "--api-key", "sk-proc", "--latency", "0.01", tmp_path=tmp_path)
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url)
        assert json.loads(stats_path.read_text(encoding="utf-8"))["requests_received"] == 0  # written before the URL
        client = openai.OpenAI(base_url=url, api_key="sk-proc", max_retries=0)
        contents = [ask(client, tasks=2, model="teacher-x").choices[0].message.content for _ in range(3)]
        with pytest.raises(openai.NotFoundError):
            ask(client, model="other")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # rewritten every second while running
            if stats_path.exists() and json.loads(stats_path.read_text(encoding="utf-8"))["requests_received"] == 4:
                break
            time.sleep(0.1)
        else:
            pytest.fail("stats file was not refreshed")
        client.close()
    finally:
        code = stop_server(proc)
    assert code == 0
    stats = json.loads(stats_path.read_text(encoding="utf-8"))
    assert stats["sent_contents"] == contents
    assert stats["by_status"] == {"200": 3, "404": 1} and stats["responses_ok"] == 3
    assert stats["completion_tokens_sent"] == 3  # usage_mode completion_one
    assert stats["last_request"]["model"] == "other"
    assert not list(tmp_path.glob("*.tmp"))


def test_process_form_sustains_64_concurrent_requests_at_the_ideal_rate(tmp_path):
    # 64 x 0.3 s: a server that serialised requests would manage 3 req/s instead of 213. httpx spends
    # about 1.3 ms of CPU per request on this machine, so the client shares a core with whatever else
    # runs here: the better of two runs counts, and the server's own lateness is checked as well.
    concurrency, latency, duration = 64, 0.3, 2.1
    proc, url, stats_path = start_server("--latency", str(latency), "--no-record-contents", tmp_path=tmp_path)
    body = {"model": "m", "messages": [{"role": "user", "content": ZH_PROMPT.format(n=5)}]}

    async def load() -> tuple[float, int]:
        finished: list[float] = []
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:
            started = time.monotonic()

            async def worker(i: int):
                await asyncio.sleep(i * latency / concurrency)  # staggered, as real clients drift apart
                while time.monotonic() < started + duration:
                    r = await client.post(url + "/chat/completions", json=body)
                    assert r.status_code == 200
                    finished.append(time.monotonic())

            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        # Steady state: skip the first round trips (connections being opened) and the drain at the end.
        lo, hi = started + 2 * latency, started + duration
        return sum(1 for t in finished if lo <= t < hi) / (hi - lo), len(finished)

    ideal, rates, sent = concurrency / latency, [], 0
    try:
        for _ in range(2):
            rate, n = asyncio.run(load())
            rates.append(rate)
            sent += n
            if rate >= 0.8 * ideal:
                break
    finally:
        assert stop_server(proc) == 0
    print(f"fake teacher: {max(rates):.0f} req/s of an ideal {ideal:.0f} ({max(rates) / ideal:.0%})")
    stats = json.loads(stats_path.read_text(encoding="utf-8"))
    assert stats["responses_ok"] == sent and stats["max_in_flight"] == concurrency and stats["sent_contents"] == []
    assert stats["connections"] <= concurrency * len(rates)  # kept alive: one connection per worker
    assert stats["late_seconds_total"] / stats["responses_ok"] < 0.05  # the server had every reply ready on time
    assert max(rates) >= 0.8 * ideal, rates


def test_knobs_are_checked():
    with pytest.raises(TypeError):
        FakeTeacher(p_timeouts=0.1)
    with pytest.raises(ValueError):
        FakeTeacher(usage_mode="sometimes")
    with pytest.raises(ValueError):
        FakeTeacher(p_429=0.6, p_500=0.6)
    knobs, _ = knobs_from_args(["--p-429", "0.2", "--think", "--models", "a,b", "--seed", "4", "--config", '{"p_500": 0.1, "seed": 1}'])
    assert knobs == {"p_429": 0.2, "think": True, "models": ["a", "b"], "seed": 4, "p_500": 0.1}  # flags beat --config
    assert knobs_from_args(["--no-json-mode", "--no-think"])[0] == {"no_json_mode": True, "think": False}
    out = subprocess.run([sys.executable, str(SERVER), "--help"], capture_output=True, text=True, timeout=30).stdout
    for flag in ("--latency", "--p-429", "--retry-after", "--usage-mode", "--reject-max-tokens", "--api-key", "--models", "--stats-out", "--config"):
        assert flag in out
