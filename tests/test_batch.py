"""--batch: the Batch API transport against the fake teacher's files and batches, through the real openai SDK."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import signal
import time
from pathlib import Path

import openai
import pytest

from conftest import finished
from fakes.evol_replies import EvolReplies, task_rows
from fakes.openai_server import FakeTeacher
from selfinstruct.batch import BatchTransport
from selfinstruct.engine import Engine
from selfinstruct.pricing import Price, batch_price
from selfinstruct.rundir import LEDGER, RunDir
from selfinstruct.teacher import BatchClient, RequestFailed, TeacherSettings
from test_generate import KEY, cli, read_jsonl, run_cli, seeds_file

PRICE = ("--price-in", "1", "--price-out", "2")
FAST = ("--poll-interval", "0.05", "--quiet")


def generate_args(fake: FakeTeacher, tmp_path: Path, out: Path, n: int = 40, *extra: str) -> tuple[str, ...]:
    return ("generate", "--seeds", str(seeds_file(tmp_path)), "--n", str(n), "--base-url", fake.base_url, "--model", "m",
            "--out", str(out), "--batch", *PRICE, *FAST, *extra)


def notes(ledger: list[dict], kind: str) -> list[dict]:
    return [e for e in ledger if e.get("status") == kind]


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---- the fake's Batch API, as the SDK sees it ---------------------------------------------


def upload(client: openai.OpenAI, ids: list[str], content: str = "写 3 个任务") -> str:
    lines = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "m", "messages": [{"role": "user", "content": content}]}} for cid in ids]
    data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
    return client.files.create(file=("in.jsonl", data), purpose="batch").id


def wait_batch(client: openai.OpenAI, batch_id: str, seen: list[str] | None = None):
    while True:
        batch = client.batches.retrieve(batch_id)
        if seen is not None and (not seen or seen[-1] != batch.status):
            seen.append(batch.status)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.01)


def test_fake_batch_api_behaves_as_documented():
    with FakeTeacher(seed=1, p_500=0.5, batch_delay=0.05) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="sk-x", max_retries=0)
        file_id = upload(client, [f"r{i}" for i in range(8)])
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        seen: list[str] = []
        batch = wait_batch(client, batch.id, seen)
        assert seen[0] == "validating" and seen[-1] == "completed" and "finalizing" in seen
        assert batch.request_counts.total == 8 and batch.request_counts.completed + batch.request_counts.failed == 8
        assert 0 < batch.request_counts.failed < 8
        out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
        err = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
        assert {o["custom_id"] for o in out} | {e["custom_id"] for e in err} == {f"r{i}" for i in range(8)}
        assert all(o["response"]["status_code"] == 200 and o["response"]["body"]["choices"] and o["error"] is None for o in out)
        assert all(e["response"]["status_code"] >= 500 and "error" in e["response"]["body"] for e in err)
        assert [b.id for b in client.batches.list(limit=10).data] == [batch.id]

        # Expiry keeps what ran; the rest is in the error file as batch_expired.
        fake.configure(p_500=0.0, batch_expire_after=3)
        expired = wait_batch(client, client.batches.create(input_file_id=upload(client, list("abcde")), endpoint="/v1/chat/completions",
                                                           completion_window="24h").id)
        assert expired.status == "expired" and expired.expired_at
        assert len(client.files.content(expired.output_file_id).text.splitlines()) == 3
        codes = [json.loads(x)["error"]["code"] for x in client.files.content(expired.error_file_id).text.splitlines()]
        assert codes == ["batch_expired", "batch_expired"]

        # Cancel: cancelling, then cancelled; a finished batch cannot be cancelled.
        fake.configure(batch_expire_after=None, batch_run_seconds=5)
        live = client.batches.create(input_file_id=upload(client, ["x", "y"]), endpoint="/v1/chat/completions", completion_window="24h")
        assert client.batches.cancel(live.id).status == "cancelling"
        assert wait_batch(client, live.id).status == "cancelled"
        with pytest.raises(openai.APIStatusError):
            client.batches.cancel(live.id)

        # A file with a custom_id twice fails validation, naming the line.
        fake.configure(batch_run_seconds=0)
        bad = wait_batch(client, client.batches.create(input_file_id=upload(client, ["same", "same"]), endpoint="/v1/chat/completions",
                                                       completion_window="24h").id)
        assert bad.status == "failed" and bad.errors.data[0].code == "duplicate_custom_id" and bad.errors.data[0].line == 2
        stats = fake.stats
        assert stats["batches_created"] == 4 and stats["files_uploaded"] == 4 and stats["batch_cancels"] == 1


# ---- the transport on a real engine -------------------------------------------------------


def ask_all(tmp_path: Path, fake: FakeTeacher, count: int, **transport) -> tuple[Engine, list]:
    """Ask `count` requests at once through a BatchTransport on an engine; their ledger entries."""
    run = RunDir(tmp_path / "run")
    run.prepare()
    engine = Engine(run, None, model="m", base_url=fake.base_url, price=Price(0.5, 1.0, "test"), command="test")
    engine.load()
    settings = TeacherSettings(model="m", base_url=fake.base_url, retries=1)

    async def main():
        engine.transport = BatchTransport(BatchClient(settings, "sk-x"), settings, engine, poll_interval=0.02, **transport)
        try:
            return await asyncio.gather(*(engine.ask("generate", f"q{i:03d}", [{"role": "user", "content": f"写 2 个任务 {i}"}])
                                          for i in range(count)))
        finally:
            await engine.transport.aclose()

    entries = asyncio.run(main())
    run.close()
    return engine, entries


def test_a_wave_is_split_into_files_at_the_line_limit(tmp_path):
    with FakeTeacher(seed=2) as fake:
        engine, entries = ask_all(tmp_path, fake, 10, max_lines=4)
        stats = fake.stats
    assert [e["status"] for e in entries] == ["ok"] * 10
    files = notes(read_jsonl(tmp_path / "run" / LEDGER), "batch-file")
    assert [len(f["request_ids"]) for f in files] == [4, 4, 2]
    assert sorted(stats["batch_lines"]) == [f"q{i:03d}" for i in range(10)]
    # Each entry is its own request's reply: the fake's content for that prompt.
    assert all(e["content"] and e["usage"]["prompt_tokens"] > 0 for e in entries)


def test_byte_limit_splits_too(tmp_path):
    with FakeTeacher(seed=2) as fake:
        _, entries = ask_all(tmp_path, fake, 6, max_bytes=400)
    files = notes(read_jsonl(tmp_path / "run" / LEDGER), "batch-file")
    assert len(files) >= 3 and sum(len(f["request_ids"]) for f in files) == 6
    assert all(e["status"] == "ok" for e in entries)


def test_error_lines_go_into_the_next_batch_up_to_retries(tmp_path):
    with FakeTeacher(seed=4, p_500=1.0) as fake:
        engine, entries = ask_all(tmp_path, fake, 3)
        stats = fake.stats
    # --retries 1: every line sent twice, then failed with what the error file said.
    assert collections.Counter(stats["batch_lines"]) == {"q000": 2, "q001": 2, "q002": 2}
    # (the fake's 5xx are 500, 502 and 503)
    assert all(e["status"] == "failed" and e["attempts"] == 2 and len(e["errors"]) == 2 for e in entries)
    assert all(kind.startswith("http-5") for e in entries for kind in [*e["errors"], e["error_kind"]])


def test_a_failed_batch_fails_its_requests_with_its_errors(tmp_path):
    with FakeTeacher(seed=4, batch_fail="validation") as fake:
        _, entries = ask_all(tmp_path, fake, 2)
    assert all(e["status"] == "failed" and e["error_kind"] == "batch-failed" and "fail this batch" in e["error"] for e in entries)


def test_an_expired_batch_keeps_its_output_and_sends_only_the_missing_lines(tmp_path):
    with FakeTeacher(seed=5, batch_expire_after=4) as fake:
        _, entries = ask_all(tmp_path, fake, 10)
        stats = fake.stats
    assert all(e["status"] == "ok" and e["attempts"] == 1 for e in entries)
    # 10 lines, 4 run per batch: three batches; a line goes again only while it has not run.
    assert stats["batches_created"] == 3 and stats["requests_received"] == 10
    assert len(stats["batch_lines"]) == 10 + 6 + 2
    ended = notes(read_jsonl(tmp_path / "run" / LEDGER), "batch-end")
    assert [e["batch_status"] for e in ended] == ["expired", "expired", "completed"]


def test_batch_price_is_half_unless_told(tmp_path):
    online = Price(1.0, 4.0, "flags")
    assert (batch_price(online, "m").input, batch_price(online, "m").output) == (0.5, 2.0)
    assert batch_price(online, "m", 0.25).output == 3.0
    assert "batch 50% off" in batch_price(online, "m").source
    assert batch_price(None, "m") is None


# ---- generate --batch, end to end --------------------------------------------------------


def test_generate_batch_keeps_n_in_waves_at_the_batch_price(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(seed=6, p_bad_items=0.5) as fake:
        result = run_cli(*generate_args(fake, tmp_path, out, 60), timeout=120)
        stats = fake.stats
    assert result.returncode == 0, result.stderr
    ledger = read_jsonl(out / LEDGER)
    records = read_jsonl(out / "records.jsonl")
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(records) == 60 and manifest["status"] == "completed"
    # Every request was one line of one batch, sent once, and its file and batch were ledgered before its reply.
    done = finished(ledger)
    assert sorted(stats["batch_lines"]) == sorted(e["request_id"] for e in done)
    first_ok = next(i for i, e in enumerate(ledger) if e.get("status") == "ok")
    assert ledger[0]["status"] != "batch" and any(e["status"] == "batch" for e in ledger[:first_ok])
    assert manifest["batch"]["batches"] and all(b["status"] == "completed" for b in manifest["batch"]["batches"])
    assert len(manifest["batch"]["batches"]) == len(notes(ledger, "batch"))
    # Charged at half the online price given by the flags.
    cost = manifest["cost"]
    assert (cost["price_in_per_1m"], cost["price_out_per_1m"]) == (0.5, 1.0) and "batch" in cost["price_source"]
    assert manifest["batch"]["discount"] == 0.5
    usage = manifest["usage"]
    assert cost["usd"] == pytest.approx((usage["prompt_tokens"] * 0.5 + usage["completion_tokens"] * 1.0) / 1e6, abs=1e-6)
    assert usage["prompt_tokens"] == stats["prompt_tokens_sent"] and usage["completion_tokens"] == stats["completion_tokens_sent"]
    assert cost["possibly_billed"]["requests"] == 0
    # The dataset card says so.
    from selfinstruct.card import hub_card
    from selfinstruct.export import build

    assert "through the OpenAI Batch API" in hub_card(build(out, "alpaca"), None, "alice/x")


def test_dry_run_projects_at_the_batch_price(tmp_path):
    seeds = str(seeds_file(tmp_path))

    def projected(*extra: str) -> float:
        result = run_cli("generate", "--seeds", seeds, "--n", "100000", "--model", "gpt-4o-mini", "--dry-run", *PRICE, *extra)
        assert result.returncode == 0, result.stderr
        return float(re.findall(r"≈ \$([0-9.]+)", result.stdout)[-1])

    # (half off without --batch-discount: the generate run below is charged at 0.5 and 1.0)
    assert projected("--batch", "--batch-discount", "0.25") == pytest.approx(projected() * 0.75, rel=0.01)


def test_kill_minus_9_while_a_batch_runs_then_resume_submits_no_line_twice(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(seed=7, batch_run_seconds=2.0) as fake:
        args = generate_args(fake, tmp_path, out, 40)
        proc = cli(*args)
        wait_for(lambda: (out / LEDGER).exists() and notes(read_jsonl(out / LEDGER), "batch"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        batch_id = notes(read_jsonl(out / LEDGER), "batch")[0]["batch_id"]
        assert fake.batch_api.batches[batch_id]["status"] in ("validating", "in_progress")
        assert not finished(read_jsonl(out / LEDGER))
        resumed = run_cli(*args, timeout=120)
        stats = fake.stats
    assert resumed.returncode == 0, resumed.stderr
    ledger = read_jsonl(out / LEDGER)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and len(read_jsonl(out / "records.jsonl")) == 40
    # The resumed run picked up the same batch: no line was submitted or run twice.
    assert len(stats["batch_lines"]) == len(set(stats["batch_lines"])) == len(finished(ledger))
    assert stats["requests_received"] == len(finished(ledger))
    first = set(notes(ledger, "batch-file")[0]["request_ids"])
    assert first <= {e["request_id"] for e in finished(ledger)}
    # Requests the killed run had sent were held by the batch, so none is "possibly billed".
    assert manifest["cost"]["possibly_billed"]["requests"] == 0


def test_ctrl_c_leaves_batches_running_and_cancel_batches_cancels_them(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(seed=8, batch_run_seconds=30.0) as fake:
        args = generate_args(fake, tmp_path, out, 40)
        proc = cli(*args)
        wait_for(lambda: (out / LEDGER).exists() and notes(read_jsonl(out / LEDGER), "batch"))
        # While the run holds its directory, a cancel is refused: the run would send the unrun lines again.
        refused = run_cli(*args, "--cancel-batches", timeout=60)
        assert refused.returncode == 2 and fake.stats["batch_cancels"] == 0, refused.stderr
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "--cancel-batches" in err and "resume" in err
        batch_id = notes(read_jsonl(out / LEDGER), "batch")[0]["batch_id"]
        assert fake.batch_api.batches[batch_id]["status"] == "in_progress"
        # Resuming online (at the same, batch, price) would pay the running lines twice: refused.
        before = len(read_jsonl(out / LEDGER))
        online = run_cli("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "40", "--base-url", fake.base_url, "--model", "m",
                         "--out", str(out), "--price-in", "0.5", "--price-out", "1", "--quiet", timeout=60)
        assert online.returncode == 2 and "add --batch" in online.stderr and len(read_jsonl(out / LEDGER)) == before
        cancelled = run_cli(*args, "--cancel-batches", timeout=60)
        assert cancelled.returncode == 0, cancelled.stderr
        assert batch_id in cancelled.stdout + cancelled.stderr
        assert fake.stats["batch_cancels"] == 1
        wait_for(lambda: fake.batch_api.batches[batch_id]["status"] == "cancelled")
        # Resume: the cancelled lines go again, in a new batch; nothing runs twice.
        fake.configure(batch_run_seconds=0.0)
        resumed = run_cli(*args, timeout=120)
        stats = fake.stats
    assert resumed.returncode == 0, resumed.stderr
    ledger = read_jsonl(out / LEDGER)
    assert len(read_jsonl(out / "records.jsonl")) == 40
    assert stats["requests_received"] == len(finished(ledger))
    # The lines the cancelled batch ran were kept; only the others were sent again.
    first, second = notes(ledger, "batch-file")[:2]
    assert set(second["request_ids"]) < set(first["request_ids"])
    assert collections.Counter(stats["batch_lines"]).most_common(1)[0][1] == 2


def test_evolve_batch_sends_each_phase_of_a_round_as_a_batch(tmp_path):
    data = tmp_path / "tasks.json"
    data.write_text(json.dumps(task_rows(12, "zh", seed=3), ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "evolved"
    with FakeTeacher(reply=EvolReplies(), seed=9) as fake:
        result = run_cli("evolve", str(data), "--rounds", "1", "--out", str(out), "--base-url", fake.base_url, "--model", "m",
                         "--batch", *PRICE, *FAST, timeout=120)
        stats = fake.stats
    assert result.returncode == 0, result.stderr
    ledger = read_jsonl(out / LEDGER)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["batch"]["batches"]
    # The rewrites went in one batch, the answers of the survivors in the next.
    files = notes(ledger, "batch-file")
    assert len(files) == 2 and all(rid.startswith("evolve:") for rid in files[0]["request_ids"]) and len(files[0]["request_ids"]) == 12
    assert sorted(stats["batch_lines"]) == sorted(e["request_id"] for e in finished(ledger))


def test_a_file_uploaded_before_a_kill_is_submitted_as_it_is_on_resume(tmp_path):
    """A kill between upload and batch create leaves a file in the ledger: resume makes its batch, uploading nothing again."""
    with FakeTeacher(seed=10) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="sk-x", max_retries=0)
        ids = ["q000", "q001", "q002"]
        lines = [{"custom_id": rid, "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "m", "messages": [{"role": "user", "content": f"写 2 个任务 {i}"}]}} for i, rid in enumerate(ids)]
        file_id = client.files.create(file=("in.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode()),
                                      purpose="batch").id
        run = RunDir(tmp_path / "run")
        run.prepare()
        run.append(LEDGER, [{"status": "batch-file", "file_id": file_id, "request_ids": ids, "at": 1.0}])
        run.close()
        _, entries = ask_all(tmp_path, fake, 3)
        stats = fake.stats
    assert [e["status"] for e in entries] == ["ok"] * 3
    assert stats["files_uploaded"] == 1 and stats["batches_created"] == 1 and stats["batch_lines"] == ids
    batch = notes(read_jsonl(tmp_path / "run" / LEDGER), "batch")
    assert len(batch) == 1 and batch[0]["file_id"] == file_id


def test_a_server_without_json_mode_gets_the_text_template_in_the_next_batch(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(seed=11, no_json_mode=True) as fake:
        result = run_cli(*generate_args(fake, tmp_path, out, 20, "--json-mode"), timeout=120)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert "response_format" in manifest["teacher"]["json_mode_fallback"]
    ok = [e for e in finished(read_jsonl(out / LEDGER)) if e["status"] == "ok"]
    assert ok and all(e["json_mode"] is False for e in ok)


def test_a_refused_key_stops_the_batch_run_on_one_line_without_the_key(tmp_path):
    with FakeTeacher(api_key="sk-the-right-one") as fake:
        result = run_cli(*generate_args(fake, tmp_path, tmp_path / "run", 20), timeout=60)
    assert result.returncode != 0
    assert "refused the API key" in result.stderr and KEY not in result.stderr and "Traceback" not in result.stderr


def test_a_stop_before_the_queue_is_sent_bills_nothing_and_resume_sends_it(tmp_path):
    from selfinstruct.engine import Halted

    run = RunDir(tmp_path / "run")
    run.prepare()
    with FakeTeacher(seed=12) as fake:
        settings = TeacherSettings(model="m", base_url=fake.base_url)

        def engine_with_transport(quiet: float) -> Engine:
            engine = Engine(run, None, model="m", base_url=fake.base_url, price=Price(0.5, 1.0, "test"), command="test")
            engine.load()
            engine.transport = BatchTransport(BatchClient(settings, "sk-x"), settings, engine, poll_interval=0.02, quiet_seconds=quiet)
            return engine

        async def ask(engine: Engine, stop_after: float | None):
            jobs = [asyncio.ensure_future(engine.ask("generate", f"q{i}", [{"role": "user", "content": "写 2 个任务"}])) for i in range(3)]
            if stop_after is not None:
                await asyncio.sleep(stop_after)
                engine.request_stop("interrupted")
            results = await asyncio.gather(*jobs, return_exceptions=True)
            await engine.transport.aclose()
            return results

        stopped = engine_with_transport(quiet=30.0)
        results = asyncio.run(ask(stopped, 0.2))
        assert all(isinstance(r, Halted) for r in results)
        assert fake.stats["files_uploaded"] == 0
        # Never uploaded, so never billed; the next engine over the same ledger agrees, and sends them.
        assert stopped.possibly_billed()["requests"] == 0
        resumed = engine_with_transport(quiet=0.05)
        assert resumed.possibly_billed()["requests"] == 0
        results = asyncio.run(ask(resumed, None))
        assert [r["status"] for r in results] == ["ok"] * 3 and sorted(fake.stats["batch_lines"]) == ["q0", "q1", "q2"]
    run.close()


def test_lines_a_batch_answered_before_a_kill_are_ledgered_on_resume_even_past_n(tmp_path):
    """Killed after the batch ended but before every reply was ledgered: resume collects the rest from the same
    batch (nothing is sent again) even when the replies already ledgered reach --n, so every paid line is counted."""
    out = tmp_path / "run"
    with FakeTeacher(seed=13) as fake:
        done = run_cli(*generate_args(fake, tmp_path, out, 40), timeout=120)
        assert done.returncode == 0, done.stderr
        ledger = read_jsonl(out / LEDGER)
        ok = [e for e in ledger if e.get("status") == "ok"]
        assert len(ok) >= 3
        # The state a kill leaves: the batch ended, two replies ledgered, their records not yet written.
        keep = [e for e in ledger if e.get("status") != "ok"] + ok[:2]
        (out / LEDGER).write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in keep), encoding="utf-8")
        for name in ("records.jsonl", "rejected.jsonl", "surplus.jsonl"):
            (out / name).write_text("", encoding="utf-8")
        resumed = run_cli(*generate_args(fake, tmp_path, out, 10), timeout=120)
        stats = fake.stats
    assert resumed.returncode == 0, resumed.stderr
    after = read_jsonl(out / LEDGER)
    assert sorted(e["request_id"] for e in finished(after)) == sorted(e["request_id"] for e in ok)
    assert stats["files_uploaded"] == 1 and stats["batches_created"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["usage"]["prompt_tokens"] == stats["prompt_tokens_sent"]
    assert manifest["usage"]["completion_tokens"] == stats["completion_tokens_sent"]


def test_a_batch_created_just_before_a_kill_is_found_not_made_again(tmp_path):
    """Killed after batches.create returned but before its id reached the ledger: resume finds the batch made from the file."""
    with FakeTeacher(seed=14) as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="sk-x", max_retries=0)
        ids = ["q000", "q001"]
        lines = [{"custom_id": rid, "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": "m", "messages": [{"role": "user", "content": f"写 2 个任务 {i}"}]}} for i, rid in enumerate(ids)]
        file_id = client.files.create(file=("in.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode()),
                                      purpose="batch").id
        made = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
        run = RunDir(tmp_path / "run")
        run.prepare()
        run.append(LEDGER, [{"status": "batch-file", "file_id": file_id, "request_ids": ids, "at": 1.0}])
        run.close()
        _, entries = ask_all(tmp_path, fake, 2)
        stats = fake.stats
    assert [e["status"] for e in entries] == ["ok"] * 2
    assert stats["batches_created"] == 1 and stats["batch_lines"] == ids
    assert [n["batch_id"] for n in notes(read_jsonl(tmp_path / "run" / LEDGER), "batch")] == [made.id]


# ---- judge, respond and the quality gate --batch ------------------------------------------


def at_batch_price(manifest: dict, ledger: list[dict], stage: str, online: tuple[float, float]) -> None:
    """The stage's dollars are its ledgered tokens at half the online price."""
    lines = [e for e in ledger if e.get("stage") == stage]
    tokens = sum(e["usage"]["prompt_tokens"] for e in lines), sum(e["usage"]["completion_tokens"] for e in lines)
    assert manifest["stages"][stage]["usd"] == pytest.approx((tokens[0] * online[0] + tokens[1] * online[1]) / 2e6, abs=1e-6)
    assert manifest["stages"][stage]["usd"] > 0


