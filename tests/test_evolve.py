"""Evol-Instruct: ops and templates, the elimination rules, and `evolve` / `generate --evol-rounds` end to end.

End-to-end runs use the real CLI in a subprocess against the shared fake server on 127.0.0.1,
whose replies for rewrite, judge and answer prompts come from fakes.evol_replies (deterministic,
with trigger words that provoke each elimination rule).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, fixture_path, finished
from fakes.evol_replies import DUP_TEXT, EvolReplies, kind_of, task_rows
from fakes.openai_server import FakeTeacher
from selfinstruct.config import GenerateConfig
from selfinstruct.errors import ConfigError, OutputError
from selfinstruct.evolution import (
    IN_BREADTH,
    IN_DEPTH,
    OPS,
    Evolution,
    check_evolvable,
    input_seeds,
    read_base,
    records_sha256,
    draw_op,
    judge_verdict,
    leaked_marker,
    load_templates,
    no_gain,
    parse_rewrite,
    refusal_response,
    resolve_ops,
    stopword_response,
)
from selfinstruct.card import hub_card
from selfinstruct.export import build, prompt_text
from selfinstruct.engine import Engine
from selfinstruct.rundir import RunDir
from selfinstruct.rules import script_of
from selfinstruct.similarity import DedupIndex

KEY = "sk-test-EVOL-0123456789abcdef"
PRICE = ("--price-in", "0.5", "--price-out", "1.5")
TRIGGERS = {"QSAME": 6, "QNEAR": 6, "QJUDGE": 6, "QLEAK": 6, "QBLACK": 6, "QDUP": 6, "QREFUSE": 6, "QSTOP": 6, "QLONGSORRY": 6, "QFAIL": 4}
# English: the same cases, fewer of each (the Chinese run is the 200-record one).
EN_TRIGGERS = {word: max(2, n // 2) for word, n in TRIGGERS.items()}
EXPECTED = {"QSAME": "no-gain", "QNEAR": "no-gain", "QJUDGE": "no-gain", "QLEAK": "prompt-leak", "QBLACK": "blacklist",
            "QREFUSE": "refusal-response", "QSTOP": "stopword-response", "QFAIL": "request-failed"}
MARKERS = ("#给定指令#", "#改写后的指令#", "#新指令#", "给定指令", "改写后的指令", "#The Given Prompt#", "#Given Prompt#",
           "#Rewritten Prompt#", "#Created Prompt#", "given prompt", "rewritten prompt")


# ---- helpers -------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    for name in list(env):
        if name.startswith("SELFINSTRUCT_"):
            env.pop(name)
    return subprocess.Popen([sys.executable, "-m", "selfinstruct", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = cli(*args)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def load_run(out: Path) -> tuple[list[dict], list[dict], list[dict], dict]:
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return read_jsonl(out / "records.jsonl"), read_jsonl(out / "rejected.jsonl"), finished(read_jsonl(out / "requests.jsonl")), manifest


def evolved(records: list[dict]) -> list[dict]:
    return [r for r in records if r["meta"].get("stage") == "evolve" and r["meta"].get("evol")]


def check_accounting(manifest: dict, stats: dict, records: list[dict], rejected: list[dict], ledger: list[dict],
                     inputs: frozenset[str] = frozenset()) -> None:
    """Tokens per stage add up to the total exactly (and to what the server sent), dollars to float precision; `inputs`: copied evolved ids."""
    stages = manifest["stages"]
    usage = manifest["usage"]
    assert sum(s["prompt_tokens"] for s in stages.values()) == usage["prompt_tokens"] == stats["prompt_tokens_sent"]
    assert sum(s["completion_tokens"] for s in stages.values()) == usage["completion_tokens"] == stats["completion_tokens_sent"]
    assert sum(s["requests"] for s in stages.values()) == manifest["counts"]["requests"] == len(ledger)
    assert sum(s["usd"] for s in stages.values()) == pytest.approx(manifest["cost"]["usd"], abs=1e-9)
    expected_usd = (stats["prompt_tokens_sent"] * 0.5 + stats["completion_tokens_sent"] * 1.5) / 1e6
    assert manifest["cost"]["usd"] == pytest.approx(expected_usd, abs=2e-6)
    for name, s in stages.items():
        assert s["usd"] == pytest.approx((s["prompt_tokens"] * 0.5 + s["completion_tokens"] * 1.5) / 1e6, abs=1e-6), name
    assert manifest["counts"]["kept"] == len(records)
    assert sum(manifest["counts"]["rejected"].values()) == len(rejected)
    # A failed request ends its step (or its generate request) as one request-failed record: the two counts agree.
    failed = [e for e in ledger if e["status"] != "ok"]
    assert manifest["counts"]["failed_requests"] == manifest["counts"]["rejected"].get("request-failed", 0) == len(failed)
    # Per op and round: kept and eliminated add up to what the files hold.
    kept = collections.Counter((r["meta"]["op"], r["meta"]["round"]) for r in evolved(records) if r["id"] not in inputs)
    gone = collections.Counter((r["meta"]["op"], r["meta"]["round"], r["reason"]) for r in rejected if r["meta"].get("stage") == "evolve")
    for op, rounds in manifest["evol"]["ops"].items():
        assert op in OPS
        for rnd, c in rounds.items():
            assert c["kept"] == kept.pop((op, int(rnd)), 0)
            for reason, n in c["eliminated"].items():
                assert n == gone.pop((op, int(rnd), reason))
    assert not kept and not gone


def check_lineage(records: list[dict], roots: set[str], rounds: int) -> None:
    """Every evolved record descends, one step per round, from a root; its output answers its own instruction."""
    by_id = {r["id"]: r for r in records}
    assert len(by_id) == len(records)
    seen_rounds = set()
    for rec in evolved(records):
        chain = rec["meta"]["evol"]
        step = chain[-1]
        assert step["round"] == rec["meta"]["round"] and step["op"] == rec["meta"]["op"] in OPS
        parent = by_id[step["parent_id"]]  # the parent is kept
        assert rec["id"] == f"{parent['id']}.e{step['round']}"
        assert parent["meta"].get("evol", []) == chain[:-1]
        assert chain[0]["parent_id"] in roots and [s["round"] for s in chain] == list(range(1, len(chain) + 1))
        assert rec["meta"]["seed_ids"] == by_id[chain[0]["parent_id"]]["meta"].get("seed_ids", [])
        lang = "zh" if script_of(rec["instruction"]) == "zh" else "en"
        assert rec["output"] == EvolReplies.answer(prompt_text(rec["instruction"], rec["input"]), lang)
        assert rec["output"] != parent["output"]
        seen_rounds.add(step["round"])
    assert seen_rounds == set(range(1, rounds + 1))


def check_no_leaks(records: list[dict]) -> None:
    for rec in records:
        text = "\n".join((rec["instruction"], rec["input"], rec["output"]))
        assert leaked_marker(text) is None, rec["id"]
        assert not any(m.lower() in text.lower() for m in MARKERS), rec["id"]


# ---- ops, templates, the rng --------------------------------------------------------------------


def test_every_op_has_a_chinese_and_an_english_template():
    assert set(OPS) == set(IN_DEPTH) | set(IN_BREADTH) and len(OPS) == 6
    for lang in ("zh", "zh-Hant", "en"):
        templates = load_templates(lang, OPS, judge=True)
        for op, tpl in templates.ops.items():
            messages = tpl.render(instruction="解释光合作用的过程" if lang != "en" else "Explain photosynthesis", input="", lang=lang)
            text = "\n".join(m["content"] for m in messages)
            assert [m["role"] for m in messages] == ["system", "user"]
            if lang == "en":
                assert "Explain photosynthesis" in text and "Given Prompt#" in text
                assert script_of(text) == "latin"
                if op in IN_DEPTH:
                    assert "10 to 20 words" in text
            else:
                assert "解释光合作用的过程" in text and "#给定指令#" in text and script_of(text) == "zh"
                # Chinese templates count characters, never words.
                assert "词" not in text and "words" not in text.lower()
                if op in IN_DEPTH:
                    assert "10 到 20 个字" in text
                assert ("繁体中文" in text) == (lang == "zh-Hant")
        judge = templates.judge.render(first="甲", second="乙", lang=lang)
        respond = templates.respond.render(instruction="把下面的句子翻译成英文", input="我喜欢读书", lang=lang)
        assert "乙" in judge[-1]["content"]
        assert respond[-1]["content"] == "把下面的句子翻译成英文\n\n我喜欢读书"
        assert kind_of(respond) == "respond" and kind_of(judge) == "judge"
    # Each op asks for something different.
    zh = load_templates("zh", OPS, judge=False).ops
    assert "约束" in zh["add-constraints"].render(instruction="x", input="", lang="zh")[1]["content"]
    assert "多步推理" in zh["increase-reasoning"].render(instruction="x", input="", lang="zh")[1]["content"]
    assert "更复杂的输入" in zh["complicate-input"].render(instruction="x", input="表格", lang="zh")[1]["content"]
    assert "更少见" in zh["mutate"].render(instruction="x", input="", lang="zh")[1]["content"]


def test_op_draws_are_seeded_per_step_and_restricted_by_ops():
    parents = [f"r{i:06d}.1" for i in range(600)]
    draws = [draw_op(OPS, 42, 1, p) for p in parents]
    assert draws == [draw_op(OPS, 42, 1, p) for p in parents]  # a resumed run draws the same
    counts = collections.Counter(draws)
    assert set(counts) == set(OPS) and min(counts.values()) > 60  # uniform-ish over all six
    assert draws != [draw_op(OPS, 42, 2, p) for p in parents]  # each round draws anew
    assert draws != [draw_op(OPS, 7, 1, p) for p in parents]
    ops = resolve_ops(["mutate,deepen"])
    assert ops == ("deepen", "mutate")
    assert {draw_op(ops, 42, 1, p) for p in parents} == {"deepen", "mutate"}
    assert resolve_ops([]) == OPS and resolve_ops(["add_constraints", "Concretize"]) == ("add-constraints", "concretize")
    with pytest.raises(ConfigError, match="unknown operation 'harder'"):
        resolve_ops(["deepen", "harder"])


# ---- parsing and the elimination rules ----------------------------------------------------------


@pytest.mark.parametrize(
    "content, finish, expected",
    [
        ("指令：写一首关于春天的七言绝句，要求押韵\n输入：<无输入>", "stop", ("写一首关于春天的七言绝句，要求押韵", "", None)),
        ("好的，下面是改写结果。\n**指令：** 把下面的句子翻译成英文并解释语法\n**输入：** 我喜欢读书", "stop", ("把下面的句子翻译成英文并解释语法", "我喜欢读书", None)),
        ("<think>先想一想</think>\n```\nInstruction: Sort the numbers and explain each step.\nInput: 42, 7, 19\nOutput: 7, 19, 42\n```", "stop",
         ("Sort the numbers and explain each step.", "42, 7, 19", None)),
        ("请用三句话解释量子纠缠，并举一个生活中的类比。", "stop", ("请用三句话解释量子纠缠，并举一个生活中的类比。", "", None)),
        ("指令：写一首", "length", ("", "", "truncated")),
        ("", "stop", ("", "", "unparseable")),
        ("输入：只有输入没有指令", "stop", ("", "", "unparseable")),
    ],
)
def test_parse_rewrite(content, finish, expected):
    instruction, input_text, problem = parse_rewrite(content, finish)
    assert (instruction, input_text, problem[0] if problem else None) == expected


def test_no_gain_leak_refusal_and_stopword_rules_in_chinese_and_english():
    # (1) no information gain: identical, or ROUGE-L >= 0.9 to the parent.
    parent = "请解释为什么天空是蓝色的，并说明傍晚的天空为什么会变红，用通俗的语言写给小学生看"
    assert no_gain(parent, parent + " ") == "identical to its parent"
    assert no_gain(parent, parent.replace("通俗", "通常")).startswith("ROUGE-L 0.9")
    assert no_gain(parent, parent + "，并给出三个生活中的例子说明光的散射现象") is None
    en = "Explain why the sky is blue and why sunsets are red, in plain words for a ten year old"
    assert no_gain(en, en.replace("plain words", "simple words")).startswith("ROUGE-L 0.9")
    assert no_gain(en, en + ", then compare it with the colour of the ocean and name two experiments") is None
    # Spaces between words count: a different word is not an identical instruction.
    assert no_gain("Give the rapist a name in the story", "Give therapist a name in the story") != "identical to its parent"
    assert no_gain("Give the  Rapist a name", "give the rapist a name ") == "identical to its parent"
    # (2) a refusal word in a short answer (under 160 characters / 80 words), not in a long one.
    assert "抱歉" in refusal_response("抱歉，我无法回答这个问题。")
    assert "无法" in refusal_response("根据现有信息无法判断。")
    assert "对不起" in refusal_response("对不起，这个问题我不能回答。")
    assert refusal_response("抱歉让你久等了。" + "光在大气中传播时会被散射，" * 15) is None
    assert "sorry" in refusal_response("Sorry, I can't help with that.").lower()
    assert "i cannot" in refusal_response("I cannot provide that information.").lower()
    assert refusal_response("Sorry for the wait. " + "word " * 90) is None
    assert refusal_response("光的散射使天空呈现蓝色。") is None and refusal_response("Rayleigh scattering makes it blue.") is None
    # (3) only punctuation and stop words.
    assert stopword_response("嗯……的，了。是吧？") and stopword_response("Well, the... and it is, so.") and stopword_response("。。。！")
    assert stopword_response("") and stopword_response("…… ??")
    assert stopword_response("是的，42。") is None and stopword_response("蓝色。") is None and stopword_response("It is blue.") is None
    # (4) the instruction leaks the rewrite prompt.
    assert leaked_marker("#改写后的指令#：写一首诗") == "#改写后的指令#"
    assert leaked_marker("根据给定指令写一首诗") == "给定指令"
    assert leaked_marker("请按照改寫後的指令完成") == "改寫後的指令"
    assert leaked_marker("#Rewritten Prompt#: write a poem") == "#Rewritten Prompt#"
    assert leaked_marker("Rewrite the Given  Prompt as a poem") == "given prompt"
    assert leaked_marker("Write a poem about spring.", "输入：春天") is None
    # The judge: equal or not, in either language; anything else keeps the evolution.
    assert [judge_verdict(t) for t in ("相同", "不同", "两条指令不相同。", "Equal", "Not Equal", "not equal.", "嗯？")] == [
        "equal", "not-equal", "not-equal", "equal", "not-equal", "not-equal", "unclear"]


def test_dedup_index_can_pass_over_ancestors():
    index = DedupIndex(0.7)
    index.add("root", "请写一首关于春天的七言绝句，要求押韵")
    index.add("other", "请解释为什么天空是蓝色的")
    child = "请写一首关于春天的七言绝句，要求押韵并提到桃花"
    assert index.search(child).key == "root"
    assert index.search(child, exclude={"root"}) is None
    index.add("sibling", "请写一首关于春天的七言绝句，要求押韵并提到燕子")
    assert index.search(child, exclude={"root"}).key == "sibling"
    index.add("empty", "")
    assert index.search("", exclude={"empty"}) is None and index.search("").key == "empty"


# ---- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lang, n", [("zh", 200), ("en", 100)])
def test_evolve_two_rounds_eliminates_every_built_case(tmp_path, lang, n):
    triggers = TRIGGERS if lang == "zh" else EN_TRIGGERS
    rows = task_rows(n, lang, triggers=triggers)
    data = write_rows(tmp_path / "tasks.json", rows)
    out = tmp_path / "run"
    replies = EvolReplies()
    with FakeTeacher(reply=replies) as fake:
        done = run_cli("evolve", str(data), "--rounds", "2", "--out", str(out), "--judge-equal", "--retries", "0",
                       "--base-url", fake.base_url, "--model", "fake-model", *PRICE, "--quiet")
        stats = fake.stats
    assert done.returncode == 0, done.stderr
    records, rejected, ledger, manifest = load_run(out)
    roots = {f"tasks.json:{i}" for i in range(1, n + 1)}
    assert {r["id"] for r in records if not r["meta"].get("evol")} == roots  # the input is kept beside its evolutions
    assert all(isinstance(r["meta"].get("evol"), list) for r in records)  # lineage on every record
    check_lineage(records, roots, rounds=2)
    check_no_leaks(records)
    check_accounting(manifest, stats, records, rejected, ledger)
    assert set(manifest["stages"]) == {"evolve", "judge", "respond"}
    assert manifest["evol"]["rounds"] == 2 and manifest["evol"]["rounds_completed"] == 2 and manifest["status"] == "completed"
    # The dataset card of this real run: kept evolutions per op, and what each elimination means.
    card = hub_card(build(out, "alpaca"), None, "alice/evolved")
    for op, per_round in manifest["evol"]["ops"].items():
        assert f"{op} ×{sum(c['kept'] for c in per_round.values()):,} kept" in card, op
    for reason in manifest["counts"]["rejected"]:
        row = next(line for line in card.splitlines() if line.startswith(f"| `{reason}` |"))
        assert row.split("|")[2].strip(), f"{reason} has no description in the card"

    # Each trigger's round-1 evolutions are eliminated by the rule built for them, with their parent named.
    by_root = {r["id"]: r for r in records if not r["meta"].get("evol")}
    first = {r["meta"]["evol"][0]["parent_id"]: r for r in rejected + evolved(records) if r["meta"]["evol"][0]["round"] == 1 and len(r["meta"]["evol"]) == 1}
    assert len(first) == n  # every record was evolved once in round 1
    for word, reason in EXPECTED.items():
        children = [first[rid] for rid, root in by_root.items() if root["instruction"].endswith(word)]
        assert len(children) == triggers[word]
        assert {c.get("reason") for c in children} == {reason}, (word, [c.get("detail") for c in children])
        for c in children:
            assert c["parent_id"] == c["meta"]["evol"][-1]["parent_id"] and c["parent_instruction"] == by_root[c["parent_id"]]["instruction"]
            assert c["detail"]
    judged = [first[rid] for rid, root in by_root.items() if root["instruction"].endswith("QJUDGE")]
    assert {c["detail"] for c in judged} == {"the teacher judged it equal to its parent"}
    dups = [first[rid] for rid, root in by_root.items() if root["instruction"].endswith("QDUP")]
    assert sorted(c.get("reason", "kept") for c in dups) == ["kept"] + ["near-duplicate"] * (triggers["QDUP"] - 1)
    winner = next(c for c in dups if "reason" not in c)
    assert {c["duplicate_of"] for c in dups if "reason" in c} == {winner["id"]} and winner["instruction"] == DUP_TEXT[lang]
    sorry = [first[rid] for rid, root in by_root.items() if root["instruction"].endswith("QLONGSORRY")]
    assert all("reason" not in c for c in sorry)  # a long answer that apologises is not a refusal
    # Requests: the judge and the answer only for rewrites that passed the cheap checks; failures are in the ledger.
    assert {e["stage"] for e in ledger} == {"evolve", "judge", "respond"} and len({e["request_id"] for e in ledger}) == len(ledger)
    assert sum(e["status"] != "ok" for e in ledger) == triggers["QFAIL"] == manifest["counts"]["failed_requests"]
    assert replies.seen == collections.Counter(e["stage"] for e in ledger)  # one request each, failed ones too (--retries 0)
    # Both depth and breadth ops ran, and the prompts were in the run's language.
    assert {r["meta"]["op"] for r in evolved(records)} == set(OPS)
    assert all(script_of(text) == ("zh" if lang == "zh" else "latin") for kind, text in replies.prompts if kind == "evolve")


def test_evolve_the_chinese_alpaca_fixture(tmp_path):
    data = fixture_path("alpaca-chinese-dataset__alpaca_chinese_part_0-52.json.gz")
    out = tmp_path / "run"
    replies = EvolReplies()
    with FakeTeacher(reply=replies) as fake:
        done = run_cli("evolve", str(data), "--limit", "100", "--rounds", "1", "--out", str(out),
                       "--base-url", fake.base_url, "--model", "fake-model", *PRICE, "--quiet")
        stats = fake.stats
    assert done.returncode == 0, done.stderr
    records, rejected, ledger, manifest = load_run(out)
    originals = [r for r in records if not r["meta"]["evol"]]
    assert len(originals) == 100 and originals[0]["instruction"] == "给出保持健康的三个建议。"
    children = evolved(records)
    assert len(children) + len(rejected) == 100 and len(children) >= 90
    assert all(script_of(r["instruction"]) == "zh" and script_of(r["output"]) == "zh" for r in children)
    check_lineage(records, {r["id"] for r in originals}, rounds=1)
    check_no_leaks(records)
    check_accounting(manifest, stats, records, rejected, ledger)
    assert manifest["config"]["lang"] == "zh" and manifest["input"]["records"] == 100 and manifest["input"]["limit"] == 100
    assert replies.seen["evolve"] == 100 and all("#给定指令#" in text for kind, text in replies.prompts if kind == "evolve")


def test_generate_with_evol_rounds_resumes_without_redoing_work(tmp_path, write_seeds):
    seeds = write_seeds([
        json.dumps({"id": f"s{i}", "name": "t", "instruction": ins, "instances": [{"input": "", "output": out}], "is_classification": False}, ensure_ascii=False)
        for i, (ins, out) in enumerate([("解释为什么天空是蓝色的", "因为瑞利散射。"), ("写一首关于秋天的五言绝句", "西风吹落叶。"),
                                        ("列出三种提高睡眠质量的方法", "规律作息。"), ("把下面的句子翻译成英文", "I like reading."),
                                        ("给一家咖啡店想三个店名", "晨光咖啡。")])
    ])
    out = tmp_path / "run"
    with FakeTeacher(reply=EvolReplies()) as fake:
        args = ("generate", "--seeds", str(seeds), "--n", "100", "--evol-rounds", "2", "--out", str(out),
                "--base-url", fake.base_url, "--model", "fake-model", *PRICE, "--quiet")
        done = run_cli(*args)
        stats = fake.stats
        assert done.returncode == 0, done.stderr
        records, rejected, ledger, manifest = load_run(out)
        generated = [r for r in records if r["meta"]["stage"] == "generate"]
        assert len(generated) == 100
        check_lineage(records, {r["id"] for r in generated}, rounds=2)
        check_no_leaks(evolved(records))
        check_accounting(manifest, stats, records, rejected, ledger)
        assert set(manifest["stages"]) == {"generate", "evolve", "respond"}
        assert manifest["counts"]["kept"] == len(records) > 250 and manifest["evol"]["kept"] == len(records) - 100
        assert all(r["meta"]["seed_ids"] for r in records)  # every record carries its lineage back to the seeds
        # The whole run again: nothing is requested, nothing changes.
        again = run_cli(*args)
        assert again.returncode == 0, again.stderr
        assert fake.stats["requests_received"] == stats["requests_received"]
        assert load_run(out)[:3] == (records, rejected, ledger)
    from selfinstruct.export import build

    rows = build(out).splits["train"]
    assert sum(1 for r in rows if r["evol_ops"]) == len(records) - 100



def test_generate_with_evol_ops_evolves_only_with_those_ops(tmp_path, write_seeds):
    seeds = write_seeds([
        json.dumps({"id": f"s{i}", "name": "t", "instruction": ins, "instances": [{"input": "", "output": out}], "is_classification": False}, ensure_ascii=False)
        for i, (ins, out) in enumerate([("解释为什么天空是蓝色的", "因为瑞利散射。"), ("写一首关于秋天的五言绝句", "西风吹落叶。"),
                                        ("列出三种提高睡眠质量的方法", "规律作息。")])
    ])
    out = tmp_path / "run"
    replies = EvolReplies()
    with FakeTeacher(reply=replies) as fake:
        done = run_cli("generate", "--seeds", str(seeds), "--n", "20", "--evol-rounds", "1", "--evol-ops", "deepen", "--out", str(out),
                       "--base-url", fake.base_url, "--model", "fake-model", *PRICE, "--quiet")
        stats = fake.stats
    assert done.returncode == 0, done.stderr
    records, rejected, ledger, manifest = load_run(out)
    children = evolved(records)
    assert len(children) >= 15 and len(children) + sum(r["meta"].get("stage") == "evolve" for r in rejected) == 20
    assert {r["meta"]["op"] for r in children} == {"deepen"} and all(s["op"] == "deepen" for r in children for s in r["meta"]["evol"])
    assert {e["op"] for e in ledger if e["stage"] == "evolve"} == {"deepen"}
    # Every rewrite prompt the teacher saw was the deepen template's.
    assert replies.seen["evolve"] == 20 and all("加深、拓宽" in text for kind, text in replies.prompts if kind == "evolve")
    assert manifest["evol"]["ops_enabled"] == ["deepen"] and set(manifest["evol"]["ops"]) == {"deepen"}
    assert [k for k in manifest["templates"] if k.startswith("evolve/")] == ["evolve/deepen"]
    check_lineage(records, {r["id"] for r in records if r["meta"]["stage"] == "generate"}, rounds=1)
    check_accounting(manifest, stats, records, rejected, ledger)


def test_more_rounds_continue_without_redoing_the_first(tmp_path):
    data = write_rows(tmp_path / "tasks.json", task_rows(20, "zh", seed=7))
    out = tmp_path / "run"
    replies = EvolReplies()
    with FakeTeacher(reply=replies) as fake:
        args = ("evolve", str(data), "--out", str(out), "--base-url", fake.base_url, "--model", "fake-model", *PRICE, "--quiet")
        one = run_cli(*args, "--rounds", "1")
        assert one.returncode == 0, one.stderr
        records1, rejected1, ledger1, manifest1 = load_run(out)
        sent1, seen1 = fake.stats["requests_received"], dict(replies.seen)
        two = run_cli(*args, "--rounds", "2")
        assert two.returncode == 0, two.stderr
        stats = fake.stats
    records, rejected, ledger, manifest = load_run(out)
    # Round 1 is left as it was: the files only grew, and its counts did not move.
    assert records[:len(records1)] == records1 and rejected[:len(rejected1)] == rejected1 and ledger[:len(ledger1)] == ledger1
    assert {op: r["1"] for op, r in manifest["evol"]["ops"].items() if "1" in r} == {op: r["1"] for op, r in manifest1["evol"]["ops"].items()}
    # Only round 2 was asked: one rewrite and one answer per round-1 survivor, each request once.
    new = ledger[len(ledger1):]
    survivors = len(evolved(records1))
    assert {e["round"] for e in new} == {2} and stats["requests_received"] - sent1 == len(new)
    assert replies.seen["evolve"] - seen1["evolve"] == survivors == sum(e["stage"] == "evolve" for e in new)
    assert len({e["request_id"] for e in ledger}) == len(ledger)
    assert manifest1["evol"]["rounds_completed"] == 1 and manifest["evol"]["rounds_completed"] == 2 and manifest["status"] == "completed"
    check_lineage(records, {f"tasks.json:{i}" for i in range(1, 21)}, rounds=2)
    check_accounting(manifest, stats, records, rejected, ledger)


def test_evolve_a_run_directory_continues_each_lineage(tmp_path):
    data = write_rows(tmp_path / "tasks.json", task_rows(12, "en", seed=8))
    first, second = tmp_path / "first", tmp_path / "second"
    with FakeTeacher(reply=EvolReplies()) as fake:
        done = run_cli("evolve", str(data), "--rounds", "1", "--out", str(first), "--base-url", fake.base_url, "--model", "fake-model", *PRICE, "--quiet")
    assert done.returncode == 0, done.stderr
    parents = {r["id"]: r for r in load_run(first)[0]}
    assert len(evolved(list(parents.values()))) >= 10
    with FakeTeacher(reply=EvolReplies()) as fake:
        # Another seed draws other ops for the roots: the fake rewrites one prompt one way, so a repeated op only repeats the first run.
        args = ("evolve", str(first), "--rounds", "1", "--seed", "7", "--out", str(second), "--base-url", fake.base_url,
                "--model", "fake-model", *PRICE, "--quiet")
        done = run_cli(*args)
        assert done.returncode == 0, done.stderr
        stats = fake.stats
        again = run_cli(*args)  # resume finds every step done
        assert again.returncode == 0, again.stderr
        assert fake.stats["requests_received"] == stats["requests_received"]
    records, rejected, ledger, manifest = load_run(second)
    by_id = {r["id"]: r for r in records}
    assert {k: (r["instruction"], r["output"], r["meta"]["evol"]) for k, r in by_id.items() if k in parents} == \
           {k: (r["instruction"], r["output"], r["meta"]["evol"]) for k, r in parents.items()}  # the input, lineage and all
    children = [r for r in evolved(records) if r["id"] not in parents]
    assert len(children) + len(rejected) == len(parents)
    for rec in children:
        chain, parent = rec["meta"]["evol"], by_id[rec["meta"]["evol"][-1]["parent_id"]]
        # Lineage rounds go on from the parent's; the run's own round (counts, ids, resume) is 1.
        assert chain[:-1] == parent["meta"]["evol"] and [s["round"] for s in chain] == list(range(1, len(chain) + 1))
        assert rec["meta"]["round"] == 1 and rec["id"].startswith(parent["id"] + ".e1")
    assert {len(r["meta"]["evol"]) for r in children} == {1, 2}
    for rec in rejected:
        earlier = parents[rec["parent_id"] + ".e1"]
        assert rec["reason"] == "near-duplicate" and rec["duplicate_of"] == earlier["id"] and rec["meta"]["op"] == earlier["meta"]["op"]
    assert all(set(per_round) == {"1"} for per_round in manifest["evol"]["ops"].values())
    check_accounting(manifest, stats, records, rejected, ledger, inputs=frozenset(parents))
    # The card lists every Evol check the run made, those that eliminated nothing with 0.
    card = hub_card(build(second, "alpaca"), None, "alice/evolved-twice")
    for check in manifest["filters"]["evol_checks"]:
        row = next(line for line in card.splitlines() if line.startswith(f"| `{check}` |"))
        assert row.split("|")[3].strip() == str(manifest["counts"]["rejected"].get(check, 0)), row
    assert "| `prompt-leak` | Evol-Instruct: the rewrite still contains the rewriting prompt's markers | 0 |" in card


def test_a_failed_judge_request_rejects_the_evolution_as_request_failed(tmp_path):
    rows = task_rows(30, "en", seed=11, triggers={"QJFAIL": 4, "QJUDGE": 2, "QFAIL": 2})
    data = write_rows(tmp_path / "tasks.json", rows)
    out = tmp_path / "run"
    replies = EvolReplies()
    with FakeTeacher(reply=replies) as fake:
        args = ("evolve", str(data), "--rounds", "1", "--out", str(out), "--judge-equal", "--retries", "0",
                "--base-url", fake.base_url, "--model", "fake-model", *PRICE, "--quiet")
        done = run_cli(*args)
        assert done.returncode == 0, done.stderr
        stats = fake.stats
        records, rejected, ledger, manifest = load_run(out)
        # A re-run treats a failed judge like a failed rewrite: replayed from the ledger, not sent again.
        again = run_cli(*args)
        assert again.returncode == 0, again.stderr
        assert fake.stats["requests_received"] == stats["requests_received"]
        assert load_run(out)[:3] == (records, rejected, ledger)
    by_id = {r["id"]: r for r in records}
    unjudged = {f"tasks.json:{i}" for i, row in enumerate(rows, 1) if row["instruction"].endswith("QJFAIL")}
    failed_judge = [r for r in rejected if r["meta"].get("failed_stage") == "judge"]
    assert {r["parent_id"] for r in failed_judge} == unjudged
    for rec in failed_judge:
        assert rec["reason"] == "request-failed" and rec["detail"].startswith("the judge (--judge-equal) request failed: ")
        assert rec["meta"]["judge"] == "failed" and set(rec["meta"]["request_ids"]) == {"evolve", "judge"}  # no answer paid for
        assert rec["parent_instruction"] == by_id[rec["parent_id"]]["instruction"]  # the parent is kept
    assert not any(e["stage"] == "respond" and e["parent_id"] in unjudged for e in ledger)
    # Nothing kept went unjudged; the rewrite failures are request-failed too, naming their stage.
    assert all(r["meta"]["judge"] in ("not-equal", "unclear") for r in evolved(records))
    assert {r["meta"]["failed_stage"] for r in rejected if r["reason"] == "request-failed"} == {"evolve", "judge"}
    assert manifest["counts"]["failed_requests"] == manifest["counts"]["rejected"]["request-failed"] == 6
    check_accounting(manifest, stats, records, rejected, ledger)
    card = hub_card(build(out, "alpaca"), None, "alice/judged")
    assert "| `request-failed` | the teacher request failed after retries | 6 |" in card and "(6 failed)" in card


def test_rate_limited_judge_requests_are_request_failed_and_every_failure_is_counted(tmp_path):
    # The reported run: 429s with --retries 0 hit every stage, the judge included.
    data = write_rows(tmp_path / "tasks.json", task_rows(60, "en", seed=12, triggers={"QJUDGE": 4}))
    out = tmp_path / "run"
    with FakeTeacher(reply=EvolReplies(), seed=5, p_429=0.2, retry_after=0.01) as fake:
        done = run_cli("evolve", str(data), "--rounds", "2", "--out", str(out), "--judge-equal", "--retries", "0",
                       "--base-url", fake.base_url, "--model", "fake-model", *PRICE, "--quiet")
        stats = fake.stats
    assert done.returncode == 0, done.stderr
    records, rejected, ledger, manifest = load_run(out)
    failed = [e for e in ledger if e["status"] != "ok"]
    assert {e["stage"] for e in failed} == {"evolve", "judge", "respond"} and stats["faults"]["429"] == len(failed)
    assert sorted((e["stage"], e["round"], e["parent_id"]) for e in failed) == sorted(
        (r["meta"]["failed_stage"], r["meta"]["round"], r["parent_id"]) for r in rejected if r["reason"] == "request-failed")
    assert all(r["meta"].get("judge") in ("not-equal", "unclear") for r in evolved(records))
    check_accounting(manifest, stats, records, rejected, ledger)  # failed_requests == request-failed rejections


def test_evolving_a_generate_run_keeps_its_seed_file_and_licence(tmp_path):
    from fakes.sample_run import SEEDS_SHA, make_run

    source = make_run(tmp_path / "generated")
    manifest = json.loads((source / "manifest.json").read_text(encoding="utf-8"))
    manifest["seeds"]["path"] = str(tmp_path / "private" / "zh_seed_tasks.jsonl")  # as an older run may have written it
    (source / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "evolved"
    with FakeTeacher(reply=EvolReplies()) as fake:
        done = run_cli("evolve", str(source), "--rounds", "1", "--out", str(out), "--base-url", fake.base_url, "--model", "fake-model",
                       *PRICE, "--quiet")
    assert done.returncode == 0, done.stderr
    seeds = load_run(out)[3]["seeds"]
    assert seeds == {"path": "zh_seed_tasks.jsonl", "count": 175, "sha256": SEEDS_SHA, "license": "Apache-2.0"}
    card = hub_card(build(out, "alpaca"), None, "alice/evolved")
    assert f"| Seed tasks | `zh_seed_tasks.jsonl`, 175 tasks, sha256 `{SEEDS_SHA}` |" in card
    assert "| Seed licence | `Apache-2.0` |" in card and "\nlicense: apache-2.0\n" in card
    assert "seed file not recorded" not in card and str(tmp_path) not in card


def test_input_seeds_only_when_every_input_is_a_run_that_records_them(tmp_path):
    from fakes.sample_run import make_run

    one, two = make_run(tmp_path / "one"), make_run(tmp_path / "two", license="MIT")
    manifest = json.loads((two / "manifest.json").read_text(encoding="utf-8"))
    manifest["seeds"] |= {"path": "en_seed_tasks.jsonl", "count": 25, "sha256": "f" * 64}
    (two / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    data = write_rows(tmp_path / "tasks.json", task_rows(3, "zh"))
    assert input_seeds([one])["license"] == "Apache-2.0"
    assert input_seeds([one, one]) == input_seeds([one])
    assert input_seeds([one, data]) is None and input_seeds([data]) is None  # no claim for records not from seeds
    both = input_seeds([one, two])
    assert both == {"path": "zh_seed_tasks.jsonl, en_seed_tasks.jsonl", "count": 200, "sha256": None, "license": None}  # licences disagree


def test_evolve_a_parquet_file(tmp_path):
    import polars as pl

    data = tmp_path / "tasks.parquet"
    pl.DataFrame(task_rows(10, "zh", seed=9)).write_parquet(data)
    out = tmp_path / "run"
    with FakeTeacher(reply=EvolReplies()) as fake:
        done = run_cli("evolve", str(data), "--out", str(out), "--base-url", fake.base_url, "--model", "fake-model", *PRICE, "--quiet")
        stats = fake.stats
    assert done.returncode == 0, done.stderr
    records, rejected, ledger, manifest = load_run(out)
    roots = {f"tasks.parquet:{i}" for i in range(1, 11)}
    originals = [r for r in records if not r["meta"]["evol"]]
    assert [(r["instruction"], r["input"], r["output"]) for r in originals] == [(t["instruction"], t["input"], t["output"]) for t in task_rows(10, "zh", seed=9)]
    assert len(evolved(records)) + len(rejected) == 10 and manifest["input"]["paths"] == ["tasks.parquet"] and manifest["config"]["lang"] == "zh"
    check_lineage(records, roots, rounds=1)
    check_accounting(manifest, stats, records, rejected, ledger)

def test_kill_minus_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    rows = task_rows(40, "zh", seed=3, triggers={"QSAME": 3, "QREFUSE": 3, "QLONGSORRY": 3})
    data = write_rows(tmp_path / "tasks.json", rows)

    def args(fake, out):
        return ("evolve", str(data), "--rounds", "2", "--out", str(out), "--concurrency", "4",
                "--base-url", fake.base_url, "--model", "fake-model", *PRICE, "--quiet")

    with FakeTeacher(reply=EvolReplies(), latency=0.01) as fake:
        clean = run_cli(*args(fake, tmp_path / "clean"))
        assert clean.returncode == 0, clean.stderr
        proc = cli(*args(fake, tmp_path / "killed"))
        ledger_path = tmp_path / "killed" / "requests.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(finished(read_jsonl(ledger_path))) < 70:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        partial = len(finished(read_jsonl(ledger_path)))
        assert 70 <= partial
        resumed = run_cli(*args(fake, tmp_path / "killed"))
        assert resumed.returncode == 0, resumed.stderr
    a_records, a_rejected, a_ledger, a_manifest = load_run(tmp_path / "clean")
    b_records, b_rejected, b_ledger, b_manifest = load_run(tmp_path / "killed")
    assert partial < len(b_ledger)
    assert {r["id"]: (r["instruction"], r["input"], r["output"], r["meta"]["op"]) for r in evolved(b_records)} == \
           {r["id"]: (r["instruction"], r["input"], r["output"], r["meta"]["op"]) for r in evolved(a_records)}
    assert len(b_records) == len(a_records)
    assert {r["id"]: r["reason"] for r in b_rejected} == {r["id"]: r["reason"] for r in a_rejected}
    # Nothing logged was asked again: the same requests, each once.
    assert sorted(e["request_id"] for e in b_ledger) == sorted(e["request_id"] for e in a_ledger)
    assert b_manifest["evol"]["ops"] == a_manifest["evol"]["ops"] and b_manifest["usage"] == a_manifest["usage"]


def test_budget_stop_then_resume_and_refusals_of_other_settings(tmp_path):
    data = write_rows(tmp_path / "tasks.json", task_rows(60, "en", seed=5))
    out = tmp_path / "run"
    base = ("evolve", str(data), "--out", str(out), "--model", "fake-model", "--max-tokens", "256", *PRICE, "--quiet", "--concurrency", "4")
    with FakeTeacher(reply=EvolReplies()) as fake:
        capped = run_cli(*base, "--base-url", fake.base_url, "--max-cost", "0.01")
        assert capped.returncode == 3, capped.stderr
        assert "--max-cost" in capped.stderr
        records, rejected, ledger, manifest = load_run(out)
        assert manifest["status"] == "stopped" and manifest["stop_reason"] == "budget"
        assert 0 < manifest["cost"]["usd"] <= 0.01 and len(evolved(records)) + len(rejected) < 60
        # Other ops (or another input, or a seed) are refused with one line and exit 2, before any request.
        before = fake.stats["requests_received"]
        other_ops = run_cli(*base, "--base-url", fake.base_url, "--ops", "deepen")
        assert other_ops.returncode == 2 and "different --ops" in other_ops.stderr and len(other_ops.stderr.strip().splitlines()) == 1
        assert fake.stats["requests_received"] == before
        finished = run_cli(*base, "--base-url", fake.base_url, "--max-cost", "5")
        assert finished.returncode == 0, finished.stderr
        stats = fake.stats
    records, rejected, ledger, manifest = load_run(out)
    assert len(evolved(records)) + len(rejected) == 60 and manifest["status"] == "completed"
    assert len({e["request_id"] for e in ledger}) == len(ledger)
    check_accounting(manifest, stats, records, rejected, ledger)


def test_budget_holds_when_unusable_replies_are_billed_and_retried(tmp_path):
    # Half the replies are billed (prompt + 256 completion tokens) but carry no choices: retried.
    data = write_rows(tmp_path / "tasks.json", task_rows(60, "en", seed=5))
    out = tmp_path / "run"
    with FakeTeacher(reply=EvolReplies(), seed=4, p_malformed=0.5, billed_malformed=256) as fake:
        capped = run_cli("evolve", str(data), "--out", str(out), "--model", "fake-model", "--max-tokens", "256", "--price-in", "50",
                         "--price-out", "150", "--quiet", "--concurrency", "4", "--base-url", fake.base_url, "--max-cost", "0.5")
        stats = fake.stats
    assert capped.returncode == 3, capped.stderr
    _, _, _, manifest = load_run(out)
    assert stats["faults"]["malformed"] >= 2
    assert (manifest["usage"]["prompt_tokens"], manifest["usage"]["completion_tokens"]) == (stats["prompt_tokens_sent"], stats["completion_tokens_sent"])
    assert 0 < manifest["cost"]["usd"] <= 0.5


def test_resume_refuses_another_input_or_a_generate_run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare()
    cfg = GenerateConfig(evol_rounds=1)
    templates = load_templates("zh", OPS, judge=False)
    base = read_base([write_rows(tmp_path / "tasks.json", task_rows(5, "zh"))])
    source = {"paths": ["tasks.json"], "records": 5, "limit": None, "sha256": records_sha256(base)}
    engine = Engine(run, None, model=cfg.model, base_url=None, price=None, command="selfinstruct evolve")
    evo = Evolution(cfg, engine, "zh", base=base, copy_base=True, source=source)
    engine.stages.append(evo)
    engine.load()
    evo.load()
    engine.save_manifest(force=True)
    check_evolvable(run, cfg, "zh", templates, source)  # the same settings resume
    check_evolvable(run, dataclasses.replace(cfg, evol_rounds=3), "zh", templates, source)  # more rounds continue
    with pytest.raises(OutputError, match="different input records"):
        check_evolvable(run, cfg, "zh", templates, source | {"sha256": records_sha256(base[:4])})
    with pytest.raises(OutputError, match="different --judge-equal, --seed"):
        check_evolvable(run, dataclasses.replace(cfg, judge_equal=True, seed=1), "zh", templates, source)
    manifest = json.loads(run.manifest_path.read_text(encoding="utf-8"))
    del manifest["input"]
    run.write_manifest(manifest)
    with pytest.raises(OutputError, match="holds a generate run"):
        check_evolvable(run, cfg, "zh", templates, source)
    assert [r["id"] for r in read_jsonl(run.path / "records.jsonl")] == [r["id"] for r in base]
