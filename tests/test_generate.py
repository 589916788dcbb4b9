"""The generate command end to end: the real CLI in a subprocess against a fake teacher on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfinstruct.dirlock import LOCK_FILE
from rapidfuzz import process
from rapidfuzz.distance import Indel

from conftest import REPO, finished
from fakes.openai_server import FakeTeacher
from selfinstruct.similarity import Vocabulary, rouge_l, topic_text

KEY = "sk-test-TOPSECRET-0123456789abcdef"


def seeds_file(tmp_path: Path) -> Path:
    """A small Chinese seed file written here (the project's own seeds may change under us)."""
    rows = [
        ("解释为什么天空是蓝色的", "", "因为大气对短波长的蓝光散射更强。"),
        ("写一首关于秋天的五言绝句", "", "西风吹落叶，孤雁过寒塘。"),
        ("把下面的句子翻译成英文", "我喜欢读书", "I like reading."),
        ("判断下面评论的情感倾向", "这家店的菜太难吃了", "负面"),
        ("用三句话总结下面的段落", "人工智能正在改变医疗、教育和交通等行业。", "人工智能影响广泛。"),
    ]
    path = tmp_path / "seeds.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"id": f"s{i}", "name": "t", "instruction": a, "instances": [{"input": b, "output": c}], "is_classification": False}, ensure_ascii=False)
            for i, (a, b, c) in enumerate(rows)
        )
        + "\n",
        encoding="utf-8",
    )
    return path


def cli(*args: str, env: dict | None = None, cwd: Path | None = None, **kw) -> subprocess.Popen:
    full_env = {**os.environ, "OPENAI_API_KEY": KEY, **(env or {})}
    full_env.pop("SELFINSTRUCT_N", None)
    return subprocess.Popen(
        [sys.executable, "-m", "selfinstruct", *args],
        env=full_env,
        cwd=cwd or REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def run_cli(*args: str, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    proc = cli(*args, **kw)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def max_pair_similarity(texts: list[str]) -> float:
    """Brute-force all-pairs ROUGE-L, independent of the index under test."""
    vocab = Vocabulary()
    codes = [vocab.encode(t) for t in texts]
    matrix = process.cdist(codes, codes, scorer=Indel.normalized_similarity, workers=-1)
    for i in range(len(codes)):
        matrix[i, i] = 0.0
    return float(matrix.max())


@pytest.mark.parametrize("signum, code, reason", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_stops_gracefully_with_resume_hint(tmp_path, signum, code, reason):
    out = tmp_path / "run"
    with FakeTeacher(latency=0.2, seed=3) as fake:
        proc = cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "100000", "--base-url", fake.base_url,
                   "--model", "m", "--out", str(out), "--concurrency", "4")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out / "records.jsonl").exists():
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    assert "Resume with: selfinstruct generate" in err and "Traceback" not in err
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == reason and manifest["stop_reason"] == reason
    assert manifest["counts"]["kept"] == len(read_jsonl(out / "records.jsonl")) > 0


def test_budget_cap_is_never_passed(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(latency=0.01, seed=5) as fake:
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "100000", "--base-url", fake.base_url,
                       "--model", "m", "--out", str(out), "--price-in", "100", "--price-out", "300", "--max-cost", "2",
                       "--max-tokens", "1000", "--concurrency", "8", "--quiet")
    assert done.returncode == 3, done.stderr
    assert "--max-cost" in done.stderr
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert 0 < manifest["cost"]["usd"] <= 2.0
    assert manifest["stop_reason"] == "budget"


def test_dry_run_calls_nothing(tmp_path):
    with FakeTeacher() as fake:
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "52000", "--base-url", fake.base_url,
                       "--model", "gpt-4o-mini", "--price-in", "0.15", "--price-out", "0.6", "--dry-run", cwd=tmp_path)
        assert fake.stats["requests_received"] == 0
    assert done.returncode == 0, done.stderr
    assert "requests" in done.stdout and "$" in done.stdout
    assert not (tmp_path / "outputs").exists()