def test_judge_batch_sends_every_verdict_once_in_a_batch_at_the_batch_price(tmp_path):
    from fakes.judge_replies import JudgeReplies
    from test_judge import write_records

    inputs = write_records(tmp_path / "in.jsonl", ["JS5", "JS4", "JS2", "JS1", "JS3", "JS5", "JBAD1 JS4", "JS2"])
    out = tmp_path / "judged"
    with FakeTeacher(reply=JudgeReplies()) as fake:
        args = ("judge", str(inputs), "--out", str(out), "--base-url", fake.base_url, "--model", "fake-judge", "--batch", *PRICE, *FAST)
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        stats = fake.stats
        again = run_cli(*args)
        assert again.returncode == 0, again.stderr
        assert fake.stats["requests_received"] == stats["requests_received"]  # a finished run asks nothing more
    ledger = read_jsonl(out / LEDGER)
    done = finished(ledger)
    manifest = json.loads((out / "manifest.json").read_text())
    kept, rejected = read_jsonl(out / "records.jsonl"), read_jsonl(out / "rejected.jsonl")
    assert sorted(r["meta"]["judge"]["score"] for r in kept) == [4, 4, 5, 5]
    assert sorted(r["meta"]["judge"]["score"] for r in rejected) == [1, 2, 2, 3] and {r["reason"] for r in rejected} == {"low-score"}
    # Each verdict (and the one retry of an unreadable one, in the next batch) was one batch line, sent once.
    assert sorted(stats["batch_lines"]) == sorted(e["request_id"] for e in done) and len(done) == 9
    assert stats["batches_created"] == 2 and len(manifest["batch"]["batches"]) == 2
    assert all(b["status"] == "completed" and b["route"] == "judge" for b in manifest["batch"]["batches"])
    assert manifest["judge"]["batch"] is True and (manifest["judge"]["price_in_per_1m"], manifest["judge"]["price_out_per_1m"]) == (0.5, 1.0)
    at_batch_price(manifest, done, "judge", (1, 2))


