"""--concurrency auto: the adaptive limit (slow start, additive increase, multiplicative decrease) and a fixed one that stays fixed."""

from __future__ import annotations

import asyncio
import json
import time
import types

import pytest

from conftest import finished
from fakes.openai_server import FakeTeacher
from selfinstruct.config import resolve
from selfinstruct.engine import Tally
from selfinstruct.errors import ConfigError
from selfinstruct.progress import describe
from selfinstruct.teacher import ConcurrencyLimit, Teacher, TeacherSettings
from test_generate import run_cli, seeds_file


def replies(limit: ConcurrencyLimit, latency: float, kind: str | None = None) -> None:
    """One round: as many requests as the limit allows go out together, then all come back (or fail with `kind`)."""

    async def go() -> None:
        started = time.monotonic()
        count = max(2, limit.current)
        held = 0
        for _ in range(count):
            if limit.in_flight >= limit.current:  # a limit of 1 takes its round one request after another
                limit.release()
                held -= 1
                limit.succeeded(latency, started) if kind is None else limit.failed(kind, started)
            await limit.acquire()
            held += 1
        for _ in range(held):
            limit.succeeded(latency, started) if kind is None else limit.failed(kind, started)
            limit.release()

    asyncio.run(go())


def test_a_fixed_limit_never_moves():
    limit = ConcurrencyLimit(8)
    for kind in (None, "timeout", "http-429", None):
        replies(limit, 1.0, kind)
    replies(limit, 50.0)
    assert limit.current == 8 and limit.timeouts == 8 and limit.overloads == 16


def test_slow_start_doubles_while_latency_holds_up_to_the_ceiling():
    limit = ConcurrencyLimit(64, adaptive=True)
    assert limit.current == 1  # starts low
    seen = [limit.current]
    for _ in range(8):
        replies(limit, 1.0)
        seen.append(limit.current)
    assert seen == [1, 2, 4, 8, 16, 32, 64, 64, 64]


def test_a_timeout_halves_then_growth_is_additive():
    limit = ConcurrencyLimit(64, adaptive=True)
    for _ in range(4):
        replies(limit, 1.0)
    assert limit.current == 16
    replies(limit, 1.0, "timeout")  # a whole round times out: one cut, not one per request
    assert limit.current == 8 and limit.timeouts == 16 and not limit.slow_start
    replies(limit, 1.0)
    replies(limit, 1.0)
    assert limit.current == 10  # +1 a round after the first cut


@pytest.mark.parametrize("kind, cut", [("http-429", True), ("http-503", True), ("http-500", True), ("connection", True),
                                       ("http-400", False), ("malformed", False), ("oversized", False)])
def test_overload_cuts_other_failures_do_not(kind, cut):
    limit = ConcurrencyLimit(64, adaptive=True)
    for _ in range(3):
        replies(limit, 1.0)
    replies(limit, 1.0, kind)
    assert limit.current == (4 if cut else 8)


def test_queueing_latency_cuts_to_what_the_server_works_on():
    """Latency 4x the unloaded: three of every four requests waited in the server, so the limit goes to a quarter."""
    limit = ConcurrencyLimit(64, adaptive=True)
    for _ in range(4):
        replies(limit, 1.0)
    replies(limit, 4.0)
    assert limit.current == 4
    replies(limit, 1.5)  # between hold and cut: neither grows nor cuts
    assert limit.current == 4


def test_no_growth_without_demand():
    """Replies that never filled the limit say nothing about more room."""
    limit = ConcurrencyLimit(64, adaptive=True)
    replies(limit, 1.0)
    replies(limit, 1.0)
    assert limit.current == 4

    async def trickle() -> None:
        for _ in range(20):
            started = time.monotonic()
            await limit.acquire()
            limit.succeeded(1.0, started)
            limit.release()

    asyncio.run(trickle())
    assert limit.current == 4


def test_waiters_get_slots_a_cut_takes_back_only_as_they_free():
    async def go() -> list[int]:
        limit = ConcurrencyLimit(4)
        order: list[int] = []

        async def job(i: int) -> None:
            async with limit:
                order.append(i)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(job(i) for i in range(10)))
        assert limit.in_flight == 0
        return order

    assert sorted(asyncio.run(go())) == list(range(10))


async def _drive(url: str, requests: int, timeout: float) -> tuple[list[int], dict]:
    """Keep as many requests in flight as the teacher takes now, as a stage's window does."""
    teacher = Teacher(TeacherSettings(model="m", base_url=url, concurrency=64, adaptive=True, timeout=timeout, retries=2,
                                      max_tokens=256), "sk-test")
    messages = [{"role": "user", "content": "写 2 个任务"}]
    trace, pending, sent = [], set(), 0
    try:
        while sent < requests or pending:
            while sent < requests and len(pending) < teacher.capacity:
                pending.add(asyncio.ensure_future(teacher.complete(messages)))
                sent += 1
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            trace.append(teacher.capacity)
    finally:
        await teacher.aclose()
    return trace, teacher.concurrency()