def dollars(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\$(\d+\.\d+)", text)]


def test_dry_run_projects_evolution_rounds_too(tmp_path):
    base = ["generate", "--seeds", str(seeds_file(tmp_path)), "--n", "5000", "--model", "m", "--base-url",
            "http://127.0.0.1:9/v1", "--price-in", "0.5", "--price-out", "1.5", "--dry-run"]
    plain, one, two = (run_cli(*base, *extra) for extra in ([], ["--evol-rounds", "1"], ["--evol-rounds", "2", "--judge-equal"]))
    assert plain.returncode == one.returncode == two.returncode == 0, two.stderr
    assert "evol" not in plain.stdout
    (gen_usd,) = dollars(plain.stdout)
    gen1, evo1, total1 = dollars(one.stdout)
    gen2, evo2, total2 = dollars(two.stdout)
    assert gen1 == gen2 == gen_usd
    assert "5,000 evolutions, 10,000 requests" in one.stdout  # a rewrite and an answer per kept record
    assert "8,500 evolutions, 25,500 requests" in two.stdout  # round 2 evolves 70% of round 1; a judge request each
    assert evo2 > evo1 * 1.5 and abs(total1 - (gen1 + evo1)) <= 0.011 and abs(total2 - (gen2 + evo2)) <= 0.011


def test_missing_usage_is_estimated_and_marked(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(usage_mode="absent") as fake:
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "30", "--base-url", fake.base_url,
                       "--model", "m", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["usage"]["estimated"] is True
    assert manifest["usage"]["prompt_tokens"] > 0 and manifest["usage"]["completion_tokens"] > 0


def test_bad_key_stops_at_once_without_leaking_it(tmp_path):
    with FakeTeacher(api_key="sk-the-right-one") as fake:
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "10", "--base-url", fake.base_url.replace("127.0.0.1", "localhost"),
                       "--model", "m", "--out", str(tmp_path / "run"), "--quiet")
        assert fake.stats["requests_received"] <= 16  # one wave of in-flight requests at most, no retries
    assert done.returncode == 2
    assert "refused the API key" in done.stderr and "Traceback" not in done.stderr
    assert KEY not in done.stderr + done.stdout


@pytest.mark.parametrize(
    "case",
    ["empty-seeds", "bad-json-line", "missing-instruction", "wrong-type", "ten-mb-line", "not-utf8-or-gbk", "undefined-variable",
     "template-syntax", "n-zero", "unwritable-out", "missing-key", "unknown-config-key", "config-wrong-type", "config-bad-toml"],
)
def test_broken_inputs_give_one_line_and_exit_2(tmp_path, case):
    seeds = seeds_file(tmp_path)
    args = ["generate", "--seeds", str(seeds), "--n", "5", "--out", str(tmp_path / "run"), "--base-url", "http://127.0.0.1:9/v1"]
    env: dict = {}
    expect = ""
    if case == "empty-seeds":
        seeds.write_text("", encoding="utf-8")
        expect = f"{seeds}: no seed tasks"
    elif case == "bad-json-line":
        seeds.write_text(seeds.read_text(encoding="utf-8") + "{oops\n", encoding="utf-8")
        expect = f"{seeds}:6: invalid JSON"
    elif case == "missing-instruction":
        seeds.write_text('{"id": "x", "output": "y"}\n', encoding="utf-8")
        expect = f"{seeds}:1: missing `instruction`"
    elif case == "wrong-type":
        seeds.write_text('{"instruction": "写诗", "output": ["春眠不觉晓"]}\n', encoding="utf-8")
        expect = f"{seeds}:1: `output` must be a string"
    elif case == "ten-mb-line":
        huge = json.dumps({"instruction": "总结下面的文章", "input": "长" * 10_000_000, "output": "短"}, ensure_ascii=False)
        seeds.write_text(seeds.read_text(encoding="utf-8") + huge + "\n", encoding="utf-8")
        expect = f"{seeds}:6: seed task is 10,000,008 characters"
    elif case == "not-utf8-or-gbk":
        seeds.write_bytes(b"\x81\xff\xfe\x81" * 64)  # neither: no BOM and no NUL bytes, which would name UTF-16
        expect = f"{seeds}: not UTF-8 or GBK text"
    elif case == "undefined-variable":
        tpl = tmp_path / "t.jinja"
        tpl.write_text("<<user>>\n{{ examples }}\n{{ not_a_variable }}\n", encoding="utf-8")
        args += ["--template", str(tpl)]
        expect = f"{tpl}:3: undefined variable"
    elif case == "template-syntax":
        tpl = tmp_path / "t.jinja"
        tpl.write_text("<<user>>\n{% for ex in examples %}\n{{ ex.instruction }\n", encoding="utf-8")
        args += ["--template", str(tpl)]
        expect = f"{tpl}:3: template syntax error"
    elif case == "n-zero":
        args[4] = "0"
        expect = "--n must be at least 1"
    elif case == "unwritable-out":
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        args[6] = str(blocker / "run")
        expect = f"{blocker / 'run'}: cannot write the run directory"
    elif case == "missing-key":
        args[-1] = "https://api.example.com/v1"
        env = {"OPENAI_API_KEY": ""}
        expect = "no API key: $OPENAI_API_KEY is not set"
    elif case == "unknown-config-key":
        cfg = tmp_path / "c.toml"
        cfg.write_text("concurency = 4\n", encoding="utf-8")
        args += ["--config", str(cfg)]
        expect = f"{cfg}: unknown key `concurency`"
    elif case == "config-wrong-type":
        cfg = tmp_path / "c.toml"
        cfg.write_text('concurrency = "many"\n', encoding="utf-8")
        args += ["--config", str(cfg)]
        expect = f"{cfg}: `concurrency` must be int"
    elif case == "config-bad-toml":
        cfg = tmp_path / "c.toml"
        cfg.write_text("n = \n", encoding="utf-8")
        args += ["--config", str(cfg)]
        expect = f"{cfg}: invalid TOML"
    done = run_cli(*args, env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expect in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "hint:" in lines[0]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "gbk"])