def test_respond_batch_answers_every_record_in_one_batch_at_the_batch_price(tmp_path):
    from test_respond import RespondReplies, zh_dataset

    data = zh_dataset(tmp_path / "alpaca.json", n=10)
    out = tmp_path / "run"
    with FakeTeacher(reply=RespondReplies()) as fake:
        result = run_cli("respond", str(data), "--out", str(out), "--base-url", fake.base_url, "--model", "m", "--batch", *PRICE, *FAST)
        stats = fake.stats
    assert result.returncode == 0, result.stderr
    done = finished(read_jsonl(out / LEDGER))
    manifest = json.loads((out / "manifest.json").read_text())
    records = read_jsonl(out / "records.jsonl")
    # 12 inputs less the near-copy and the blacklisted one, refused before paying: one batch of 10 lines, each sent once.
    assert len(records) == 10 and all(r["output"].startswith("m的回答") for r in records)
    assert sorted(stats["batch_lines"]) == sorted(e["request_id"] for e in done) and len(done) == 10
    assert stats["batches_created"] == 1 and manifest["batch"]["batches"][0]["requests"] == 10
    assert (manifest["cost"]["price_in_per_1m"], manifest["cost"]["price_out_per_1m"]) == (0.5, 1.0)
    at_batch_price(manifest, done, "respond", (1, 2))