def test_one_at_a_time_server_settles_at_one_or_two():
    """A server that works on one request at a time (the rest queue, their latency grows) never holds more than two of ours."""
    with FakeTeacher(latency=0.15, slots=1, seed=1) as fake:
        trace, summary = asyncio.run(_drive(fake.base_url, 24, timeout=10.0))
        held = fake.stats["max_in_flight"]
    assert set(trace) <= {1, 2}, trace
    assert held <= 2 and summary["timeouts"] == 0 and summary["peak"] <= 2


def test_the_progress_line_shows_concurrency_timeouts_and_retries():
    async def line() -> str:
        teacher = Teacher(TeacherSettings(model="m", base_url="http://127.0.0.1:9/v1", concurrency=64, adaptive=True), None)
        teacher._slots.timeouts, teacher._slots.retries = 2, 5
        state = types.SimpleNamespace(tally=Tally(), usd=0.0, started=time.monotonic(), transport=teacher)
        try:
            return describe(state)
        finally:
            await teacher.aclose()

    assert asyncio.run(line()).endswith("| concurrency 1 (auto, ≤64), 2 timeouts, 5 retries")


def test_concurrency_flags_files_and_environment():
    assert resolve({}, environ={}).adaptive_concurrency is True
    assert resolve({}, environ={}).concurrency == 64
    fixed = resolve({"concurrency": "8"}, environ={})
    assert (fixed.concurrency, fixed.adaptive_concurrency) == (8, False)
    auto = resolve({"concurrency": "auto", "max_concurrency": 32}, environ={"SELFINSTRUCT_CONCURRENCY": "4"})
    assert (auto.concurrency, auto.adaptive_concurrency) == (32, True)
    env = resolve({}, environ={"SELFINSTRUCT_CONCURRENCY": "auto", "SELFINSTRUCT_MAX_CONCURRENCY": "12"})
    assert (env.concurrency, env.adaptive_concurrency) == (12, True)
    assert resolve({}, environ={"SELFINSTRUCT_CONCURRENCY": "3"}).adaptive_concurrency is False
    with pytest.raises(ConfigError, match="--max-concurrency 32 goes with --concurrency auto"):
        resolve({"concurrency": "8", "max_concurrency": 32}, environ={})
    with pytest.raises(ConfigError, match="must be int"):
        resolve({"concurrency": "lots"}, environ={})


def test_config_file_takes_auto_and_a_ceiling(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('concurrency = "auto"\nmax-concurrency = 24\n', encoding="utf-8")
    cfg = resolve({}, path, environ={})
    assert (cfg.concurrency, cfg.adaptive_concurrency) == (24, True)
    path.write_text("concurrency = 6\n", encoding="utf-8")
    cfg = resolve({}, path, environ={})
    assert (cfg.concurrency, cfg.adaptive_concurrency) == (6, False)


def test_generate_auto_against_a_one_slot_server_and_fixed_stays_fixed(tmp_path):
    seeds = seeds_file(tmp_path)
    with FakeTeacher(latency=0.15, slots=1, seed=3) as fake:
        out = tmp_path / "auto"
        result = run_cli("generate", "--seeds", str(seeds), "--n", "60", "--per-request", "5", "--base-url", fake.base_url,
                         "--model", "fake-teacher", "--out", str(out), "--timeout", "10", "--quiet")
        assert result.returncode == 0, result.stderr
        assert fake.stats["max_in_flight"] <= 2  # the default is auto: the old fixed 16 queued 16 in this server
        ledger = finished([json.loads(line) for line in (out / "requests.jsonl").read_text(encoding="utf-8").splitlines()])
        assert ledger and not any("timeout" in e.get("errors", []) for e in ledger)
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["config"]["adaptive_concurrency"] is True and manifest["config"]["concurrency"] == 64
        [limit] = manifest["concurrency"]  # where the limit stood when the run ended, its peak, timeouts
        assert limit["adaptive"] and 1 <= limit["concurrency"] <= limit["peak"] <= 2 and limit["timeouts"] == 0
        assert limit["base_url"] == fake.base_url and limit["max"] == 64
    with FakeTeacher(latency=0.2, seed=4) as fake:
        result = run_cli("generate", "--seeds", str(seeds), "--n", "30", "--per-request", "5", "--base-url", fake.base_url,
                         "--model", "fake-teacher", "--out", str(tmp_path / "fixed"), "--concurrency", "3", "--quiet")
        assert result.returncode == 0, result.stderr
        assert fake.stats["max_in_flight"] == 3  # three from the first request on, no ramp
