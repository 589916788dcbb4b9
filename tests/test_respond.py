"""respond: answering any dataset (GPT-4-LLM), preference pairs judged in both orders (DPO), Orca-style system prompts.

End-to-end runs use the real CLI in a subprocess against the shared fake server on 127.0.0.1, whose
`reply` knob is the scripted teacher below: it answers answer prompts and pair-judge prompts, and its
trigger words make it misbehave on purpose.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from datasets import Dataset

from conftest import REPO, finished
from fakes.openai_server import FakeTeacher, make_instruction
from selfinstruct.errors import ConfigError, InputError
from selfinstruct.export import build, export_run
from selfinstruct.respond import (ModelSpec, combine, load_system_prompts, parse_model_spec, parse_verdict)

KEY = "sk-test-RESPOND-0123456789abcdef"
# Higher answers better: the scripted judge prefers the answer of the better model.
RANK = {"alpha": 3, "beta": 2, "gamma": 1, "fake-teacher": 1}
# Words for the inputs; the instructions come from the fake server's own generator (two rarely reach ROUGE-L 0.7).
ZH_TOPICS = """春天 秋天 城市 乡村 学生 老师 医生 工程师 程序 数据 历史 文化 经济 环境 能源 交通 健康 饮食 运动 音乐 电影 小说 诗歌
旅行 节日 家庭 朋友 公司 市场 产品 客户 科技 手机 网络 安全 隐私 教育 考试 读书 写作 语言 翻译 数学 物理 化学 生物""".split()


# ---- the scripted teacher ------------------------------------------------------------------------


class RespondReplies:
    """Answers answer prompts (an answer naming its model) and pair-judge prompts (prefers the better-ranked model).

    QNOPE   every answer is a short refusal                 -> refusal (a generate rule on the answer)
    QTHINK    the answer opens with a <think> block           -> kept, the block stripped from the output
    QTIE      the judge calls every pair a tie                -> pairs dropped as tie
    QBIAS     the judge always prefers the answer shown first -> pairs dropped as disagreement
    QMUDDLE   the judge gives no verdict                      -> pairs dropped as unclear
    QBETA     beta refuses (the other answers are fine)
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answered: list[tuple[str, str, str]] = []  # (model, system, user) of every answer prompt

    def __call__(self, body: dict, rng) -> str:
        messages = body["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        user = [m["content"] for m in messages if m["role"] == "user"][-1]
        if "[Answer A]" in user or "【回答 A】" in user:
            return self.judge(user)
        with self.lock:
            self.answered.append((body["model"], system, user))
        return self.answer(body["model"], user)

    @staticmethod
    def answer(model: str, user: str) -> str:
        zh = len(re.findall(r"[\u4e00-\u9fff]", user)) > len(re.findall(r"[A-Za-z]", user))
        if "QNOPE" in user or ("QBETA" in user and model == "beta"):
            return "抱歉，我无法回答这个问题。" if zh else "Sorry, I cannot help with that."
        topic = user.splitlines()[0][:24]
        if zh:
            body = (f"{model}的回答：关于“{topic}”，首先要弄清它的背景和含义；其次要分步骤分析其中的原因和影响；"
                    f"最后结合实际情况给出可行的建议。总的来说，理解这个问题需要耐心和细致的思考。")
        else:
            body = (f"The {model} answer: to understand '{topic}', first look at its background, then work through the causes and "
                    f"effects one step at a time, and finally turn them into practical advice that fits the situation.")
        if "QTHINK" in user:
            body = f"<think>let me think about {topic}</think>\n{body}"
        return body

    @staticmethod
    def judge(user: str) -> str:
        if "QTIE" in user:
            return "Both are equally good.\n[[tie]]" if "[Answer A]" in user else "两者一样好。\n[[平局]]"
        if "QBIAS" in user:
            return "The first one reads better.\n[[A]]"
        if "QMUDDLE" in user:
            return "Hard to say."
        a = re.search(r"(?:\[Answer A\]|【回答 A】)\n(?:The )?([A-Za-z-]+)", user).group(1)
        b = re.search(r"(?:\[Answer B\]|【回答 B】)\n(?:The )?([A-Za-z-]+)", user).group(1)
        return f"{a} is more thorough.\n[[A]]" if RANK.get(a, 0) >= RANK.get(b, 0) else f"{b} is more thorough.\n[[B]]"


# ---- helpers -------------------------------------------------------------------------------------


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OPENAI_API_KEY": KEY, **(env or {})}
    for name in list(environ):
        if name.startswith("SELFINSTRUCT_"):
            environ.pop(name)
    return subprocess.run([sys.executable, "-m", "selfinstruct", *args], env=environ, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load(out: Path) -> tuple[list[dict], list[dict], list[dict], dict]:
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return read_jsonl(out / "records.jsonl"), read_jsonl(out / "rejected.jsonl"), finished(read_jsonl(out / "requests.jsonl")), manifest


def zh_dataset(path: Path, n: int = 24, triggers: dict[int, str] | None = None) -> Path:
    """An Alpaca JSON file of n distinct Chinese tasks (some with input, some with an old output), a near-copy and a blacklisted task."""
    rows = []
    for i in range(n):
        a, b = ZH_TOPICS[(i * 7) % len(ZH_TOPICS)], ZH_TOPICS[(i * 13 + 5) % len(ZH_TOPICS)]
        instruction = make_instruction(random.Random(i), "zh")
        if triggers and i in triggers:
            instruction += " " + triggers[i]
        rows.append({"instruction": instruction, "input": f"背景：{a}正在改变{b}。" if i % 3 == 0 else "",
                     "output": f"旧的回答{i}" if i % 2 == 0 else ""})
    rows.append({"instruction": rows[1]["instruction"] + "。", "input": rows[1]["input"], "output": ""})  # a near-copy of record 2
    rows.append({"instruction": "请画一幅春天的风景画", "input": "", "output": ""})  # asks for a picture: blacklist
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def en_dataset(path: Path, n: int = 12, triggers: dict[int, str] | None = None) -> Path:
    rows = []
    for i in range(n):
        instruction = make_instruction(random.Random(i), "en")
        if triggers and i in triggers:
            instruction += " " + triggers[i]
        rows.append({"instruction": instruction, "input": "", "output": ""})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def parquet(path: Path) -> Dataset:
    return Dataset.from_parquet(str(path / "data" / "train-00000-of-00001.parquet"))


# ---- pure pieces ---------------------------------------------------------------------------------


def test_model_specs_parse_names_endpoints_prices_and_key_variables():
    assert parse_model_spec("gpt-4o") == ModelSpec("gpt-4o")
    assert parse_model_spec("gpt-4o:2.5:10") == ModelSpec("gpt-4o", None, 2.5, 10.0)
    assert parse_model_spec("qwen2:7b@http://127.0.0.1:8000/v1:0:0") == ModelSpec("qwen2:7b", "http://127.0.0.1:8000/v1", 0.0, 0.0)
    assert parse_model_spec("qwen-max@https://dashscope.example.com/v1:1.6:6.4#DASHSCOPE_API_KEY") == ModelSpec(
        "qwen-max", "https://dashscope.example.com/v1", 1.6, 6.4, "DASHSCOPE_API_KEY")
    assert parse_model_spec("local@http://localhost:8000/v1") == ModelSpec("local", "http://localhost:8000/v1")
    for bad in ("", "@http://x/v1", "m@ftp://x", "m#1BAD"):
        with pytest.raises(ConfigError):
            parse_model_spec(bad)


def test_verdicts_are_read_from_the_last_bracket_and_pairs_need_both_orders_to_agree():
    assert parse_verdict("A is better [[B]]... on reflection\n[[A]]") == "A"
    assert parse_verdict("[[ b ]]") == "B"
    assert parse_verdict("一样好\n[[平局]]") == "tie" == parse_verdict("[[tie]]")
    assert parse_verdict("I cannot decide") == "unclear" == parse_verdict("<think>[[A]]</think> no idea")
    # First order shows a then b; the second shows b then a.
    assert combine("A", "B", "a", "b") == ("chosen", "a")
    assert combine("B", "A", "a", "b") == ("chosen", "b")
    assert combine("A", "A", "a", "b") == ("disagreement", None)  # always the first shown: position bias
    assert combine("A", "tie", "a", "b") == ("tie", None)
    assert combine("unclear", "B", "a", "b") == ("unclear", None)


def test_system_prompt_sets_ship_in_both_languages_and_draws_are_seeded_by_record(tmp_path):
    zh, en = load_system_prompts("orca", "zh"), load_system_prompts("ORCA", "en")
    assert zh.name == "orca-zh" and en.name == "orca-en" and len(zh.prompts) >= 10 and len(en.prompts) >= 10
    assert all(re.search(r"[\u4e00-\u9fff]", p) for p in zh.prompts) and not any(re.search(r"[\u4e00-\u9fff]", p) for p in en.prompts)
    assert load_system_prompts("orca", "zh-Hant").prompts == zh.prompts
    draws = [zh.draw(42, f"r{i}") for i in range(200)]
    assert draws == [zh.draw(42, f"r{i}") for i in range(200)]
    assert len({i for i, _ in draws}) == len(zh.prompts)  # every prompt drawn
    assert draws != [zh.draw(7, f"r{i}") for i in range(200)]
    own = tmp_path / "mine.txt"
    own.write_text("# comment\nBe brief.\n\nShow your work.\nBe brief.\n", encoding="utf-8")
    assert load_system_prompts(str(own), "en").prompts == ("Be brief.", "Show your work.")
    (tmp_path / "empty.txt").write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(InputError, match="no system prompts"):
        load_system_prompts(str(tmp_path / "empty.txt"), "en")
    with pytest.raises(InputError, match="neither a shipped set"):
        load_system_prompts(str(tmp_path / "missing.txt"), "en")


# ---- respond end to end --------------------------------------------------------------------------


def test_respond_answers_a_dataset_keeps_lineage_and_a_rerun_pays_nothing_twice(tmp_path):
    data = zh_dataset(tmp_path / "alpaca.json", triggers={3: "QNOPE", 4: "QTHINK"})
    replies = RespondReplies()
    args = lambda fake, out, *more: ("respond", str(data), "--out", str(out), "--base-url", fake.base_url, "--model", "fake-teacher",
                                     "--price-in", "0.5", "--price-out", "1.5", "--concurrency", "4", "--max-tokens", "300", "--quiet", *more)
    with FakeTeacher(reply=replies, seed=3) as fake:
        # Stopped by the budget part-way, then resumed with more: every request is paid once.
        stopped = run_cli(*args(fake, tmp_path / "run", "--max-cost", "0.0012"))
        assert stopped.returncode == 3, stopped.stderr
        part, _, part_ledger, part_manifest = load(tmp_path / "run")
        assert 0 < len(part_ledger) < 24 and part_manifest["status"] == "stopped"
        done = run_cli(*args(fake, tmp_path / "run"))
        assert done.returncode == 0, done.stderr
        records, rejected, ledger, manifest = load(tmp_path / "run")
        sent = fake.stats["requests_received"]
        again = run_cli(*args(fake, tmp_path / "run"))
        assert again.returncode == 0, again.stderr
        assert fake.stats["requests_received"] == sent  # a finished run asks nothing more
    ids = [e["request_id"] for e in ledger]
    assert len(ids) == len(set(ids)) == sent == 24  # 26 inputs less the two refused before paying: none sent twice
    assert load(tmp_path / "run")[:2] == (records, rejected)

    by_reason = collections.Counter(r["reason"] for r in rejected)
    assert by_reason == {"near-duplicate": 1, "blacklist": 1, "refusal": 1}
    refused = {r["id"]: r for r in rejected}
    near = next(r for r in rejected if r["reason"] == "near-duplicate")
    assert "alpaca.json:2" in near["detail"] and not any(e["record_id"] == near["id"] for e in ledger)  # never paid for
    assert len(records) == 23 and manifest["counts"] == {**manifest["counts"], "kept": 23, "rejected": dict(by_reason)}
    by_id = {r["id"]: r for r in records}
    first = by_id["alpaca.json:1"]
    assert first["instruction"] == make_instruction(random.Random(0), "zh") and first["input"].startswith("背景：")
    meta = first["meta"]
    assert meta["previous_output"] == "旧的回答0" and meta["model"] == "fake-teacher" and meta["stage"] == "respond"
    assert meta["template"] == "answer_zh.jinja" and len(meta["template_sha256"]) == 64
    assert meta["request_id"] == "respond:fake-teacher:alpaca.json:1" and meta["usage"]["completion_tokens"] > 0
    assert meta["raw"] == first["output"] and first["output"].startswith("fake-teacher的回答")
    assert "previous_output" not in by_id["alpaca.json:2"]["meta"]
    think = by_id["alpaca.json:5"]
    assert think["output"].startswith("fake-teacher的回答") and think["meta"]["raw"].startswith("<think>")
    assert refused["alpaca.json:4"]["output"].startswith("抱歉")
    # Cost per stage, at the price given, and the manifest names the input and the templates.
    stage = manifest["stages"]["respond"]
    assert stage["requests"] == 24
    assert stage["usd"] == pytest.approx((stage["prompt_tokens"] * 0.5 + stage["completion_tokens"] * 1.5) / 1e6, abs=1e-9)
    assert manifest["input"]["records"] == 26 and manifest["templates"]["respond"]["name"] == "answer_zh.jinja"
    assert manifest["respond"]["models"] == ["fake-teacher"] and manifest["respond"]["pair_judge_model"] is None
    assert manifest["config"]["lang"] == "zh"

    # Export in every format; the card says how the answers were made.
    for fmt in ("alpaca", "sharegpt", "messages"):
        export_run(tmp_path / "run", tmp_path / fmt, fmt)
        assert len(parquet(tmp_path / fmt)) == 23
    card = (tmp_path / "alpaca" / "README.md").read_text(encoding="utf-8")
    assert "Answers (respond)" in card and "`fake-teacher`" in card
    refused_dpo = run_cli("export", str(tmp_path / "run"), "--to", str(tmp_path / "dpo"), "--format", "dpo")
    assert refused_dpo.returncode == 2 and "no preference pairs" in refused_dpo.stderr

    # Another model into the same directory is refused with the flag that would resume.
    with FakeTeacher(reply=RespondReplies()) as fake:
        other = run_cli(*args(fake, tmp_path / "run")[:-3], "--model", "other", "--concurrency", "4", "--quiet")
    assert other.returncode == 2 and "--model" in other.stderr


def test_preference_pairs_route_each_model_judge_both_orders_and_export_dpo(tmp_path):
    triggers = {2: "QTIE", 5: "QBIAS", 7: "QMUDDLE", 9: "QBETA", 10: "QNOPE"}
    data = en_dataset(tmp_path / "tasks.jsonl", n=12, triggers=triggers)
    with FakeTeacher(reply=RespondReplies(), seed=1) as main, FakeTeacher(reply=RespondReplies(), seed=2) as second:
        args = ("respond", str(data), "--out", str(tmp_path / "pairs"), "--models", "alpha,beta,gamma", "--pair-judge-model", "judge-x",
                "--base-url", main.base_url, "--model-spec", "alpha:0.5:1.5", "--model-spec", f"beta@{second.base_url}:1:2#BETA_KEY",
                "--model-spec", "gamma:0.25:0.75", "--model-spec", "judge-x:2:4", "--concurrency", "4", "--quiet")
        result = run_cli(*args, env={"BETA_KEY": "sk-beta-0123456789abcdef"})
        assert result.returncode == 0, result.stderr
        main_stats, second_stats, second_url = main.stats, second.stats, second.base_url
        # A rerun replays every answer and verdict from the ledger: neither server hears from it.
        again = run_cli(*args, env={"BETA_KEY": "sk-beta-0123456789abcdef"})
        assert again.returncode == 0, again.stderr
        assert (main.stats["requests_received"], second.stats["requests_received"]) == (
            main_stats["requests_received"], second_stats["requests_received"])
        other = run_cli(*args[:5], "alpha,beta", *args[6:], env={"BETA_KEY": "sk-beta-0123456789abcdef"})
        assert other.returncode == 2 and "--models" in other.stderr
    records, rejected, ledger, manifest = load(tmp_path / "pairs")
    # Each model answered every record at its own endpoint: beta alone went to the second server.
    answers = [e for e in ledger if e["stage"] == "respond"]
    assert collections.Counter(e["model"] for e in answers) == {"alpha": 12, "beta": 12, "gamma": 12}
    assert second_stats["requests_received"] == 12 and all(e.get("route") == "beta" for e in answers if e["model"] == "beta")
    judged = [e for e in ledger if e["stage"] == "pair-judge"]
    assert main_stats["requests_received"] == 24 + len(judged)
    # Both orders of every pair were asked.
    orders = collections.Counter((e["record_id"], frozenset((e["first"], e["second"]))) for e in judged)
    assert set(orders.values()) == {2}
    # record 10: every answer refused (no pair); record 9: beta refused, so only alpha-gamma was judged.
    assert len(judged) == 2 * (3 * 10 + 1)
    pairs = manifest["respond"]["pairs"]
    assert pairs == {"judged": 31, "kept": 22, "dropped": {"tie": 3, "disagreement": 3, "unclear": 3}, "orders_per_pair": 2}
    assert collections.Counter(r["reason"] for r in rejected) == {"no-preference": 3, "refusal": 1}
    assert len(records) == 8
    for rec in records:
        meta = rec["meta"]
        assert meta["model"] == "alpha" and rec["output"].startswith("The alpha answer")  # the most-winning answer
        assert [a["model"] for a in meta["answers"]] == ["alpha", "beta", "gamma"]
        for pair in meta["pairs"]:
            assert [v["first"] for v in pair["verdicts"]] == pair["models"] and len(pair["verdicts"]) == 2
            if pair["outcome"] == "chosen":
                assert RANK[pair["chosen"]] > RANK[pair["rejected"]]
    beta_refused = next(r for r in records if "QBETA" in r["instruction"])
    assert [p["models"] for p in beta_refused["meta"]["pairs"]] == [["alpha", "gamma"]]
    assert next(a for a in beta_refused["meta"]["answers"] if a["model"] == "beta")["reason"] == "refusal"
    # Money: each route's tokens at its own price, summed per stage.
    price = {"alpha": (0.5, 1.5), "beta": (1, 2), "gamma": (0.25, 0.75)}
    respond_usd = sum((e["usage"]["prompt_tokens"] * price[e["model"]][0] + e["usage"]["completion_tokens"] * price[e["model"]][1]) / 1e6
                      for e in answers)
    judge_usd = sum((e["usage"]["prompt_tokens"] * 2 + e["usage"]["completion_tokens"] * 4) / 1e6 for e in judged)
    assert all(e["route"] == "pair-judge" for e in judged)
    assert manifest["stages"]["respond"]["usd"] == pytest.approx(respond_usd, abs=1e-6)
    assert manifest["stages"]["pair-judge"]["usd"] == pytest.approx(judge_usd, abs=1e-6)
    assert set(manifest["respond"]["by_model"]["judge-x"]) == {"pair-judge"}
    assert set(manifest["teachers"]) == {"teacher", "beta", "gamma", "pair-judge"} and manifest["teachers"]["beta"]["base_url"] == second_url
    assert "sk-beta" not in (tmp_path / "pairs" / "manifest.json").read_text(encoding="utf-8")

    # export --format dpo and dpo-messages: a row per kept pair, as TRL's DPOTrainer reads them.
    for fmt in ("dpo", "dpo-messages"):
        out = run_cli("export", str(tmp_path / "pairs"), "--to", str(tmp_path / fmt), "--format", fmt, "--jsonl")
        assert out.returncode == 0, out.stderr
        ds = parquet(tmp_path / fmt)
        assert len(ds) == 22 and ds.column_names[:3] == ["prompt", "chosen", "rejected"]
        assert "rejected_model" in ds.column_names
        row = ds[0]
        if fmt == "dpo":
            assert isinstance(row["prompt"], str) and row["chosen"].startswith(f"The {row['model']} answer")
        else:
            assert [m["role"] for m in row["prompt"]] == ["user"] and row["chosen"][0]["role"] == "assistant"
            assert row["rejected"][0]["content"].startswith(f"The {row['rejected_model']} answer")
        assert all(RANK[m] > RANK[r] for m, r in zip(ds["model"], ds["rejected_model"]))
    card = (tmp_path / "dpo" / "README.md").read_text(encoding="utf-8")
    assert "both orders" in card and "31 pairs judged, 22 kept" in card


def test_orca_system_prompts_are_sent_kept_and_exported_as_the_system_turn(tmp_path):
    data = zh_dataset(tmp_path / "alpaca.json", n=16)
    replies = RespondReplies()
    with FakeTeacher(reply=replies) as fake:
        base = ("--base-url", fake.base_url, "--model", "fake-teacher", "--concurrency", "4", "--quiet")
        result = run_cli("respond", str(data), "--out", str(tmp_path / "orca"), "--system-prompts", "orca", *base)
        assert result.returncode == 0, result.stderr
        sent = {user: system for _, system, user in replies.answered}
    records, _, _, manifest = load(tmp_path / "orca")
    zh = load_system_prompts("orca", "zh")
    assert len(records) == 16
    for rec in records:
        meta = rec["meta"]
        assert meta["system"] in zh.prompts and zh.prompts[meta["system_index"]] == meta["system"] and meta["system_set"] == "orca-zh"
        user = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"] else "")
        assert sent[user] == meta["system"]  # exactly the system message the teacher got
    systems = {r["id"]: r["meta"]["system"] for r in records}
    assert systems == {r["id"]: zh.draw(42, r["id"])[1] for r in records}  # drawn by run seed and record id: a rerun draws the same
    assert len(set(systems.values())) > 3
    assert manifest["respond"]["system_prompts"] == zh.manifest()
    for fmt, key, role_key, system_role in (("messages", "messages", "role", "system"), ("sharegpt", "conversations", "from", "system")):
        export_run(tmp_path / "orca", tmp_path / fmt, fmt)
        for row in parquet(tmp_path / fmt):
            turns = row[key]
            assert turns[0][role_key] == system_role and turns[0]["content" if fmt == "messages" else "value"] == systems[row["id"]]
    card = (tmp_path / "messages" / "README.md").read_text(encoding="utf-8")
    assert "orca-zh" in card
    notes: list[str] = []
    export_run(tmp_path / "orca", tmp_path / "alpaca", "alpaca", echo=notes.append)
    assert any("16 records were answered under a system prompt" in n for n in notes)
    # Answering the Orca run again without system prompts: the old answer moves to previous_output, the old system prompt goes.
    with FakeTeacher(reply=RespondReplies()) as fake:
        result = run_cli("respond", str(tmp_path / "orca"), "--out", str(tmp_path / "plain"), "--base-url", fake.base_url, "--model", "beta",
                         "--quiet")
    assert result.returncode == 0, result.stderr
    plain = load(tmp_path / "plain")[0]
    assert len(plain) == 16 and not any("system" in r["meta"] or "system_index" in r["meta"] for r in plain)
    old = {r["id"]: r for r in records}
    assert all(r["meta"]["previous_output"] == old[r["id"]]["output"] and r["meta"]["previous_model"] == "fake-teacher" for r in plain)
    assert all(r["meta"]["request_id"] == f"respond:beta:{r['id']}" for r in plain)

    # Your own set: --system-prompts FILE (English run).
    own = tmp_path / "mine.txt"
    own.write_text("Answer like a pirate.\nAnswer like a poet.\n", encoding="utf-8")
    en = en_dataset(tmp_path / "tasks.jsonl", n=6)
    with FakeTeacher(reply=RespondReplies()) as fake:
        result = run_cli("respond", str(en), "--out", str(tmp_path / "own"), "--system-prompts", str(own), "--base-url", fake.base_url,
                         "--model", "fake-teacher", "--quiet")
    assert result.returncode == 0, result.stderr
    records, _, _, manifest = load(tmp_path / "own")
    assert {r["meta"]["system"] for r in records} <= {"Answer like a pirate.", "Answer like a poet."}
    assert manifest["respond"]["system_prompts"]["set"] == "mine.txt" and manifest["templates"]["respond"]["name"] == "answer_en.jinja"
    b = build(tmp_path / "own", "messages")
    assert all(row["messages"][0]["role"] == "system" for row in b.splits["train"])


def test_chinese_pairs_with_orca_prompts_show_the_judge_the_system_prompt_and_export_it_as_the_first_turn(tmp_path):
    data = zh_dataset(tmp_path / "alpaca.json", n=6)
    replies = RespondReplies()
    judged: list[str] = []
    with FakeTeacher(reply=lambda body, rng: (judged.append(body["messages"][-1]["content"]) if "【回答 A】" in body["messages"][-1]["content"]
                                              else None) or replies(body, rng)) as fake:
        result = run_cli("respond", str(data), "--out", str(tmp_path / "zh"), "--models", "beta,alpha", "--system-prompts", "orca",
                         "--base-url", fake.base_url, "--model-spec", "beta:1:2", "--model-spec", "alpha:3:6", "--quiet")
    assert result.returncode == 0, result.stderr
    records, rejected, ledger, manifest = load(tmp_path / "zh")
    assert len(records) == 6 and not [r for r in rejected if r["reason"] != "near-duplicate" and r["reason"] != "blacklist"]
    assert len(judged) == 12 and manifest["templates"]["pair-judge"]["name"] == "pair_judge_zh.jinja"
    for rec in records:
        assert rec["meta"]["model"] == "alpha" and rec["meta"]["pair_judge"] == "beta"  # judged by the first model, alpha still won
        assert sum(rec["meta"]["system"] in prompt and rec["instruction"] in prompt for prompt in judged) == 2
    by_model = manifest["respond"]["by_model"]
    assert set(by_model) == {"alpha", "beta"} and set(by_model["beta"]) == {"respond", "pair-judge"} and set(by_model["alpha"]) == {"respond"}
    alpha = by_model["alpha"]["respond"]
    assert alpha["requests"] == 6 and alpha["usd"] == pytest.approx((alpha["prompt_tokens"] * 3 + alpha["completion_tokens"] * 6) / 1e6, abs=1e-6)
    assert sum(s["usd"] for m in by_model.values() for s in m.values()) == pytest.approx(manifest["cost"]["usd"], abs=1e-5)
    b = build(tmp_path / "zh", "dpo-messages")
    rows = b.splits["train"]
    assert len(rows) == 6
    systems = {r["id"]: r["meta"]["system"] for r in records}
    for row in rows:
        assert row["prompt"][0] == {"role": "system", "content": systems[row["id"]]} and row["prompt"][1]["role"] == "user"
        assert row["model"] == "alpha" and row["rejected_model"] == "beta"
    plain = build(tmp_path / "zh", "dpo").splits["train"][0]
    assert plain["prompt"].startswith(systems[plain["id"]] + "\n\n")


def test_dry_run_projects_requests_and_cost_per_stage_after_the_free_checks_and_calls_nothing(tmp_path):
    data = zh_dataset(tmp_path / "alpaca.json", n=10)
    result = run_cli("respond", str(data), "--out", str(tmp_path / "run"), "--models", "alpha,beta", "--model-spec", "alpha:2:8",
                     "--model-spec", "beta@http://127.0.0.1:9/v1:1:2", "--max-tokens", "100", "--dry-run", "--max-cost", "0.000001")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dry run: 10 of 12 records to answer (refused before paying: ")
    assert "near-duplicate 1" in lines[0] and "blacklist 1" in lines[0]
    assert "respond (2 models): 20 requests" in lines[1] and "pair-judge (alpha, both orders of every pair): 20 requests" in lines[2]
    assert lines[3].startswith("  in all ≈ $") and lines[4].startswith("note: that is over --max-cost")
    assert not (tmp_path / "run").exists()


class AnswerAndJudge:
    """Answers from RespondReplies, verdicts on the judge rubric from fakes.judge_replies (a JS<N> word in an instruction scores it N)."""

    def __init__(self) -> None:
        from fakes.judge_replies import JudgeReplies

        self.answer, self.judge = RespondReplies(), JudgeReplies()

    def __call__(self, body: dict, rng) -> str:
        users = [m["content"] for m in body["messages"] if m["role"] == "user"]
        if users and ("### 回答" in users[0] or "### Response" in users[0]):
            return self.judge(body, rng)
        return self.answer(body, rng)


def test_respond_judge_keeps_answers_scoring_min_score_or_more_and_a_rerun_pays_nothing(tmp_path):
    # Scores 2, 3 and 5 in turn; --min-score 3 keeps the 3s and the 5s.
    data = zh_dataset(tmp_path / "alpaca.json", n=12, triggers={i: f"JS{(2, 3, 5)[i % 3]}" for i in range(12)})
    replies = AnswerAndJudge()
    out = tmp_path / "run"
    with FakeTeacher(reply=replies, seed=3) as fake:
        args = ("respond", str(data), "--out", str(out), "--base-url", fake.base_url, "--model", "fake-teacher", "--price-in", "0.5",
                "--price-out", "1.5", "--concurrency", "4", "--max-tokens", "300", "--judge", "--min-score", "3",
                "--judge-model", "judge-m", "--judge-price-in", "10", "--judge-price-out", "20")
        result = run_cli(*args, "--quiet")
        assert result.returncode == 0, result.stderr
        sent = fake.stats["requests_received"]
        records, rejected, ledger, manifest = load(out)
        again = run_cli(*args)
        assert again.returncode == 0, again.stderr
        assert "nothing to do" in again.stderr and fake.stats["requests_received"] == sent  # a rerun pays nothing
    assert load(out)[:2] == (records, rejected)
    assert sent == 24 and replies.judge.judge_requests == 12  # 14 inputs less the two refused before paying, answered then judged
    gated = [r for r in rejected if r["meta"]["stage"] == "judge"]
    assert len(records) == 8 and len(gated) == 4
    assert all(r["meta"]["judge"]["score"] in (3, 5) and r["meta"]["model"] == "fake-teacher" for r in records)
    assert all(r["reason"] == "low-score" and r["meta"]["judge"]["score"] == 2 and r["meta"]["gated_stage"] == "respond" for r in gated)
    assert all("JS2" in r["instruction"] for r in gated) and not any("JS2" in r["instruction"] for r in records)
    assert manifest["counts"]["kept"] == 8 and manifest["counts"]["rejected"]["low-score"] == 4
    assert manifest["judge"]["completed"] and manifest["judge"]["min_score"] == 3 and manifest["judge"]["histogram"]["2"] == 4
    judge_lines = [e for e in ledger if e["stage"] == "judge"]
    assert len(judge_lines) == 12 and manifest["stages"]["judge"]["usd"] == pytest.approx(
        (sum(e["usage"]["prompt_tokens"] for e in judge_lines) * 10 + sum(e["usage"]["completion_tokens"] for e in judge_lines) * 20) / 1e6,
        abs=1e-9)
    # Without the gate, a re-run would refill records.jsonl with unjudged answers: refused.
    with FakeTeacher(reply=AnswerAndJudge()) as fake:
        ungated = run_cli("respond", str(data), "--out", str(out), "--base-url", fake.base_url, "--model", "fake-teacher",
                          "--price-in", "0.5", "--price-out", "1.5", "--quiet")
        assert ungated.returncode == 2 and "--judge" in ungated.stderr and fake.stats["requests_received"] == 0


def test_respond_judge_without_the_judges_key_is_refused_before_any_answer_is_paid(tmp_path):
    data = zh_dataset(tmp_path / "alpaca.json", n=4)
    with FakeTeacher(reply=AnswerAndJudge()) as fake:
        result = run_cli("respond", str(data), "--out", str(tmp_path / "run"), "--base-url", fake.base_url, "--model", "fake-teacher",
                         "--judge", "--judge-api-key-env", "SELFINSTRUCT_TEST_UNSET_JUDGE_KEY", "--quiet")
        assert fake.stats["requests_received"] == 0
    assert result.returncode == 2 and "SELFINSTRUCT_TEST_UNSET_JUDGE_KEY" in result.stderr and "Traceback" not in result.stderr
    assert KEY not in result.stderr