def test_bom_gbk_and_crlf_seed_files_run(tmp_path, encoding):
    seeds = seeds_file(tmp_path)
    seeds.write_bytes(seeds.read_text(encoding="utf-8").replace("\n", "\r\n").encode(encoding))
    out = tmp_path / "run"
    with FakeTeacher(latency=0.005) as fake:
        done = run_cli("generate", "--seeds", str(seeds), "--n", "20", "--base-url", fake.base_url, "--model", "m",
                       "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["seeds"]["count"] == 5 and manifest["counts"]["kept"] == 20
    assert manifest["config"]["lang"] == "zh"  # decoded as Chinese, not mojibake


def test_debug_flag_shows_the_traceback(tmp_path):
    seeds = seeds_file(tmp_path)
    seeds.write_text("{oops\n", encoding="utf-8")
    done = run_cli("--debug", "generate", "--seeds", str(seeds), "--n", "5", "--base-url", "http://127.0.0.1:9/v1", timeout=60)
    assert done.returncode != 0
    assert "Traceback" in done.stderr and f"{seeds}:1: invalid JSON" in done.stderr


def test_flags_reach_the_teacher_and_a_quiet_run_ends_with_one_summary_line(tmp_path):
    out = tmp_path / "run"
    other_key = "sk-from-MY_TEACHER_KEY-42"
    with FakeTeacher(latency=0.05, api_key=other_key) as fake:
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "24", "--base-url", fake.base_url, "--model", "teach-1",
                       "--out", str(out), "--temperature", "0.3", "--top-p", "0.9", "--max-tokens", "777", "--num-examples", "2",
                       "--per-request", "4", "--concurrency", "3", "--api-key-env", "MY_TEACHER_KEY", "--quiet",
                       env={"MY_TEACHER_KEY": other_key})
        stats = fake.stats
    assert done.returncode == 0, done.stderr
    assert {k: stats["last_request"][k] for k in ("model", "temperature", "top_p", "max_tokens")} == {
        "model": "teach-1", "temperature": 0.3, "top_p": 0.9, "max_tokens": 777}
    assert 1 <= stats["max_in_flight"] <= 3
    ledger = finished(read_jsonl(out / "requests.jsonl"))
    assert all(len(entry["seed_ids"]) == 2 for entry in ledger)
    # The fake answers as many tasks as the prompt asks for: item numbers run 0 to 3 (of --per-request 4).
    items = read_jsonl(out / "records.jsonl") + read_jsonl(out / "rejected.jsonl")
    assert {int(r["id"].rsplit(".", 1)[1]) for r in items} == {0, 1, 2, 3}
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("completed: kept 24/24") and "requests" in lines[0], done.stderr
    assert other_key not in done.stderr + done.stdout


