"""--base-url repeated: a pool of replicas, each request where there is most room, a dead endpoint rested and probed."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from conftest import finished
from fakes.openai_server import FakeTeacher
from selfinstruct.config import resolve
from selfinstruct.errors import ConfigError
from selfinstruct.teacher import PAUSE_FIRST, Endpoint, RequestFailed, Teacher, TeacherPool, TeacherSettings, online_transport
from test_generate import cli, seeds_file

MESSAGES = [{"role": "user", "content": "写 2 个任务"}]


def settings(**kw) -> TeacherSettings:
    return TeacherSettings(**{"model": "m", "concurrency": 8, "adaptive": True, "timeout": 10.0, "retries": 3, "max_tokens": 256, **kw})


def test_three_endpoints_of_different_speeds_one_dies_mid_run(tmp_path):
    """The run completes on the other two; the dead one is rested (not hammered); per-endpoint counts in the manifest."""
    seeds = seeds_file(tmp_path)
    out = tmp_path / "run"
    with FakeTeacher(latency=0.05, seed=11) as fast, FakeTeacher(latency=0.15, seed=12) as dying, \
            FakeTeacher(latency=0.4, seed=13) as slow:
        proc = cli("generate", "--seeds", str(seeds), "--n", "800", "--per-request", "5", "--model", "fake-teacher",
                   "--base-url", fast.base_url, "--base-url", dying.base_url, "--base-url", slow.base_url,
                   "--out", str(out), "--timeout", "10", "--quiet")
        deadline = time.monotonic() + 120
        while dying.stats["responses_ok"] < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before the endpoint could die mid-run"
        dying.stop()  # mid-run: requests in flight there are dropped, the next ones refused
        died_after = dying.stats["requests_received"]
        stdout, stderr = proc.communicate(timeout=180)
        served = {"fast": fast.stats["responses_ok"], "slow": slow.stats["responses_ok"]}
    assert proc.returncode == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"]["kept"] == 800 and manifest["counts"]["failed_requests"] == 0
    by_url = {e["base_url"]: e for e in manifest["endpoints"]}
    assert list(by_url) == [fast.base_url, dying.base_url, slow.base_url]
    dead = by_url[dying.base_url]
    assert 3 <= dead["ok"] <= died_after and dead["pauses"] >= 1 and dead["state"] != "up"
    assert dead["errors"].get("connection", 0) >= 1
    # Rested, then probed one request at a time: a few refused attempts, not one per request of the run.
    assert dead["failed_attempts"] <= 12, dead
    # Each endpoint's own limit: the fast one, with the most room freed most often, answered the most.
    assert by_url[fast.base_url]["ok"] > by_url[slow.base_url]["ok"] > 0
    assert by_url[fast.base_url]["ok"] == served["fast"] and by_url[slow.base_url]["ok"] == served["slow"]
    ledger = finished([json.loads(line) for line in (out / "requests.jsonl").read_text(encoding="utf-8").splitlines()])
    assert sum(e["ok"] for e in by_url.values()) == sum(1 for e in ledger if e["status"] == "ok")
    assert manifest["config"]["replicas"] == [dying.base_url, slow.base_url]


def test_each_request_goes_where_most_room_is():
    """Two endpoints with fixed limits 6 and 2: eight requests at once fill both exactly; the ninth waits for room."""

    async def go(a: str, b: str) -> tuple[list[int], int]:
        pool = TeacherPool(settings(adaptive=False, concurrency=6), (a,), None)
        pool.endpoints.append(type(pool.endpoints[0])(b, Teacher(settings(adaptive=False, concurrency=2, base_url=b, retries=0), None)))
        assert pool.capacity == 8
        try:
            tasks = [asyncio.ensure_future(pool.complete(MESSAGES)) for _ in range(9)]
            await asyncio.sleep(0.1)
            busy = [e.in_flight for e in pool.endpoints]
            await asyncio.gather(*tasks)
            return busy, sum(e.counts["ok"] for e in pool.endpoints)
        finally:
            await pool.aclose()

    with FakeTeacher(latency=0.4, seed=1) as a, FakeTeacher(latency=0.4, seed=2) as b:
        busy, ok = asyncio.run(go(a.base_url, b.base_url))
    assert busy == [6, 2] and ok == 9


def test_a_dead_endpoint_rests_and_a_failure_is_retried_on_another():
    """One endpoint refuses every connection: each request still succeeds on the live one; the dead one is tried rarely."""

    async def go(dead: str, live: str) -> TeacherPool:
        pool = TeacherPool(settings(), (dead, live), None)
        try:
            for _ in range(15):
                done = await pool.complete(MESSAGES)
                assert done.content
            return pool
        finally:
            await pool.aclose()

    with FakeTeacher(latency=0.02, seed=3) as live:
        dead = FakeTeacher(seed=4).start()
        dead_url = dead.base_url
        dead.stop()
        pool = asyncio.run(go(dead_url, live.base_url))
    dead_end, live_end = pool.endpoints
    assert live_end.counts["ok"] == 15 and dead_end.counts["ok"] == 0
    assert dead_end.counts["failed_attempts"] == 1 and dead_end.counts["pauses"] == 1  # rested at once, not probed yet
    assert pool.retries == 1


def test_all_endpoints_down_fails_after_retries_with_every_attempt_counted():
    async def go(urls: tuple[str, ...]) -> RequestFailed:
        pool = TeacherPool(settings(retries=2), urls, None)
        try:
            with pytest.raises(RequestFailed) as failed:
                await pool.complete(MESSAGES)
            return failed.value
        finally:
            await pool.aclose()

    urls = []
    for seed in (5, 6):
        fake = FakeTeacher(seed=seed).start()
        urls.append(fake.base_url)
        fake.stop()
    failed = asyncio.run(go(tuple(urls)))
    assert failed.attempts == 3 and failed.errors == ["connection"] * 3


def test_one_base_url_is_a_plain_teacher_and_several_need_one_model():
    async def kinds() -> tuple[type, type]:
        one = online_transport(settings(base_url="http://127.0.0.1:9/v1"), (), None)
        two = online_transport(settings(base_url="http://127.0.0.1:9/v1"), ("http://127.0.0.1:10/v1",), None)
        await one.aclose()
        await two.aclose()
        return type(one), type(two)

    assert asyncio.run(kinds()) == (Teacher, TeacherPool)
    cfg = resolve({"base_url": ["http://a:8000/v1", "http://b:8000/v1"]}, environ={})
    assert cfg.base_url == "http://a:8000/v1" and cfg.replicas == ("http://b:8000/v1",)
    with pytest.raises(ConfigError, match="user name or password"):
        resolve({"base_url": ["http://a:8000/v1", "http://u:p@b:8000/v1"]}, environ={})
    with pytest.raises(ConfigError, match="--batch goes to one endpoint"):
        resolve({"base_url": ["http://a:8000/v1", "http://b:8000/v1"], "batch": True}, environ={})


def test_failures_of_requests_in_flight_together_rest_the_endpoint_once():
    endpoint = Endpoint("http://127.0.0.1:9/v1", None)
    for _ in range(4):  # four requests in flight when the server went away
        endpoint.failed("connection")
    assert endpoint.counts["pauses"] == 1 and endpoint.counts["failed_attempts"] == 4 and endpoint.rest == 2 * PAUSE_FIRST
    endpoint.failed("http-429")  # asks for less, which the limit gives: no rest
    assert endpoint.counts["pauses"] == 1 and endpoint.errors == {"connection": 4, "http-429": 1}