def test_generate_batch_judge_batches_the_gate_too_and_keeps_every_batch_in_the_manifest(tmp_path):
    from fakes.judge_replies import JudgeReplies

    out = tmp_path / "run"
    with FakeTeacher(reply=JudgeReplies()) as fake:
        args = generate_args(fake, tmp_path, out, 20, "--judge", "--min-score", "3")
        result = run_cli(*args, timeout=120)
        assert result.returncode == 0, result.stderr
        stats = fake.stats
        again = run_cli(*args)
        assert again.returncode == 0 and fake.stats["requests_received"] == stats["requests_received"]
    ledger = read_jsonl(out / LEDGER)
    done = finished(ledger)
    manifest = json.loads((out / "manifest.json").read_text())
    verdicts = [e for e in done if e["stage"] == "judge"]
    assert len(verdicts) == 20 and manifest["judge"]["completed"] and manifest["judge"]["batch"] is True
    # Tasks and verdicts alike were batch lines, each sent once; no request went online.
    assert sorted(stats["batch_lines"]) == sorted(e["request_id"] for e in done)
    assert stats["requests_received"] == len(stats["batch_lines"])
    # The gate's manifest saves kept generate's batches beside its own.
    batches = manifest["batch"]["batches"]
    assert len(batches) == len(notes(ledger, "batch")) == stats["batches_created"]
    assert {b.get("route", "teacher") for b in batches} == {"teacher", "judge"}
    kept = read_jsonl(out / "records.jsonl")
    assert kept and all(r["meta"]["judge"]["score"] >= 3 for r in kept)
    at_batch_price(manifest, done, "generate", (1, 2))
    at_batch_price(manifest, done, "judge", (1, 2))


