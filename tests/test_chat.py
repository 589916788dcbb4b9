"""chat: multi-turn conversations where the teacher plays the follow-up user and the assistant; export of every turn; resume.

End-to-end runs use the real CLI in a subprocess against the fake server on 127.0.0.1, scripted by
fakes.recipe_replies.ChatReplies (its trigger words are in the first user turn).
"""

from __future__ import annotations

import collections
import json
import random
import subprocess
from pathlib import Path

import pytest
from datasets import Dataset

from conftest import finished, read_jsonl, run_selfinstruct
from fakes.evol_replies import make_instruction
from fakes.openai_server import FakeTeacher
from fakes.recipe_replies import ChatReplies
from selfinstruct.conversation import parse_user_turn, turn_request_id
from selfinstruct.export import build, export_run

KEY = "sk-test-CHAT-0123456789abcdef"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_selfinstruct(*args, key=KEY, timeout=timeout)


def zh_dataset(path: Path, triggers: dict[int, str]) -> Path:
    """Ten distinct Chinese tasks (every third with an input), a near-copy of the second and a blacklisted one."""
    rows = []
    for i in range(10):
        instruction = make_instruction(random.Random(i), "zh") + (" " + triggers[i] if i in triggers else "")
        rows.append({"instruction": instruction, "input": "背景：城市正在改变乡村。" if i % 3 == 0 else "", "output": f"旧的回答{i}"})
    rows.append({"instruction": rows[1]["instruction"] + "。", "input": rows[1]["input"], "output": ""})
    rows.append({"instruction": "请画一幅春天的风景画", "input": "", "output": ""})
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


# ---- pure pieces ---------------------------------------------------------------------------------


def test_the_simulated_user_closes_with_end_and_loses_role_prefixes():
    assert parse_user_turn("[END]") == ("", True)
    assert parse_user_turn("谢谢，我明白了。\n[END]") == ("", True)
    assert parse_user_turn("<think>够了</think>【结束】") == ("", True)
    assert parse_user_turn("[ end ]") == ("", True)
    assert parse_user_turn("用户：那如果数据量很大呢？") == ("那如果数据量很大呢？", False)
    assert parse_user_turn("[User] Could you give an example?") == ("Could you give an example?", False)
    assert parse_user_turn("“能再举个例子吗？”") == ("能再举个例子吗？", False)
    assert parse_user_turn("Why does the user count matter?") == ("Why does the user count matter?", False)
    assert parse_user_turn("User research says otherwise: why?") == ("User research says otherwise: why?", False)
    assert parse_user_turn("【用户】为什么？") == ("为什么？", False)
    assert parse_user_turn("  ") == ("", False)
    assert turn_request_id("alpaca.json:3", 2, "user") == "chat:alpaca.json:3:2:user"


# ---- end to end ----------------------------------------------------------------------------------


