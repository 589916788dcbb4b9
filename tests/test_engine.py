"""The engine under stress: a stop that means stop, one writer per run directory, and nothing sent goes uncounted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from selfinstruct.dirlock import LOCK_FILE, DirectoryLock

from conftest import finished
from fakes.openai_server import FakeTeacher
from fakes.stalling_server import StallingTeacher
from test_generate import cli, read_jsonl, run_cli, seeds_file


def generate_args(tmp_path: Path, url: str, out: Path, *extra: str) -> tuple[str, ...]:
    return ("generate", "--seeds", str(seeds_file(tmp_path)), "--n", "50", "--base-url", url, "--model", "m",
            "--out", str(out), "--price-in", "1", "--price-out", "2", *extra)


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.02)
    assert predicate(), "timed out waiting"


def ledger_of(out: Path) -> list[dict]:
    path = out / "requests.jsonl"
    return read_jsonl(path) if path.exists() else []


def test_a_signal_stops_a_hanging_teacher_within_grace_and_ledgers_what_it_cancelled(tmp_path):
    out = tmp_path / "run"
    with StallingTeacher("hang") as server:
        # Before: each hanging request kept all its retries (7 x 120 s) and the process ran 700+ s.
        proc = cli(*generate_args(tmp_path, server.base_url, out, "--concurrency", "4", "--grace", "2"))
        wait_until(lambda: server.requests >= 4)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    assert proc.returncode == 143, err
    assert took < 2 + 2, f"exited {took:.1f} s after SIGTERM with --grace 2"
    assert "stopping: waiting up to 2 s for 4 requests (Ctrl-C again to quit now)" in err
    assert "Resume with: selfinstruct generate" in err and "Traceback" not in err
    ledger = ledger_of(out)
    dispatched = {e["dispatch"] for e in ledger if e["status"] == "dispatched"}
    cancelled = [e for e in ledger if e["status"] == "cancelled"]
    assert len(dispatched) == 4 and {e["dispatch"] for e in cancelled} == dispatched and not finished(ledger)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == "terminated" and manifest["stop_reason"] == "terminated"
    billed = manifest["cost"]["possibly_billed"]
    assert billed["requests"] == 4 and billed["estimated"] and billed["usd"] > 0


def test_a_second_signal_exits_at_once_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    with StallingTeacher("hang") as server:
        proc = cli(*generate_args(tmp_path, server.base_url, out, "--concurrency", "3", "--grace", "60"))
        wait_until(lambda: server.requests >= 3)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert took < 2, f"the second Ctrl-C took {took:.1f} s (the first one's --grace is 60 s)"
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == "interrupted" and manifest["cost"]["possibly_billed"]["requests"] == 3
    # The same command against a teacher that answers resumes and finishes the run.
    with FakeTeacher(latency=0.01, seed=4) as fake:
        done = run_cli(*generate_args(tmp_path, fake.base_url, out, "--quiet"))
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["status"] == "completed" and manifest["counts"]["kept"] == 50 == len(read_jsonl(out / "records.jsonl"))
    # The three cancelled requests stay counted as possibly billed; none of them is a failure.
    assert manifest["cost"]["possibly_billed"]["requests"] == 3 and manifest["counts"]["failed_requests"] == 0
    # ...and they were asked again first, with the same ids (so the same seeds and prompt).
    ledger = ledger_of(out)
    cancelled = {e["request_id"] for e in ledger if e["status"] == "cancelled"}
    assert len(cancelled) == 3 and cancelled <= {e["request_id"] for e in finished(ledger)}
    assert {e["request_id"] for e in finished(ledger)[:3]} == cancelled


def test_timeout_is_a_deadline_for_the_whole_reply(tmp_path):
    out = tmp_path / "run"
    with StallingTeacher("trickle") as server:
        # Before: a reply trickling a byte a second held the request 829 s with --timeout 5 --retries 0.
        started = time.monotonic()
        done = run_cli(*generate_args(tmp_path, server.base_url, out, "--concurrency", "1", "--timeout", "2", "--retries", "0",
                                      "--max-requests", "1", "--quiet"), timeout=60)
        took = time.monotonic() - started
    assert done.returncode == 3 and "--max-requests cap" in done.stderr, done.stderr
    assert took < 15, f"a 2 s --timeout took {took:.1f} s"
    [entry] = finished(ledger_of(out))
    assert entry["status"] == "failed" and entry["errors"] == ["timeout"] and "--timeout 2" in entry["error"]


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    with StallingTeacher("hang") as server:
        first = cli(*generate_args(tmp_path, server.base_url, out, "--concurrency", "2"))
        wait_until(lambda: server.requests >= 2)
        second = run_cli(*generate_args(tmp_path, server.base_url, out, "--concurrency", "2"), timeout=30)
        assert second.returncode == 2, second.stderr
        assert f"in use by another selfinstruct process (PID {first.pid}, started " in second.stderr
        assert "selfinstruct generate" in second.stderr and "Traceback" not in second.stderr
        # The refused process wrote nothing: the ledger holds only the first one's two requests.
        assert len({e["dispatch"] for e in ledger_of(out)}) == 2
        first.send_signal(signal.SIGKILL)
        first.communicate()
    with FakeTeacher(latency=0.01, seed=5) as fake:
        third = run_cli(*generate_args(tmp_path, fake.base_url, out, "--quiet"))
    assert third.returncode == 0, third.stderr
    records = read_jsonl(out / "records.jsonl")
    assert len(records) == 50 and len({r["id"] for r in records}) == 50
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    # The killed process's two hanging requests were sent and never answered: counted, not lost.
    assert manifest["cost"]["possibly_billed"]["requests"] == 2


def test_two_processes_started_together_never_both_write(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(latency=0.5, seed=6) as fake:
        args = generate_args(tmp_path, fake.base_url, out, "--quiet", "--concurrency", "2")
        procs = [cli(*args), cli(*args)]
        results = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    # Overlapping, the second is refused; on a loaded machine one may start only after the other ended,
    # and then it finds the run complete. Never do both write at once (before: 1,000 lines for --n 500).
    assert codes in ([0, 2], [0, 0]), results
    if codes == [0, 2]:
        assert any("in use by another selfinstruct process" in err for _, err in results)
    records = read_jsonl(out / "records.jsonl")
    ledger = finished(ledger_of(out))
    assert len(records) == 50 and len({r["id"] for r in records}) == 50
    assert len({e["request_id"] for e in ledger}) == len(ledger)


def test_records_without_a_manifest_are_refused_with_how_to_recover(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(latency=0.01, seed=7) as fake:
        assert run_cli(*generate_args(tmp_path, fake.base_url, out, "--quiet")).returncode == 0
        (out / "manifest.json").unlink()
        before = (out / "records.jsonl").read_bytes()
        sent = fake.stats["requests_received"]
        again = run_cli(*generate_args(tmp_path, fake.base_url, out, "--quiet", "--model", "other-model"))
        # Before: the other model's records were mixed into the run under a new manifest.
        assert fake.stats["requests_received"] == sent
    assert again.returncode == 2
    assert "no manifest.json" in again.stderr and "restore manifest.json" in again.stderr and "selfinstruct filter" in again.stderr
    assert (out / "records.jsonl").read_bytes() == before and not (out / "manifest.json").exists()


def test_a_stop_does_not_start_retries(tmp_path):
    out = tmp_path / "run"
    # Every request gets a 429 asking for a 30 s wait: without the stop, the run would sleep through it.
    with FakeTeacher(latency=0.01, p_429=1.0, retry_after=30, p_retry_after_ms=0.0) as fake:
        proc = cli(*generate_args(tmp_path, fake.base_url, out, "--concurrency", "2", "--grace", "20"))
        wait_until(lambda: fake.stats["requests_received"] >= 2)
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
        received = fake.stats["requests_received"]
    assert proc.returncode == 130, err
    assert took < 3, f"requests waiting to retry held the stop {took:.1f} s"
    assert received == 2, "no retry may start once the stop is asked"
    cancelled = [e for e in ledger_of(out) if e["status"] == "cancelled"]
    assert len(cancelled) == 2 and all(e["wasted"]["prompt_tokens"] == 0 for e in cancelled)


def test_valid_records_past_n_are_held_back_and_a_larger_n_uses_them_without_paying(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(latency=0.2, seed=8) as fake:
        first = run_cli(*generate_args(tmp_path, fake.base_url, out, "--quiet", "--concurrency", "64"))
        sent = fake.stats["requests_received"]
        records = read_jsonl(out / "records.jsonl")
        reserve = read_jsonl(out / "surplus.jsonl")
        rejected = read_jsonl(out / "rejected.jsonl")
        # Before: --n 100 at concurrency 64 sent 19-20 requests (a first wave sized for a 50% yield) where ~11 suffice.
        assert first.returncode == 0 and len(records) == 50, first.stderr
        assert sent <= 8, f"{sent} requests for 50 records of 10-task replies"
        assert reserve and not [r for r in rejected if r["reason"] == "surplus"]
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["surplus"]["records"] == len(reserve)
        # A larger --n takes the held-back records first: nothing is paid for twice.
        more = 50 + min(len(reserve), 20)
        args = list(generate_args(tmp_path, fake.base_url, out, "--quiet"))
        args[args.index("--n") + 1] = str(more)
        again = run_cli(*args)
        assert again.returncode == 0, again.stderr
        assert fake.stats["requests_received"] == sent
    records = read_jsonl(out / "records.jsonl")
    assert len(records) == more and len({r["id"] for r in records}) == more
    assert {r["id"] for r in records[50:]} == {r["id"] for r in reserve[: more - 50]}
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"]["kept"] == more and manifest["surplus"]["records"] == len(reserve) - (more - 50)


def test_filter_and_export_refuse_an_output_folder_another_process_writes(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"解释第{i}个问题的答案为什么成立", "input": "", "output": "因为它符合定义。"},
                                       ensure_ascii=False) + "\n" for i in range(20)), encoding="utf-8")
    out, to = tmp_path / "clean", tmp_path / "export"
    for folder, args in ((out, ("filter", str(data), "--out", str(out), "--quiet")), (to, ("export", str(out), "--to", str(to)))):
        with DirectoryLock(folder, "selfinstruct test-holder", beside=True):
            refused = run_cli(*args)
            assert refused.returncode == 2, refused.stderr
            assert f"in use by another selfinstruct process (PID {os.getpid()}" in refused.stderr and "test-holder" in refused.stderr
        done = run_cli(*args)
        assert done.returncode == 0, done.stderr
        # The lock sits beside a dataset folder, never inside it: the folder is uploaded as it is.
        assert not any(p.name.endswith(LOCK_FILE) for p in folder.rglob("*"))


def test_seeds_inside_the_run_directory_are_refused(tmp_path):
    out = tmp_path / "run"
    with FakeTeacher(latency=0.01, seed=9) as fake:
        assert run_cli(*generate_args(tmp_path, fake.base_url, out, "--quiet")).returncode == 0
        before = {p.name: p.stat().st_size for p in out.iterdir()}
        args = list(generate_args(tmp_path, fake.base_url, out, "--quiet"))
        args[args.index("--seeds") + 1] = str(out / "records.jsonl")
        sent = fake.stats["requests_received"]
        again = run_cli(*args)
        assert fake.stats["requests_received"] == sent
    # Before: the run appended to the seed file it was reading.
    assert again.returncode == 2 and "is inside --out" in again.stderr, again.stderr
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before


def test_the_lock_file_goes_with_its_holder_and_a_stale_one_is_taken_over(tmp_path):
    folder = tmp_path / "data"
    with DirectoryLock(folder, "first", beside=True):
        assert (tmp_path / f".data{LOCK_FILE}").exists()
    # Released: nothing left beside the folder (filter --out must not leave files next to its output).
    assert not list(tmp_path.iterdir())
    # A holder killed with -9 leaves its file; the kernel dropped its lock, so the next one takes it.
    (tmp_path / f".data{LOCK_FILE}").write_text('{"pid": 1, "started": "then", "command": "dead"}\n', encoding="utf-8")
    with DirectoryLock(folder, "second", beside=True) as lock:
        assert json.loads(lock.path.read_text(encoding="utf-8"))["command"] == "second"
    assert not list(tmp_path.iterdir())


class _OneReplyTeacher:
    """A transport answering after a delay with a fixed usage (a fake, in process)."""

    json_mode_error = None

    def __init__(self, delay: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.delay, self.tokens, self.sent = delay, (prompt_tokens, completion_tokens), 0

    async def complete(self, messages, json_mode=False, max_tokens=None, text_messages=None, may_retry_billed=None, request_id=None):
        from selfinstruct.teacher import Completion, Usage

        self.sent += 1
        await asyncio.sleep(self.delay)
        return Completion("ok", "stop", Usage(*self.tokens), None, 1, self.delay)

    def stop_retrying(self) -> None:
        pass


class _TargetStage:
    """Wants `target` answers; starts `jobs` requests at once."""

    name = "t"
    ledger_stages = ("t",)
    window = 8

    def __init__(self, engine, jobs: int, target: int) -> None:
        self.engine, self.jobs, self.target, self.answers = engine, jobs, target, 0

    def next_job(self, running):
        if self.jobs == 0:
            return None
        self.jobs -= 1
        no = self.jobs

        async def job():
            # The second request starts a moment later, so it waits on the budget while the first is in flight.
            await asyncio.sleep(0.05 * (no == 0))
            await self.engine.ask("t", f"t:{no}", [{"role": "user", "content": "x"}], max_tokens=1000)
            self.answers += 1
        return job

    def wanted(self):
        return self.answers < self.target

    def finish(self):
        pass

    def low_yield(self, useful, window):
        return None

    def progress(self):
        return "t", self.answers, self.target

    def counts(self):
        import collections

        return self.answers, collections.Counter()

    def describe(self, manifest):
        pass


def test_a_request_waiting_on_the_budget_is_dropped_when_the_target_is_met_meanwhile(tmp_path):
    from selfinstruct.engine import Engine
    from selfinstruct.pricing import Price
    from selfinstruct.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.prepare()
    # $1 per 1K completion tokens: each request's worst case is $1, the budget $1.5; the one that lands costs $0.6.
    price = Price(0.0, 1000.0, "test")
    engine = Engine(run, _OneReplyTeacher(0.3, 10, 600), model="m", base_url=None, price=price, command="test", max_cost=1.5)
    stage = _TargetStage(engine, jobs=2, target=1)
    # Before: the waiting request stopped the run as over budget though the target was met (exit 3 on a done run).
    asyncio.run(engine.run_stage(stage))
    assert engine.status == "completed" and stage.answers == 1 and engine.transport.sent == 1
