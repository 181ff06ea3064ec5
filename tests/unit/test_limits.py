"""Rate limits and quotas: the sliding window never lets more than the limit into any 60 seconds, refusals name when
to retry, the SQL store counts atomically, and a process remembers a refusal instead of asking again."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from maas.access.limits import (
    WINDOW_S,
    Charge,
    Counts,
    LimitReached,
    duration,
    next_day,
    next_month,
    passes,
    refusal,
    window_start,
)
from maas.access.limits_sql import SqlLimitStore
from maas.access.principal import KeyLimits, Principal, Role
from maas.registry.sql.engine import Database
from maas.serving.access.context import RequestMeter
from maas.serving.access.limiter import Limiter

pytestmark = pytest.mark.each_database  # every test that opens a database: on SQLite and on PostgreSQL

T0 = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def db(database_url: str) -> Database:
    return Database(database_url)


def test_durations_read_as_openai_writes_them() -> None:
    assert [duration(s) for s in (0, 0.25, 1, 59.5, 60, 360, 3723.5)] == [
        "0s",
        "250ms",
        "1s",
        "59.5s",
        "1m0s",
        "6m0s",
        "1h2m3.5s",
    ]


def test_calendar_windows_end_at_utc_midnight_and_month_end() -> None:
    assert next_day(T0) == datetime(2026, 12, 3, tzinfo=UTC).timestamp()
    assert next_month(T0) == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert (
        next_month(datetime(2027, 2, 28, 23, 59, tzinfo=UTC).timestamp())
        == datetime(2027, 3, 1, tzinfo=UTC).timestamp()
    )


def _window(buckets: dict[int, int], at: float) -> dict[int, int]:
    return {b: c for b, c in buckets.items() if b >= window_start(at)}


def test_no_60_second_interval_admits_more_than_the_limit() -> None:
    """Random bursts over five minutes, admitted by the rule the stores apply: every 60 s interval (at any offset)
    holds at most the limit, and a request is refused only when the 61 s before it hold the limit already."""
    rng = random.Random(7)
    limits = KeyLimits(rpm=20)
    buckets: dict[int, int] = {}
    admitted: list[float] = []
    refused: list[float] = []
    at = T0 + 0.37
    while at < T0 + 300:
        at += rng.expovariate(2.0) if rng.random() < 0.9 else rng.uniform(5, 40)
        if passes(limits, Counts(minute_requests=_window(buckets, at))):
            buckets[int(at)] = buckets.get(int(at), 0) + 1
            admitted.append(at)
        else:
            refused.append(at)
    for start in admitted:
        assert sum(1 for a in admitted if start <= a < start + WINDOW_S) <= 20
    assert refused
    for r in refused:
        assert sum(1 for a in admitted if r - WINDOW_S - 1 < a <= r) >= 20


def test_refusal_names_when_a_slot_frees() -> None:
    limits = KeyLimits(rpm=3)
    counts = Counts(minute_requests={int(T0) - 50: 2, int(T0) - 10: 1})
    exc = refusal(limits, counts, T0 + 0.5)
    assert isinstance(exc, LimitReached) and exc.limit == "rpm"
    # The two oldest leave the window 61 s after their second: 11 s after T0 (T0 + 0.5 -> 10.5 s, rounded up).
    assert exc.headers["Retry-After"] == "11"
    assert exc.headers["x-ratelimit-limit-requests"] == "3"
    assert exc.headers["x-ratelimit-remaining-requests"] == "0"
    assert exc.headers["x-ratelimit-reset-requests"] == "50.5s"
    assert "3 requests per minute" in str(exc)
    assert refusal(limits, counts, T0 + 10.99) is not None
    assert refusal(limits, counts, T0 + 11.0) is None


def test_a_spent_day_quota_waits_for_utc_midnight() -> None:
    exc = refusal(KeyLimits(requests_per_day=5), Counts(day_requests=5), T0)
    assert exc is not None and exc.limit == "requests_per_day"
    assert int(exc.headers["Retry-After"]) == 14 * 3600
    assert exc.headers["x-ratelimit-reset-requests"] == "14h0m0s"
    assert "5 requests per UTC day" in str(exc)


def test_sql_store_counts_and_refuses_atomically(db: Database) -> None:
    store = SqlLimitStore(db)
    limits = KeyLimits(rpm=5, requests_per_day=7)
    results = [store.admit("k1", limits, None, T0 + i * 0.1).admitted for i in range(8)]
    assert results == [True] * 5 + [False] * 3
    assert store.admit("k2", limits, None, T0).admitted  # another key: its own counters
    # A minute on, the rpm window is free again but the day holds 5 of 7.
    later = [store.admit("k1", limits, None, T0 + 62 + i * 0.1).admitted for i in range(4)]
    assert later == [True, True, False, False]
    counts = store.admit("k1", limits, None, T0 + 62)
    assert counts.day_requests == 7 and refusal(limits, counts, T0 + 62).limit == "requests_per_day"  # type: ignore[union-attr]


def test_sql_store_tokens_and_leases(db: Database) -> None:
    store = SqlLimitStore(db)
    limits = KeyLimits(tpm=100, tokens_per_month=150, concurrent=2)
    assert store.admit("k", limits, "a", T0).admitted
    assert store.admit("k", limits, "b", T0).admitted
    third = store.admit("k", limits, "c", T0)
    assert not third.admitted and third.leases == 2
    store.settle([Charge("k", 120, T0 + 1, minute=True, month=True)], [("k", "a")])
    counts = store.admit("k", limits, "d", T0 + 1)  # a slot is free, but the minute's tokens are spent
    assert not counts.admitted and sum(counts.minute_tokens.values()) == 120 and counts.leases == 1
    counts = store.admit("k", limits, "d", T0 + 70)  # the minute passed; the month still has 120 of 150
    assert counts.admitted and counts.month_tokens == 120
    store.settle([Charge("k", 40, T0 + 71, minute=True, month=True)], [("k", "b"), ("k", "d")])
    assert refusal(limits, store.admit("k", limits, "e", T0 + 200), T0 + 200).limit == "tokens_per_month"  # type: ignore[union-attr]


def test_leases_of_a_crashed_process_expire(db: Database) -> None:
    store = SqlLimitStore(db)
    limits = KeyLimits(concurrent=1)
    assert store.admit("k", limits, "held", T0).admitted
    assert not store.admit("k", limits, "x", T0 + 60).admitted
    store.renew([("k", "held")], T0 + 60)
    assert not store.admit("k", limits, "x", T0 + 170).admitted  # renewed at +60: lives to +180
    assert store.admit("k", limits, "x", T0 + 181).admitted
    store.sweep(T0 + 10**6)
    assert store.admit("k", limits, "y", T0 + 10**6).leases == 0


class CountingStore(SqlLimitStore):
    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.admits = 0

    def admit(self, key_id: str, limits: KeyLimits, lease: str | None, at: float) -> Counts:
        self.admits += 1
        return super().admit(key_id, limits, lease, at)

    def settle(self, charges: Sequence[Charge], releases: Sequence[tuple[str, str]]) -> None:
        super().settle(charges, releases)


def _key(**limits: int) -> Principal:
    return Principal("abc123abc123", "app", Role.CONSUMER, ("*",), KeyLimits(**limits))


def test_a_refused_key_is_refused_again_without_asking_the_store(db: Database) -> None:
    store = CountingStore(db)
    limiter = Limiter(store)
    key = _key(rpm=2)

    async def run() -> list[int]:
        statuses = []
        for _ in range(10):
            try:
                admission = await limiter.admit(key)
                statuses.append(200)
                assert dict(admission.headers)[b"x-ratelimit-limit-requests"] == b"2"
            except LimitReached as exc:
                statuses.append(429)
                assert int(exc.headers["Retry-After"]) >= 1
        return statuses

    try:
        assert asyncio.run(run()) == [200, 200] + [429] * 8
        assert store.admits == 3  # two admitted, one refused; the other seven refused from memory
    finally:
        limiter.close()


def test_a_lease_is_given_back_at_the_end_and_tokens_charged(db: Database) -> None:
    store = CountingStore(db)
    limiter = Limiter(store)
    key = _key(concurrent=1, tpm=1000)

    async def run() -> None:
        first = await limiter.admit(key)
        with pytest.raises(LimitReached, match="1 requests in flight"):
            await limiter.admit(key)
        await limiter.release(first)  # as the gate does before the last byte of a response
        second = await limiter.admit(key)
        limiter.finish(first, RequestMeter(prompt_tokens=3, completion_tokens=4))
        limiter.finish(second, RequestMeter(prompt_tokens=10))
        assert not limiter.held

    try:
        asyncio.run(run())
    finally:
        limiter.close()
    counts = store.admit("abc123abc123", KeyLimits(concurrent=1, tpm=1000), None, time.time())
    assert counts.leases == 0 and sum(counts.minute_tokens.values()) == 17