def test_chat_plays_both_sides_ends_early_cuts_bad_turns_exports_every_turn_and_a_rerun_pays_nothing_twice(tmp_path):
    data = zh_dataset(tmp_path / "alpaca.json", {3: "QNOPE", 4: "QLATE", 5: "QBYE"})
    out = tmp_path / "run"
    replies = ChatReplies()
    args = lambda fake, *more: ("chat", str(data), "--out", str(out), "--turns", "3", "--base-url", fake.base_url, "--model", "fake-teacher",
                                "--price-in", "0.5", "--price-out", "1.5", "--concurrency", "2", "--max-tokens", "300", "--quiet", *more)
    with FakeTeacher(reply=replies, seed=2) as fake:
        stopped = run_cli(*args(fake, "--max-cost", "0.002"))
        assert stopped.returncode == 3, stopped.stderr
        part = finished(read_jsonl(out / "requests.jsonl"))
        assert 0 < len(part) < 30
        done = run_cli(*args(fake))
        assert done.returncode == 0, done.stderr
        sent = fake.stats["requests_received"]
        again = run_cli(*args(fake))
        assert again.returncode == 0, again.stderr
        assert fake.stats["requests_received"] == sent  # a finished run asks nothing more

    ledger = finished(read_jsonl(out / "requests.jsonl"))
    ids = [e["request_id"] for e in ledger]
    assert len(ids) == len(set(ids)) == sent
    records, rejected = read_jsonl(out / "records.jsonl"), read_jsonl(out / "rejected.jsonl")
    assert collections.Counter(r["reason"] for r in rejected) == {"near-duplicate": 1, "blacklist": 1, "refusal": 1}
    near = next(r for r in rejected if r["reason"] == "near-duplicate")
    assert "alpaca.json:2" in near["detail"] and not any(near["id"] in i for i in ids)  # refused before paying
    by_id = {r["id"]: r for r in records}
    assert len(records) == 9

    # Seven conversations ran to --turns: 3 assistant turns, 2 simulated user turns, alternating, each a request of its own.
    full = [r for r in records if r["meta"]["ended"] == "max-turns"]
    assert len(full) == 7
    for rec in full:
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"] * 3 and rec["meta"]["turns"] == 3
        assert rec["meta"]["request_ids"] == [turn_request_id(rec["id"], 1, "assistant"), turn_request_id(rec["id"], 2, "user"),
                                              turn_request_id(rec["id"], 2, "assistant"), turn_request_id(rec["id"], 3, "user"),
                                              turn_request_id(rec["id"], 3, "assistant")]
        assert not rec["messages"][2]["content"].startswith("用户")  # the role prefix the fake user writes is dropped
    first = by_id["alpaca.json:1"]
    # The first turn fills instruction/input/output, so every other tool reads a conversation as its first exchange.
    assert first["messages"][0]["content"] == f"{first['instruction']}\n\n{first['input']}" and first["input"].startswith("背景")
    assert first["output"] == first["messages"][1]["content"] and first["output"].startswith("第1轮回答")
    assert first["messages"][5]["content"].startswith("第3轮回答") and first["meta"]["previous_output"] == "旧的回答0"
    # Each assistant turn was asked with the whole conversation so far.
    longest = max(replies.histories, key=len)
    assert [m["role"] for m in longest] == ["system"] + ["user", "assistant"] * 2 + ["user"]
    # QLATE: the assistant refused on turn 2, so the conversation was cut before it and kept with its first exchange.
    late = by_id["alpaca.json:5"]
    assert late["meta"]["ended"] == "cut" and late["meta"]["turns"] == 1 and len(late["messages"]) == 2
    assert late["meta"]["cut"]["turn"] == 2 and late["meta"]["cut"]["reason"] == "refusal"
    # QBYE: the simulated user closed the conversation after the first answer.
    bye = by_id["alpaca.json:6"]
    assert bye["meta"]["ended"] == "closed" and bye["meta"]["turns"] == 1 and not any(i.startswith("chat:alpaca.json:6:2:a") for i in ids)
    assert by_id.get("alpaca.json:4") is None and next(r for r in rejected if r["id"] == "alpaca.json:4")["output"].startswith("抱歉")

    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == "completed" and manifest["counts"]["kept"] == 9
    assert manifest["chat"]["ended"] == {"closed": 1, "max-turns": 7, "cut": 1} and manifest["chat"]["turns"] == {"1": 2, "3": 7}
    for stage, count in (("chat-assistant", 7 * 3 + 2 + 1 + 1), ("chat-user", 7 * 2 + 1 + 1)):
        st = manifest["stages"][stage]
        assert st["requests"] == count
        assert st["usd"] == pytest.approx((st["prompt_tokens"] * 0.5 + st["completion_tokens"] * 1.5) / 1e6, abs=1e-6)
    assert manifest["templates"]["chat-user"]["name"] == "user_zh.jinja" and manifest["config"]["turns"] == 3

    # Export: every turn in sharegpt and messages; alpaca keeps the first exchange.
    export_run(out, tmp_path / "sharegpt", "sharegpt")
    rows = {r["id"]: r for r in Dataset.from_parquet(str(tmp_path / "sharegpt" / "data" / "train-00000-of-00001.parquet"))}
    assert [t["from"] for t in rows["alpaca.json:1"]["conversations"]] == ["human", "gpt"] * 3
    assert [t["value"] for t in rows["alpaca.json:1"]["conversations"]] == [m["content"] for m in first["messages"]]
    card = (tmp_path / "sharegpt" / "README.md").read_text(encoding="utf-8")
    assert "| Recipe | multi-turn conversations" in card and "ended: closed 1, max-turns 7, cut 1" in card and "| chat-user |" in card
    messages = {r["id"]: r for r in build(out, "messages").splits["train"]}
    assert messages["alpaca.json:1"]["messages"] == first["messages"] and len(messages["alpaca.json:6"]["messages"]) == 2
    with_system = {r["id"]: r for r in build(out, "messages", system="You are kind.").splits["train"]}
    assert with_system["alpaca.json:1"]["messages"][0] == {"role": "system", "content": "You are kind."}
    assert len(with_system["alpaca.json:1"]["messages"]) == 7
    alpaca = {r["id"]: r for r in build(out, "alpaca").splits["train"]}
    assert alpaca["alpaca.json:1"]["output"] == first["output"]

    # Another --turns into the same directory is refused before any request.
    refused = run_cli("chat", str(data), "--out", str(out), "--turns", "5", "--base-url", "http://127.0.0.1:9/v1", "--model", "fake-teacher",
                      "--price-in", "0.5", "--price-out", "1.5", "--quiet")
    assert refused.returncode == 2 and "--turns" in refused.stderr