def test_a_local_server_needs_no_key(tmp_path):
    with FakeTeacher() as fake:
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "5", "--base-url", fake.base_url, "--model", "m",
                       "--out", str(tmp_path / "run"), "--quiet", env={"OPENAI_API_KEY": ""})
    assert done.returncode == 0, done.stderr


def test_a_task_copied_from_a_seed_is_a_near_duplicate_naming_the_seed(tmp_path):
    def reply(body, rng):
        # The first item is a seed with one character added; the second is new.
        return ("1. 指令：解释一下为什么天空是蓝色的\n输入：<无输入>\n输出：瑞利散射。\n###\n"
                f"2. 指令：{''.join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(16))}\n输入：<无输入>\n输出：番茄、辣椒、生菜。")

    out = tmp_path / "run"
    with FakeTeacher(reply=reply) as fake:
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "3", "--base-url", fake.base_url, "--model", "m",
                       "--out", str(out), "--concurrency", "1", "--quiet", "--no-rule", "too-short")
    assert done.returncode == 0, done.stderr
    copies = [r for r in read_jsonl(out / "rejected.jsonl") if r["instruction"].startswith("解释一下")]
    assert copies and all(r["reason"] == "near-duplicate" and r["duplicate_of"] == "seed:s0" for r in copies)
    # Scored on the topic (the default --field): 一天空蓝色 against 天空蓝色.
    assert copies[0]["score"] == round(rouge_l(topic_text("解释一下为什么天空是蓝色的"), topic_text("解释为什么天空是蓝色的")), 4) == 0.8889
    assert not any(r["instruction"].startswith("解释") for r in read_jsonl(out / "records.jsonl"))


def test_an_unknown_model_price_is_a_warning_and_an_unpriced_projection(tmp_path):
    base = ["generate", "--seeds", str(seeds_file(tmp_path)), "--n", "1000", "--model", "my-private-model",
            "--base-url", "https://teacher.example.com/v1", "--dry-run"]
    done = run_cli(*base)
    assert done.returncode == 0, done.stderr
    assert "no price known for 'my-private-model'" in done.stderr and "unknown (no price)" in done.stdout
    capped = run_cli(*base, "--max-cost", "5")
    assert capped.returncode == 2 and "--max-cost needs a price" in capped.stderr
    half = run_cli(*base, "--price-in", "1")
    assert half.returncode == 2 and "--price-in was given without --price-out" in half.stderr and "Traceback" not in half.stderr


def test_version_and_help_list_every_command():
    from selfinstruct import __version__

    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip().endswith(__version__)
    shown = run_cli("--help")
    assert shown.returncode == 0
    assert all(name in shown.stdout for name in ("generate", "evolve", "filter", "export", "push", "doctor", "seeds"))


def test_budget_holds_when_unusable_replies_are_billed_and_retried(tmp_path):
    # Half the replies are JSON without choices but with usage (the prompt + 1,000 completion tokens,
    # ~$0.33 here): paid for, unusable, retried. One attempt reserved per request would let retries overspend.
    out = tmp_path / "run"
    with FakeTeacher(seed=11, p_malformed=0.5, billed_malformed=1000) as fake:
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "100000", "--base-url", fake.base_url,
                       "--model", "m", "--out", str(out), "--price-in", "100", "--price-out", "300", "--max-cost", "3",
                       "--max-tokens", "1000", "--concurrency", "8", "--quiet")
        stats = fake.stats
    assert done.returncode == 3, done.stderr
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert stats["faults"]["malformed"] >= 2
    assert (manifest["usage"]["prompt_tokens"], manifest["usage"]["completion_tokens"]) == (stats["prompt_tokens_sent"], stats["completion_tokens_sent"])
    assert 0 < manifest["cost"]["usd"] <= 3.0


