"""Usage metering in one process: the recorder adds requests up per key, model, version and minute, a failed flush
loses nothing, rows are added to (never overwritten) by several writers, and totals group by minute, hour and day.
Per-key Prometheus counters stay within a bounded number of label sets."""

from __future__ import annotations

import asyncio
import random
import threading
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from maas.access.principal import LOCAL, KeyLimits, Principal, Role
from maas.access.times import parse_since
from maas.access.usage import Counters, UsageKey, UsageStore
from maas.errors import InvalidInput
from maas.registry import Registry
from maas.registry.sql.engine import Database
from maas.serving.access.context import RequestMeter
from maas.serving.access.control import AccessControl
from maas.serving.access.recorder import UsageRecorder
from maas.serving.metrics import KeyMetrics

pytestmark = pytest.mark.each_database  # every test that opens a database: on SQLite and on PostgreSQL

AT = datetime(2026, 12, 2, 10, 15, 30, tzinfo=UTC)


@pytest.fixture
def db(database_url: str) -> Database:
    return Database(database_url)


def test_rows_are_added_to_and_grouped_by_hour_and_day(db: Database) -> None:
    store = UsageStore(db)
    minute = AT.replace(second=0)
    store.add({("k1", "m", 1, minute): Counters(2, 1, 5, 10, 20, 0.5)})
    store.add({("k1", "m", 1, minute): Counters(1, 0, 1, 1, 2, 0.25)})  # another process, same minute
    store.add({("k1", "m", 1, minute + timedelta(minutes=50)): Counters(requests=4)})  # 11:05, the next hour
    store.add({("k2", "m", 1, minute): Counters(requests=7), ("k1", "m", 2, minute): Counters(requests=1)})
    by_minute = store.query(key_id="k1", model="m", by="minute")
    assert [(t.version, t.period, t.requests) for t in by_minute] == [
        (1, minute, 3),
        (2, minute, 1),
        (1, minute + timedelta(minutes=50), 4),
    ]
    first = by_minute[0]
    assert (first.errors, first.items, first.prompt_tokens, first.completion_tokens) == (1, 6, 11, 22)
    assert first.compute_s == pytest.approx(0.75) and first.to_dict()["tokens"] == 33
    by_hour = store.query(key_id="k1", by="hour")
    assert [(t.period.hour if t.period else None, t.version, t.requests) for t in by_hour] == [
        (10, 1, 3),
        (10, 2, 1),
        (11, 1, 4),
    ]
    by_day = store.query(by="day")
    assert {(t.key_id, t.version): t.requests for t in by_day} == {("k1", 1): 7, ("k1", 2): 1, ("k2", 1): 7}
    assert by_day[0].period == AT.replace(hour=0, minute=0, second=0)
    total = store.query(by="total", since=minute + timedelta(minutes=1))
    assert [(t.key_id, t.requests, t.period) for t in total] == [("k1", 4, None)]
    assert store.prune(minute + timedelta(minutes=1)) == 3  # rows, not requests
    assert sum(t.requests for t in store.query(by="total")) == 4


def test_writers_adding_to_the_same_rows_at_once_keep_every_count(database_url: str) -> None:
    """Servers flush their minutes into shared rows, each in its own order: every count arrives, none waits forever."""
    rows = [("k", f"m{i}", 1, AT.replace(second=0)) for i in range(40)]
    errors: list[BaseException] = []

    def flush(seed: int) -> None:
        store, rng = UsageStore(Database(database_url)), random.Random(seed)
        try:
            for _ in range(10):
                order = rng.sample(rows, len(rows))
                store.add({key: Counters(requests=1) for key in order})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=flush, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    totals = UsageStore(Database(database_url)).query(by="total")
    assert len(totals) == 40 and {t.requests for t in totals} == {40}


def test_since_takes_durations_and_iso_times() -> None:
    now = datetime(2026, 12, 2, tzinfo=UTC)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("2026-11-30") == datetime(2026, 11, 30, tzinfo=UTC)
    with pytest.raises(InvalidInput, match="12h, 7d"):
        parse_since("yesterday")
    with pytest.raises(InvalidInput, match="minute, hour, day"):
        UsageStore.query(UsageStore(None), by="week")  # type: ignore[arg-type]


class FlakyStore(UsageStore):
    def __init__(self, db: Database, failures: int) -> None:
        super().__init__(db)
        self.failures = failures

    def add(self, usage: dict[UsageKey, Counters]) -> None:  # type: ignore[override]
        if self.failures:
            self.failures -= 1
            raise OSError("database unreachable")
        super().add(usage)


def test_a_failed_flush_keeps_every_request_for_the_next(db: Database) -> None:
    recorder = UsageRecorder(FlakyStore(db, failures=2))
    for i in range(5):
        recorder.record("k1", RequestMeter(model="m", version=1, items=2, prompt_tokens=i, error=i == 0), AT)
    recorder.record(None, RequestMeter(), AT)  # auth off, no model
    for _ in range(2):
        with pytest.raises(OSError):
            recorder.flush()
        recorder.record("k1", RequestMeter(model="m", version=1, items=2), AT)
    assert recorder.pending == 8
    recorder.flush()
    assert recorder.pending == 0
    totals = {(t.key_id, t.model, t.version): t for t in recorder.store.query(by="total")}
    assert set(totals) == {("k1", "m", 1), ("-", "-", 0)}
    assert (totals["k1", "m", 1].requests, totals["k1", "m", 1].errors, totals["k1", "m", 1].items) == (7, 1, 14)
    assert totals["k1", "m", 1].prompt_tokens == 10 and totals["-", "-", 0].requests == 1


def test_key_metrics_fold_label_sets_past_the_cap() -> None:
    registry = CollectorRegistry()
    metrics = KeyMetrics(registry)
    metrics.MAX_SERIES = 3
    for i in range(5):
        metrics.observe(f"key{i}", "m", error=i == 4, prompt_tokens=2, completion_tokens=1)
    metrics.refused("key0", "rpm")
    text = generate_latest(registry).decode()
    assert 'maas_key_requests_total{key="key2",model="m"} 1.0' in text
    assert 'maas_key_requests_total{key="other",model="other"} 2.0' in text
    assert 'maas_key_errors_total{key="other",model="other"} 1.0' in text
    assert 'maas_key_tokens_total{key="key0",kind="prompt",model="m"} 2.0' in text
    assert 'maas_key_rate_limited_total{key="key0",limit="rpm"} 1.0' in text
    assert "key3" not in text


class NoStore:
    def admit(self, *args: object) -> None:
        raise AssertionError("a key without limits must not reach the limit store")

    def close(self) -> None:
        pass


def test_keys_without_limits_cost_no_round_trip_and_usage_is_written_at_stop(database_url: str) -> None:
    control = AccessControl(Registry(), mode="disabled", host="127.0.0.1", allow_unauthenticated=False)
    control.limiter.store = NoStore()  # type: ignore[assignment]
    free = Principal("abc123abc123", "app", Role.CONSUMER, ("*",), KeyLimits())

    async def run() -> None:
        await control.start()
        for principal in (LOCAL, free, free):
            admission = await control.admit(principal)
            assert admission.headers == [] and admission.lease is None
            control.finish(principal, admission, RequestMeter(model="m", version=3, items=1))
        await control.stop()

    asyncio.run(run())
    totals = {(t.key_id, t.requests) for t in control.usage.store.query(by="total")}
    assert totals == {("-", 1), ("abc123abc123", 2)}