def test_chat_in_english_from_a_seed_file(tmp_path):
    out = tmp_path / "en"
    with FakeTeacher(reply=ChatReplies(), seed=1) as fake:
        done = run_cli("chat", "--seeds", "seeds/en.jsonl", "--limit", "3", "--turns", "2", "--out", str(out), "--base-url", fake.base_url,
                       "--model", "fake-teacher", "--price-in", "0", "--price-out", "0", "--quiet")
        assert done.returncode == 0, done.stderr
    records = read_jsonl(out / "records.jsonl")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["lang"] == "en" and manifest["templates"]["chat-assistant"]["name"] == "assistant_en.jinja"
    assert len(records) == 3 and all(len(r["messages"]) == 4 and r["meta"]["seed_ids"] == [r["id"]] for r in records)
    assert all(r["messages"][2]["content"] and not r["messages"][2]["content"].startswith("User") for r in records)
    both = run_cli("chat", "seeds/en.jsonl", "--seeds", "seeds/en.jsonl", "--out", str(tmp_path / "x"))
    assert both.returncode == 2 and "one of them" in both.stderr


class RecordingJudge:
    """The fake judge's verdicts, keeping every rubric prompt it was sent."""

    def __init__(self) -> None:
        from fakes.judge_replies import JudgeReplies

        self.judge, self.prompts = JudgeReplies(), []

    def __call__(self, body, rng):
        self.prompts.append(body["messages"])
        return self.judge(body, rng)


def test_chat_judge_reads_the_whole_conversation_gates_it_and_a_rerun_pays_nothing(tmp_path):
    from fakes.judge_replies import Judged

    data = zh_dataset(tmp_path / "alpaca.json", {5: "QBYE"})
    out = tmp_path / "judged"
    args = ("chat", str(data), "--out", str(out), "--turns", "3", "--model", "fake-teacher", "--price-in", "0.5", "--price-out", "1.5",
            "--concurrency", "2", "--judge", "--min-score", "3")
    judge = RecordingJudge()
    with FakeTeacher(reply=Judged(ChatReplies(), judge), seed=2) as fake:
        done = run_cli(*args, "--base-url", fake.base_url, "--quiet")
        assert done.returncode == 0, done.stderr
        sent = fake.stats["requests_received"]
        kept = read_jsonl(out / "records.jsonl")
        rejected = read_jsonl(out / "rejected.jsonl")
        gated = [r for r in rejected if r["meta"]["stage"] == "judge"]
        # The hash scores of the fake judge put some conversations on each side of 3; refused first turns are never judged.
        assert kept and gated and len(kept) + len(gated) == 10  # 12 inputs: a near-copy and a blacklisted one refused
        assert all(r["meta"]["judge"]["score"] >= 3 and r["meta"]["stage"] == "chat" for r in kept)
        assert all(r["reason"] == "low-score" and r["meta"]["judge"]["score"] < 3 and "< --min-score 3" in r["detail"]
                   and r["meta"]["gated_stage"] == "chat" and r["messages"] for r in gated)
        # Every judged conversation went to the conversation rubric whole: each turn, labelled with its number and role.
        assert len(judge.prompts) == 10 == judge.judge.conversations
        prompts = {p[1]["content"]: p for p in judge.prompts}
        for rec in kept + gated:
            text = next(t for t in prompts if f"### 第 1 轮 · 用户\n{rec['messages'][0]['content']}\n###" in t)
            for i, turn in enumerate(rec["messages"]):
                label = f"### 第 {i // 2 + 1} 轮 · {'用户' if turn['role'] == 'user' else '助手'}\n{turn['content']}\n"
                assert label in text, label
        assert any(r["meta"]["turns"] == 3 for r in kept + gated)
        m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        assert m["counts"]["kept"] == len(kept) and m["counts"]["rejected"]["low-score"] == len(gated)
        assert m["judge"]["template"]["name"] == "conversation_zh.jinja" and m["judge"]["judged"] == 10 and m["judge"]["completed"]
        assert m["templates"]["judge-rubric"]["name"] == "conversation_zh.jinja" and m["stages"]["judge"]["requests"] == 10

        # The same command again pays nothing and changes nothing; without --judge it is refused.
        again = run_cli(*args, "--base-url", fake.base_url)
        assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr
        ungated = run_cli(*args[:-3], "--base-url", fake.base_url, "--quiet")
        assert ungated.returncode == 2 and "re-run with --judge" in ungated.stderr
        # A judge without a key is refused before a conversation is paid for.
        keyless = run_cli(*args, "--base-url", fake.base_url, "--out", str(tmp_path / "keyless"), "--judge-api-key-env", "NO_SUCH_KEY")
        assert keyless.returncode == 2 and "NO_SUCH_KEY" in keyless.stderr, keyless.stderr
        assert fake.stats["requests_received"] == sent and read_jsonl(out / "records.jsonl") == kept


