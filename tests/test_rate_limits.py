"""The rate limiter alone: even spacing for requests, a sliding window for tokens."""

from __future__ import annotations

import asyncio
import time

import openai

try:  # openai 3.x ships on httpx2; older releases on httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

from fakes.openai_server import FakeTeacher
from selfinstruct.teacher import RateLimiter, Teacher, TeacherSettings, retry_after


def test_requests_are_spaced_evenly():
    async def go():
        limiter = RateLimiter(rpm=100, tpm=None, window=1.0)  # 100 per "minute" of 1 s
        starts = []
        for _ in range(30):
            await limiter.acquire(1)
            starts.append(time.monotonic())
        return starts

    starts = asyncio.run(go())
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 0.009
    assert 0.27 <= starts[-1] - starts[0] <= 0.45


def test_tokens_stay_under_the_cap_in_every_window():
    async def go():
        limiter = RateLimiter(rpm=None, tpm=1000, window=0.5)
        log = []
        async def one():
            entry = await limiter.acquire(300)
            log.append((time.monotonic(), 300))
            RateLimiter.settle(entry, 300)
        await asyncio.gather(*(one() for _ in range(10)))
        return log

    log = asyncio.run(go())
    times = [t for t, _ in log]
    for t0 in times:
        in_window = sum(tok for t, tok in log if t0 <= t < t0 + 0.5)
        assert in_window <= 1000
    assert times[-1] - times[0] >= 1.0  # 3000 tokens at 1000 per 0.5 s needs at least two more windows


def _status_error(status: int, headers: dict) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = httpx.Response(status, headers=headers, request=request)
    return openai.APIStatusError("x", response=response, body=None)


def test_retry_after_headers():
    assert retry_after(_status_error(429, {"retry-after": "3"})) == 3.0
    assert retry_after(_status_error(429, {"retry-after-ms": "250"})) == 0.25
    assert retry_after(_status_error(429, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) is None
    assert retry_after(_status_error(500, {})) is None


def test_a_429_is_retried_no_sooner_than_its_retry_after():
    # 2.5 s, not less: unasked, the first backoff is 1-2 s (exponential with jitter), so a Teacher that
    # ignored the header would retry too soon every time. One fake sends Retry-After alone, the other
    # retry-after-ms too (the two headers a 429 may carry); both run at once to keep the test short.
    asked = 2.5

    async def one(fake: FakeTeacher):
        teacher = Teacher(TeacherSettings(model="m", base_url=fake.base_url, timeout=10, retries=2), None)
        try:
            call = asyncio.ensure_future(teacher.complete([{"role": "user", "content": "请设计 2 个任务"}]))
            while not fake.stats["requests_received"]:
                await asyncio.sleep(0.005)
            fake.configure(p_429=0.0)  # only the first attempt is refused; the 429 is already on its way
            return await call
        finally:
            await teacher.aclose()

    async def both(fakes):
        return await asyncio.gather(*(one(f) for f in fakes))

    with FakeTeacher(p_429=1.0, retry_after=asked, p_retry_after_ms=0.0) as plain, \
            FakeTeacher(p_429=1.0, retry_after=asked, p_retry_after_ms=1.0) as with_ms:
        results = asyncio.run(both([plain, with_ms]))
        stats = [plain.stats, with_ms.stats]
    for result, s in zip(results, stats):
        assert result.attempts == 2 and result.errors == ["http-429"] and result.content
        assert s["by_status"] == {"429": 1, "200": 1}
        first, retry = s["arrivals"]
        assert asked <= retry - first < asked + 1.5, retry - first


def test_tokens_are_paced_not_spent_in_one_burst():
    async def go():
        limiter = RateLimiter(rpm=None, tpm=1200, window=1.0)  # 1,200 tokens per "minute" of 1 s
        starts = []
        for _ in range(24):
            entry = await limiter.acquire(100)
            starts.append(time.monotonic())
            RateLimiter.settle(entry, 50)  # each used half its reservation: the other half comes back
        return starts

    starts = asyncio.run(go())
    # A burst of a twelfth of the window's allowance, then one request per 50 real tokens at 1,200/s.
    assert sum(1 for t in starts if t - starts[0] < 0.15) <= 7  # unpaced, all 24 went at once
    assert 0.4 <= starts[-1] - starts[0] <= 1.2