def test_respond_batch_pairs_and_judge_batch_every_route(tmp_path):
    from test_respond import AnswerAndJudge, zh_dataset

    # JS2 / JS5 in turn: the gate (--judge --min-score 3) keeps every other pair.
    data = zh_dataset(tmp_path / "alpaca.json", n=6, triggers={i: f"JS{(2, 5)[i % 2]}" for i in range(6)})
    out = tmp_path / "run"
    with FakeTeacher(reply=AnswerAndJudge()) as fake:
        args = ("respond", str(data), "--out", str(out), "--base-url", fake.base_url, "--models", "alpha,beta", "--judge", "--min-score", "3",
                "--batch", *PRICE, "--model-spec", "beta:1:2", *FAST)
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        stats = fake.stats
        again = run_cli(*args)
        assert again.returncode == 0 and fake.stats["requests_received"] == stats["requests_received"]
    done = finished(read_jsonl(out / LEDGER))
    manifest = json.loads((out / "manifest.json").read_text())
    # 6 answers by each model, 12 pair verdicts (both orders), 6 gate verdicts: all batch lines, each sent once.
    assert len(done) == 30 and sorted(stats["batch_lines"]) == sorted(e["request_id"] for e in done)
    assert stats["requests_received"] == 30
    assert {b.get("route", "teacher") for b in manifest["batch"]["batches"]} == {"teacher", "beta", "judge"}
    assert {k: (v["price_in_per_1m"], v["price_out_per_1m"]) for k, v in manifest["teachers"].items()} == {
        "teacher": (0.5, 1.0), "beta": (0.5, 1.0), "judge": (0.5, 1.0)}
    records = read_jsonl(out / "records.jsonl")
    assert len(records) == 3 and all(r["meta"]["judge"]["score"] == 5 for r in records)
    for stage in ("respond", "pair-judge", "judge"):
        at_batch_price(manifest, done, stage, (1, 2))


def test_judge_batch_moderate_batches_verdicts_and_moderates_online(tmp_path):
    from fakes.judge_replies import JudgeReplies
    from test_judge import write_records

    inputs = write_records(tmp_path / "in.jsonl", ["JS5", "JS4 暴力", "JS5", "JS1"])
    out = tmp_path / "judged"
    with FakeTeacher(reply=JudgeReplies(), moderation="暴力") as fake:
        result = run_cli("judge", str(inputs), "--out", str(out), "--base-url", fake.base_url, "--model", "j", "--moderate", "--batch",
                         *PRICE, *FAST)
        stats = fake.stats
    assert result.returncode == 0, result.stderr
    # The Batch API has no moderation: the verdicts went as one batch, the three kept by the judge were screened online.
    assert sorted(stats["batch_lines"]) == [f"rate:1:k{i}" for i in range(4)] and stats["moderation_requests"] == 3
    rejected = {r["id"]: r["reason"] for r in read_jsonl(out / "rejected.jsonl")}
    assert rejected == {"k1": "moderation", "k3": "low-score"} and len(read_jsonl(out / "records.jsonl")) == 2
