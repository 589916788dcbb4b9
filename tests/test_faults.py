"""Faults a 52K run meets: a flaky teacher, kill -9, a full disk, lost permissions, leaked secrets.

Each test asserts that nothing is lost and that the counts add up against what the fake server saw.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from selfinstruct.dirlock import LOCK_FILE
from selfinstruct.similarity import over, topic_text

from conftest import finished
from fakes.hub_server import FakeHub
from fakes.openai_server import FakeTeacher
from test_generate import KEY, cli, max_pair_similarity, read_jsonl, run_cli, seeds_file

HUB_TOKEN = "hf_faultTestTokenQqq111WWW222"


def wait_for_lines(path: Path, count: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Block until `path` has `count` lines (or the process ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.01)


def intact_prefix(path: Path) -> list[dict]:
    """Every line of a JSONL file parses, except at most a torn last one (cut on the next start)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    rows = [json.loads(line) for line in complete if line.strip()]
    if tail.strip():
        with pytest.raises(ValueError):
            json.loads(tail)  # a partial line, never a complete-looking one without its newline
    return rows


def test_soak_5000_chinese_records_through_a_flaky_teacher(tmp_path):
    faults = dict(
        latency=0.005, seed=21, p_429=0.10, retry_after=0.05, p_500=0.05, p_timeout=0.05, timeout_sleep=5.0,
        p_malformed=0.10, p_truncated=0.05, p_bad_items=0.1, p_near_duplicate=0.1,
    )
    out = tmp_path / "run"
    with FakeTeacher(**faults) as fake:
        done = run_cli(
            "generate", "--seeds", str(seeds_file(tmp_path)), "--n", "5000", "--base-url", fake.base_url,
            "--model", "fake-model", "--out", str(out), "--concurrency", "32", "--timeout", "1", "--retries", "2",
            "--price-in", "0.5", "--price-out", "1.5", "--quiet",
        )
        stats = fake.stats
    assert done.returncode == 0, done.stderr
    records = read_jsonl(out / "records.jsonl")
    rejected = read_jsonl(out / "rejected.jsonl")
    ledger = finished(read_jsonl(out / "requests.jsonl"))
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    counts = manifest["counts"]

    # Exactly --n, unique, no near-duplicates left.
    assert len(records) == 5000 and len({r["id"] for r in records}) == 5000
    assert len({r["instruction"] for r in records}) == 5000
    assert not over(max_pair_similarity([topic_text(r["instruction"], r["input"]) for r in records]), 0.7)  # on the run's --field topic

    # Every request is in the ledger once; every failed one is a request-failed record and a count.
    assert len({e["request_no"] for e in ledger}) == len(ledger) == counts["requests"]
    failed = [e for e in ledger if e["status"] != "ok"]
    assert failed, "with --retries 2 and 30% faults some requests must fail for good"
    assert counts["failed_requests"] == len(failed)
    assert {r["id"] for r in rejected if r["reason"] == "request-failed"} == {f"{e['request_id']}.0" for e in failed}
    assert sum(counts["rejected"].values()) == len(rejected)
    assert counts["kept"] == len(records)

    # Every HTTP request the server saw is an attempt of ours, and every failed one is named by kind.
    assert counts["attempts"] == stats["requests_received"] == sum(e["attempts"] for e in ledger)
    errors = counts["attempt_errors"]
    injected = stats["faults"]
    assert errors["http-429"] == injected["429"]
    assert errors.get("http-500", 0) + errors.get("http-502", 0) + errors.get("http-503", 0) == injected["500"]
    assert errors["malformed"] == injected["malformed"]
    # An injected timeout is a client timeout, or the fake's late 504 when our loop saw that first.
    assert errors["timeout"] + errors.get("http-504", 0) == injected["timeout"]
    assert sum(errors.values()) == counts["attempts"] - (counts["requests"] - counts["failed_requests"])

    # Token totals are the server's, to the token; dollars are tokens x price.
    assert manifest["usage"]["prompt_tokens"] == stats["prompt_tokens_sent"]
    assert manifest["usage"]["completion_tokens"] == stats["completion_tokens_sent"]
    expected_usd = (stats["prompt_tokens_sent"] * 0.5 + stats["completion_tokens_sent"] * 1.5) / 1e6
    assert manifest["cost"]["usd"] == pytest.approx(expected_usd, abs=1e-6)

    # The filters did their work, and every rejection says why.
    reasons = {r["reason"] for r in rejected}
    assert {"near-duplicate", "truncated", "request-failed"} <= reasons
    assert reasons & {"blacklist", "refusal", "wrong-language", "empty", "output-equals-input"}
    assert all(r["duplicate_of"] and r["score"] >= 0.7 for r in rejected if r["reason"] == "near-duplicate")
    meta = records[0]["meta"]
    assert meta["seed_ids"] and meta["template"] == "generate_zh.jinja" and meta["model"] == "fake-model"
    assert meta["request_id"].startswith("r") and "usage" in meta and meta["raw"]


