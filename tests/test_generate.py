"""The generate command end to end: the real CLI in a subprocess against a fake teacher on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rapidfuzz import process
from rapidfuzz.distance import Indel

from conftest import REPO
from fakes.openai_server import FakeTeacher
from selfinstruct.similarity import Vocabulary

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


def test_generates_2000_chinese_records_through_faults(tmp_path):
    faults = dict(
        latency=0.01, seed=7, p_429=0.05, retry_after=0.2, p_500=0.05, p_timeout=0.02, timeout_sleep=5.0,
        p_malformed=0.03, p_truncated=0.05, p_bad_items=0.2, p_near_duplicate=0.15,
    )
    out = tmp_path / "run"
    with FakeTeacher(**faults) as fake:
        done = run_cli(
            "generate", "--seeds", str(seeds_file(tmp_path)), "--n", "2000", "--base-url", fake.base_url,
            "--model", "fake-model", "--out", str(out), "--concurrency", "16", "--timeout", "1", "--retries", "8",
            "--price-in", "0.5", "--price-out", "1.5", "--quiet",
        )
        stats = fake.stats
    assert done.returncode == 0, done.stderr
    records = read_jsonl(out / "records.jsonl")
    rejected = read_jsonl(out / "rejected.jsonl")
    ledger = read_jsonl(out / "requests.jsonl")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert len(records) == 2000 and len({r["id"] for r in records}) == 2000
    assert max_pair_similarity([r["instruction"] for r in records]) < 0.7
    reasons = {r["reason"] for r in rejected}
    assert {"near-duplicate", "truncated"} <= reasons
    assert reasons & {"blacklist", "refusal", "wrong-language", "empty", "output-equals-input"}
    for rec in rejected:
        if rec["reason"] == "near-duplicate":
            assert rec["duplicate_of"] and rec["score"] >= 0.7
    # Exact accounting: the manifest's tokens are the server's, the dollars are tokens x price.
    assert manifest["usage"]["prompt_tokens"] == stats["prompt_tokens_sent"]
    assert manifest["usage"]["completion_tokens"] == stats["completion_tokens_sent"]
    expected_usd = (stats["prompt_tokens_sent"] * 0.5 + stats["completion_tokens_sent"] * 1.5) / 1e6
    assert manifest["cost"]["usd"] == pytest.approx(expected_usd, abs=1e-6)
    assert manifest["cost"]["priced"] is True
    counts = manifest["counts"]
    assert counts["kept"] == 2000 and counts["requests"] == len(ledger)
    assert counts["failed_requests"] == sum(1 for e in ledger if e["status"] != "ok")
    assert sum(counts["rejected"].values()) == len(rejected)
    # Lineage on every record.
    meta = records[0]["meta"]
    assert meta["seed_ids"] and meta["template"] == "generate_zh.jinja" and meta["model"] == "fake-model"
    assert meta["request_id"].startswith("r") and "usage" in meta and meta["raw"]


def test_kill_minus_9_then_resume_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "run"
    seeds = seeds_file(tmp_path)
    with FakeTeacher(latency=0.03, seed=11, p_near_duplicate=0.1) as fake:
        args = ("generate", "--seeds", str(seeds), "--n", "1500", "--base-url", fake.base_url, "--model", "m",
                "--out", str(out), "--concurrency", "8", "--quiet")
        for threshold in (300, 900):
            proc = cli(*args)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                path = out / "records.jsonl"
                if path.exists() and path.read_bytes().count(b"\n") >= threshold:
                    break
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
        done = run_cli(*args)
        sent = fake.stats["sent_contents"]
    assert done.returncode == 0, done.stderr
    assert "resuming" not in done.stdout  # --quiet
    records = read_jsonl(out / "records.jsonl")
    assert len(records) == 1500
    assert len({r["id"] for r in records}) == 1500
    assert len({r["instruction"] for r in records}) == 1500
    everything_sent = "\n".join(sent)
    assert all(r["instruction"] in everything_sent for r in records)


def test_sigint_stops_gracefully_with_resume_hint(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(latency=0.2, seed=3) as fake:
        proc = cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "100000", "--base-url", fake.base_url,
                   "--model", "m", "--out", str(out), "--concurrency", "4")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out / "records.jsonl").exists():
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Resume with: selfinstruct generate" in err
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == "stopped" and manifest["stop_reason"] == "interrupted"
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
                       "--model", "gpt-4o-mini", "--price-in", "0.15", "--price-out", "0.6", "--dry-run")
        assert fake.stats["requests_received"] == 0
    assert done.returncode == 0, done.stderr
    assert "requests" in done.stdout and "$" in done.stdout


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


def test_secrets_never_written(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(p_500=0.2, seed=9) as fake:
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "50", "--base-url", fake.base_url,
                       "--model", "m", "--out", str(out), "--retries", "1")
    assert done.returncode == 0, done.stderr
    assert KEY not in done.stdout + done.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    "case",
    ["empty-seeds", "bad-json-line", "missing-instruction", "undefined-variable", "n-zero", "unwritable-out", "missing-key", "unknown-config-key"],
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
    elif case == "undefined-variable":
        tpl = tmp_path / "t.jinja"
        tpl.write_text("<<user>>\n{{ examples }}\n{{ not_a_variable }}\n", encoding="utf-8")
        args += ["--template", str(tpl)]
        expect = f"{tpl}:3: undefined variable"
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
    done = run_cli(*args, env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expect in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "hint:" in lines[0]