@pytest.mark.parametrize("command", ["generate", "evolve"])
def test_resume_refuses_another_model_or_price_and_changes_nothing(tmp_path, command):
    out = tmp_path / "run"
    if command == "generate":
        source = ["generate", "--seeds", str(seeds_file(tmp_path)), "--n", "5"]
    else:
        data = tmp_path / "tasks.json"
        data.write_text(json.dumps([{"instruction": t, "input": "", "output": "好的。"} for t in
                                    ("解释积雨云是怎样形成的", "写一首关于秋天落叶的短诗", "列出三种节约用水的方法")], ensure_ascii=False), encoding="utf-8")
        source = ["evolve", str(data)]
    with FakeTeacher() as fake:
        base = [*source, "--base-url", fake.base_url, "--out", str(out), "--quiet"]
        first = run_cli(*base, "--model", "m", "--price-in", "1.234567", "--price-out", "3")
        assert first.returncode == 0, first.stderr
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_FILE}
        sent = fake.stats["requests_received"]
        other_model = run_cli(*base, "--model", "other", "--price-in", "1.234567", "--price-out", "3")
        no_price = run_cli(*base, "--model", "m")
        both = run_cli(*base, "--model", "other")
        assert fake.stats["requests_received"] == sent
    assert other_model.returncode == 2 and "different --model (m)" in other_model.stderr and "resume with --model m," in other_model.stderr
    # Without the flags a local server costs $0: the $ already spent would vanish from the manifest.
    # The hint gives the figures back exactly (not rounded to 6 digits), so following it resumes.
    assert no_price.returncode == 2 and "resume with --price-in 1.234567 --price-out 3.0" in no_price.stderr
    assert both.returncode == 2 and "resume with --model m --price-in 1.234567 --price-out 3.0" in both.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_FILE} == before


@pytest.mark.parametrize("extra, message", [
    (["--no-rule", "blacklistt"], "--no-rule 'blacklistt' is not a rule"),
    (["--max-requests", "0"], "--max-requests must be at least 1"),
    (["--model", " "], "--model is empty"),
    (["--evol-rounds", "1", "--evol-ops", "deepen,bogus"], "--evol-ops: unknown operation 'bogus'"),
    (["--push-to", "bad name!!"], "--push-to 'bad name!!' is not a Hub dataset id"),
    (["--push-to", "alice/zh"], "no Hugging Face token"),
    (["--api-key-env", "NOPE_KEY"], "no API key: $NOPE_KEY is not set"),
])
def test_bad_values_are_refused_before_any_request(tmp_path, extra, message):
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf"), "NOPE_KEY": ""}
    with FakeTeacher() as fake:
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "5", "--base-url", fake.base_url, "--model", "m",
                       "--out", str(tmp_path / "run"), "--quiet", *extra, env=env)
        assert fake.stats["requests_received"] == 0
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_credentials_in_the_base_url_are_refused_and_never_recorded(tmp_path, monkeypatch):
    done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "5", "--model", "m", "--out", str(tmp_path / "run"),
                   "--base-url", "http://user:PWSECRET@127.0.0.1:9/v1")
    assert done.returncode == 2 and "--base-url carries a user name or password" in done.stderr
    assert "PWSECRET" not in done.stderr + done.stdout
    from selfinstruct.cli import command_line

    monkeypatch.setattr(sys, "argv", ["selfinstruct", "generate", "--base-url", "https://gw.example.com/v1?api-key=QSECRET&x=1",
                                      "--base-url=http://u:PW2@h/v1"])
    line = command_line()
    assert "QSECRET" not in line and "PW2" not in line and "https://gw.example.com/v1?***" in line


def test_dry_run_says_when_the_projection_is_over_the_budget(tmp_path):
    done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "52000", "--model", "gpt-4o-mini",
                   "--base-url", "http://127.0.0.1:9/v1", "--price-in", "0.15", "--price-out", "0.6", "--max-cost", "0.5", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "over --max-cost $0.5" in done.stdout


def test_an_interrupted_evolve_prints_its_resume_command_on_one_line(tmp_path):
    data = tmp_path / "tasks.json"
    data.write_text(json.dumps([{"instruction": f"解释第{i}个关于天空和海洋颜色的科学问题", "input": "", "output": "因为散射。"}
                                for i in range(40)], ensure_ascii=False), encoding="utf-8")
    out = tmp_path / ("a-rather-long-output-directory-name-" * 3)
    with FakeTeacher(latency=0.3) as fake:
        proc = cli("evolve", str(data), "--out", str(out), "--base-url", fake.base_url, "--model", "m", "--rounds", "2",
                   "--ops", "deepen,concretize,mutate", "--concurrency", "2")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out / "requests.jsonl").exists():
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    (line,) = [line for line in err.splitlines() if "Resume with:" in line]
    assert line.endswith("--concurrency 2") and str(out) in line