def test_kill_minus_9_at_five_random_moments_then_resume(tmp_path):
    n = 2000
    out = tmp_path / "run"
    rng = random.Random(20240917)
    moments = sorted(rng.sample(range(1, n - 100), 5))  # kept-record counts at which to kill
    with FakeTeacher(latency=0.02, seed=13, p_near_duplicate=0.1, p_429=0.05, retry_after=0.05) as fake:
        args = ("generate", "--seeds", str(seeds_file(tmp_path)), "--n", str(n), "--base-url", fake.base_url, "--model", "m",
                "--out", str(out), "--concurrency", "8", "--quiet")
        after_kills: list[list[dict]] = []
        for moment in moments:
            proc = cli(*args)
            wait_for_lines(out / "records.jsonl", moment, proc)
            time.sleep(rng.uniform(0, 0.05))  # anywhere inside the handling of a reply, not just between them
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
            after_kills.append(intact_prefix(out / "records.jsonl"))
        done = run_cli(*args)
        stats = fake.stats
    assert done.returncode == 0, done.stderr
    records = read_jsonl(out / "records.jsonl")
    ledger = finished(read_jsonl(out / "requests.jsonl"))
    assert len(records) == n
    assert len({r["id"] for r in records}) == n and len({r["instruction"] for r in records}) == n
    assert len({e["request_no"] for e in ledger}) == len(ledger)
    # Nothing written before a kill is lost or rewritten: each kill's records open the final file.
    for moment, before in zip(moments, after_kills):
        assert len(before) >= moment and records[: len(before)] == before
    # The dedup index was rebuilt on every resume: no near-duplicate across the six runs.
    assert stats["near_duplicates"] and not over(max_pair_similarity([topic_text(r["instruction"], r["input"]) for r in records]), 0.7)
    # Every record comes from a reply the server really sent, through the ledger entry that logged it.
    sent = set(stats["sent_contents"])
    logged = {e["request_id"]: e for e in ledger}
    for rec in records:
        entry = logged[rec["meta"]["request_id"]]
        assert entry["response_id"] == rec["meta"]["response_id"]
        assert entry["content"] in sent and rec["instruction"] in entry["content"]
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"]["kept"] == n and manifest["counts"]["requests"] == len(ledger)
    # Replies in flight at a kill were sent but never logged: the only tokens we may not know of.
    assert manifest["usage"]["completion_tokens"] <= stats["completion_tokens_sent"]
    # ...yet not lost: each was ledgered as dispatched before it left, and the manifest counts it as possibly billed.
    raw = read_jsonl(out / "requests.jsonl")
    answered = {e["dispatch"] for e in raw if e["status"] != "dispatched"}
    unanswered = [e for e in raw if e["status"] == "dispatched" and e["dispatch"] not in answered]
    billed = manifest["cost"]["possibly_billed"]
    assert 1 <= billed["requests"] == len(unanswered) <= len(moments) * 8 and billed["estimated"]
    # The server answered every attempt it got, so what it was sent is what we logged plus at most those.
    assert sum(e["attempts"] for e in ledger) <= stats["requests_received"] <= sum(e["attempts"] for e in ledger) + len(unanswered) * 7


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"forbidden": True}, "error: the teacher refused the API key (HTTP 403)"),
        ({"models": ["teacher-a", "teacher-b"]}, "error: the teacher does not know model 'm' or the URL path (HTTP 404)"),
    ],
    ids=["403-forbidden", "404-unknown-model"],
)
def test_403_and_404_stop_generate_at_once_with_one_line(tmp_path, knobs, message):
    # Like a bad key (401): retrying or recording these and going on would only repeat them.
    with FakeTeacher(latency=0.005, **knobs) as fake:
        done = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "1000", "--base-url", fake.base_url, "--model", "m",
                       "--out", str(tmp_path / "run"), "--concurrency", "4", "--quiet")
        stats = fake.stats
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message) and "hint:" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and KEY not in done.stderr + done.stdout
    # One wave of --concurrency requests at most, none retried (a retry would be a second wave).
    assert 1 <= stats["requests_received"] <= 4 and stats["responses_ok"] == 0


def _file_size_limit(limit: int):
    def apply() -> None:
        # Without SIG_IGN the kernel kills the writer with SIGXFSZ; ignored, write() fails with EFBIG.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_mid_run_is_one_clear_line_and_loses_nothing(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(latency=0.005, seed=31) as fake:
        args = ("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "3000", "--base-url", fake.base_url, "--model", "m",
                "--out", str(out), "--concurrency", "8", "--quiet")
        # A file-size limit stands in for a full disk: writes past it fail like ENOSPC does.
        proc = cli(*args, preexec_fn=_file_size_limit(200_000))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "cannot append" in lines[0] and "re-run the same command to resume" in lines[0], err
        assert "Traceback" not in err
        before = intact_prefix(out / "records.jsonl")
        ledger = finished(intact_prefix(out / "requests.jsonl"))
        assert before and {r["meta"]["request_id"] for r in before} <= {e["request_id"] for e in ledger}
        done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    after = read_jsonl(out / "records.jsonl")
    assert after[: len(before)] == before  # earlier records untouched
    assert len(after) == 3000 and len({r["id"] for r in after}) == 3000


