"""The limit stores (the SQLite database file, a real PostgreSQL server, a real redis-server) under several processes
at once: check-and-count is atomic, so a limit of 120 admits exactly 120 however many processes race for it, and
leases never exceed the concurrency limit."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from maas.access.limits import Charge, LimitStore, open_limit_store
from maas.access.principal import KeyLimits
from maas.registry.sql.engine import Database
from tests import redis_fixture

redis_url = redis_fixture.redis_url

PROCESSES = 4


def _open(where: str) -> LimitStore:
    if where.startswith("redis://"):
        return open_limit_store(None, where)  # type: ignore[arg-type]
    return open_limit_store(Database(where), None)


def _race(where: str, key_id: str, limits: KeyLimits, attempts: int, lease: bool, start: float) -> list[str]:
    """In a child process: ``attempts`` admissions as fast as they go; the leases taken (or ``ok`` per admission)."""
    store = _open(where)
    while time.time() < start:
        time.sleep(0.001)
    taken = []
    for i in range(attempts):
        name = f"{multiprocessing.current_process().pid}-{i}" if lease else None
        if store.admit(key_id, limits, name, time.time()).admitted:
            taken.append(name or "ok")
    store.close()
    return taken


def _run(where: str, key_id: str, limits: KeyLimits, attempts: int, lease: bool = False) -> list[str]:
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 3.0  # every child imported and connected before the race starts
    with ctx.Pool(PROCESSES) as pool:
        jobs = [pool.apply_async(_race, (where, key_id, limits, attempts, lease, start)) for _ in range(PROCESSES)]
        return [x for job in jobs for x in job.get(timeout=120)]


@pytest.fixture(params=["sql", pytest.param("postgresql", marks=pytest.mark.postgres), "redis"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param in ("redis", "postgresql"):
        url: str = request.getfixturevalue("redis_url" if request.param == "redis" else "postgres_url")
        return url
    db = Database(f"sqlite:///{tmp_path / 'limits.db'}")  # made (and migrated) once, here
    return db.url


@pytest.mark.slow
def test_processes_racing_admit_exactly_the_limit(where: str) -> None:
    taken = _run(where, "race", KeyLimits(rpm=120, requests_per_day=1000), attempts=80)
    assert len(taken) == 120  # 320 attempts within a few seconds: exactly the limit, never more
    store = _open(where)
    counts = store.admit("race", KeyLimits(rpm=120, requests_per_day=1000), None, time.time())
    assert not counts.admitted and counts.day_requests == 120
    assert sum(counts.minute_requests.values()) == 120
    store.close()


@pytest.mark.slow
def test_processes_racing_hold_at_most_the_concurrency_limit(where: str) -> None:
    limits = KeyLimits(concurrent=3, tokens_per_month=10**6)
    held = _run(where, "conc", limits, attempts=30, lease=True)
    assert len(held) == 3
    store = _open(where)
    store.settle([Charge("conc", 5, time.time(), minute=False, month=True)], [("conc", lease) for lease in held])
    counts = store.admit("conc", limits, "again", time.time())
    assert counts.admitted and counts.leases == 0 and counts.month_tokens == 5
    store.close()