def test_chat_judge_killed_in_the_gate_resumes_without_paying_twice(tmp_path):
    from fakes.judge_replies import Judged

    data = zh_dataset(tmp_path / "alpaca.json", {})
    out = tmp_path / "judged"
    args = ("chat", str(data), "--out", str(out), "--turns", "2", "--model", "fake-teacher", "--price-in", "0", "--price-out", "0",
            "--concurrency", "1", "--judge", "--min-score", "3", "--quiet")
    with FakeTeacher(reply=Judged(ChatReplies()), seed=2) as fake:
        first = run_cli(*args, "--base-url", fake.base_url)
        assert first.returncode == 0, first.stderr
        whole = fake.stats["requests_received"]
        kept = read_jsonl(out / "records.jsonl")
    # As if killed in the gate: records.jsonl not yet rewritten, some rejections already written, no completed gate.
    every = {r["id"]: r for r in read_jsonl(out / "rejected.jsonl") if r["meta"]["stage"] == "judge"}
    first_gated = sorted(every)[0]
    rejected = [r for r in read_jsonl(out / "rejected.jsonl") if r["meta"]["stage"] != "judge" or r["id"] == first_gated]
    (out / "rejected.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected), encoding="utf-8")
    unjudged = lambda r: {**r, "meta": {k: v for k, v in r["meta"].items() if k not in ("judge", "judge_request_ids", "gated_stage")}
                                        | {"stage": "chat"}}
    records = sorted([unjudged(r) for r in kept + list(every.values())], key=lambda r: r["id"])
    (out / "records.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("reason", "detail")},
                                                          ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    manifest["judge"]["completed"] = False
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with FakeTeacher(reply=Judged(ChatReplies()), seed=2) as fake:
        again = run_cli(*args, "--base-url", fake.base_url)
        assert again.returncode == 0, again.stderr
        assert fake.stats["requests_received"] == 0 < whole
    assert sorted(read_jsonl(out / "records.jsonl"), key=lambda r: r["id"]) == sorted(kept, key=lambda r: r["id"])
    assert sorted(r["id"] for r in read_jsonl(out / "rejected.jsonl") if r["meta"]["stage"] == "judge") == sorted(every)
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["counts"]["kept"] == len(kept) and m["counts"]["rejected"]["low-score"] == len(every) and m["judge"]["completed"]


def test_chat_moderate_screens_every_turn_not_only_the_first_exchange(tmp_path):
    data = zh_dataset(tmp_path / "alpaca.json", {2: "QMOD2"})
    out = tmp_path / "moderated"
    with FakeTeacher(reply=ChatReplies(), moderation="FLAGME") as fake:
        done = run_cli("chat", str(data), "--out", str(out), "--turns", "2", "--base-url", fake.base_url, "--model", "fake-teacher",
                       "--price-in", "0", "--price-out", "0", "--limit", "4", "--moderate", "--quiet")
        assert done.returncode == 0, done.stderr
        assert fake.stats["moderation_requests"] == 4
    kept, rejected = read_jsonl(out / "records.jsonl"), read_jsonl(out / "rejected.jsonl")
    flagged = next(r for r in rejected if r["id"] == "alpaca.json:3")
    # FLAGME is in the second answer only: instruction, input and output (the first exchange) are clean.
    assert "FLAGME" not in flagged["output"] and "FLAGME" in flagged["messages"][3]["content"]
    assert flagged["reason"] == "moderation" and flagged["meta"]["moderation"]["flagged"] and flagged["meta"]["gated_stage"] == "chat"
    assert len(kept) == 3 and all(r["meta"]["moderation"]["flagged"] is False for r in kept)