def _drop_root_override() -> None:
    """Make file modes bind for a root child as for anyone: drop CAP_DAC_OVERRIDE/READ_SEARCH."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _modes_bind() -> bool:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o555)
        probe = subprocess.run([sys.executable, "-c", f"import os; print(os.access({tmp!r}, os.W_OK))"],
                               preexec_fn=_drop_root_override, capture_output=True, text=True)
        os.chmod(tmp, 0o755)
    return probe.returncode == 0 and probe.stdout.strip() == "False"


def _chmod_tree(path: Path, dir_mode: int, file_mode: int) -> None:
    for p in path.iterdir():
        p.chmod(file_mode)
    path.chmod(dir_mode)


@pytest.mark.skipif(not _modes_bind(), reason="cannot make file permissions bind in this environment")
def test_permissions_lost_mid_run_and_at_start(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(latency=0.01, seed=41) as fake:
        args = ["generate", "--seeds", str(seeds_file(tmp_path)), "--n", "3000", "--base-url", fake.base_url, "--model", "m",
                "--out", str(out), "--concurrency", "8", "--quiet"]
        proc = cli(*args, preexec_fn=_drop_root_override)
        wait_for_lines(out / "records.jsonl", 300, proc)
        out.chmod(0o555)  # the directory turns read-only under the run: the next manifest rewrite fails
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "manifest.json: cannot write (Permission denied)" in lines[0], err
        before = intact_prefix(out / "records.jsonl")
        assert len(before) >= 300

        # Starting on a read-only run directory fails before any request, and changes nothing.
        _chmod_tree(out, 0o555, 0o444)
        snapshot = {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_FILE}
        received = fake.stats["requests_received"]
        done = run_cli(*args, preexec_fn=_drop_root_override)
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "cannot write the run directory (Permission denied)" in lines[0], done.stderr
        assert fake.stats["requests_received"] == received
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_FILE} == snapshot

        _chmod_tree(out, 0o755, 0o644)
        done = run_cli(*args, preexec_fn=_drop_root_override)
    assert done.returncode == 0, done.stderr
    after = read_jsonl(out / "records.jsonl")
    assert after[: len(before)] == before
    assert len(after) == 3000 and len({r["id"] for r in after}) == 3000


def test_no_secret_in_any_file_log_line_card_or_upload(tmp_path):
    out = tmp_path / "run"
    card_dir = tmp_path / "export"
    # echo_key: every 400 and 5xx body quotes our Authorization header in full, as careless proxies do;
    # no_json_mode makes a 400 whose text the run keeps (the manifest's json_mode_fallback).
    knobs = dict(api_key=KEY, p_500=0.3, p_malformed=0.1, no_json_mode=True, echo_key=True, seed=9, latency=0.005)
    with FakeHub() as hub, FakeTeacher(**knobs) as fake:
        hub.add_token(HUB_TOKEN, "alice")
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": HUB_TOKEN,
               "HF_HUB_DISABLE_TELEMETRY": "1", "NO_COLOR": "1"}
        done = run_cli("--debug", "generate", "--seeds", str(seeds_file(tmp_path)), "--n", "150", "--base-url", fake.base_url,
                       "--model", "m", "--out", str(out), "--retries", "1", "--json-mode", "--push-to", "alice/zh-secrets", env=env)
        stats = fake.stats
        assert stats["by_status"].get("401", 0) == 0  # the key really was sent, and accepted
        assert stats["by_status"].get("400") and sum(stats["by_status"].get(c, 0) for c in ("500", "502", "503"))  # and echoed
        exported = run_cli("export", str(out), "--to", str(card_dir), "--jsonl", env=env)
        uploads = dict(hub.objects)
        repos = dict(hub.repos)
        pushed = hub.files("alice/zh-secrets") if "alice/zh-secrets" in repos else {}
    assert done.returncode == 0, done.stderr
    assert exported.returncode == 0, exported.stderr
    assert (card_dir / "README.md").exists() and uploads
    # --push-to made the named repo, private, with the data as parquet and a dataset card.
    assert list(repos) == ["alice/zh-secrets"] and repos["alice/zh-secrets"].private is True
    shards = [p for p in pushed if p.startswith("data/") and p.endswith(".parquet")]
    assert shards and all(pushed[p][:4] == b"PAR1" for p in shards), sorted(pushed)
    assert "README.md" in pushed and b'load_dataset("alice/zh-secrets")' in pushed["README.md"]
    rows = sum(pq.read_metadata(io.BytesIO(pushed[p])).num_rows for p in shards)
    assert rows == len(read_jsonl(out / "records.jsonl")) == 150
    ledger = finished(read_jsonl(out / "requests.jsonl"))
    assert any(e["status"] != "ok" or e.get("errors") for e in ledger)  # error messages were written too
    files = [p for d in (out, card_dir) for p in d.rglob("*") if p.is_file()]
    for secret in (KEY, HUB_TOKEN):
        for text in (done.stdout, done.stderr, exported.stdout, exported.stderr):
            assert secret not in text
        for path in files:
            assert secret.encode() not in path.read_bytes(), path
        for content in uploads.values():
            assert secret.encode() not in content
