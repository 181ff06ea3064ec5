"""The audit log: appended in the mutation's transaction, hash-chained, and every tampering named by verify."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from maas.registry import Registry
from maas.registry.audit import GENESIS, AuditContext, AuditLog, audit_context, current_audit_context, record
from maas.registry.sql.engine import Database
from maas.testing.models import make_multi_io_model

pytestmark = pytest.mark.each_database  # every test that opens a database: on SQLite and on PostgreSQL


@pytest.fixture
def db(database_url: str) -> Database:
    return Database(database_url)


def append(db: Database, n: int, action: str = "test.act") -> None:
    for i in range(n):
        db.write(lambda s, i=i: record(s, action, f"t/{i}", before={"v": i, "f": 0.1}, after={"v": [i + 1, None]}))


def sql(db: Database, *statements: str) -> None:
    with db.engine.begin() as conn:
        for st in statements:
            conn.execute(text(st))


def problems(db: Database, expect_head: str | None = None) -> list[tuple[int | None, str]]:
    return [(p.seq, p.kind) for p in AuditLog(db).verify(expect_head=expect_head).problems]


def test_entries_chain_and_verify_intact(db: Database) -> None:
    empty = AuditLog(db).verify()
    assert (empty.ok, empty.rows, empty.head_seq, empty.head_hash) == (True, 0, None, GENESIS)
    with audit_context(AuditContext(actor="key-1", request_id="req-9", client="10.0.0.7")):
        append(db, 5)
    entries = AuditLog(db).list()
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(entries))
    assert {(e.actor, e.request_id, e.client) for e in entries} == {("key-1", "req-9", "10.0.0.7")}
    assert entries[2].before == {"v": 2, "f": 0.1} and entries[2].after == {"v": [3, None]}
    result = AuditLog(db).verify()
    assert (result.ok, result.rows, result.head_seq, result.head_hash) == (True, 5, 5, entries[-1].hash)
    assert AuditLog(db).verify(expect_head=entries[2].hash).ok  # a pinned head stays valid as the log grows


def test_an_edited_entry_is_named(db: Database) -> None:
    append(db, 5)
    sql(db, "UPDATE audit_log SET actor = 'mallory' WHERE seq = 3")
    assert problems(db) == [(3, "edited")]


def test_an_edited_and_rehashed_entry_breaks_the_next_link(db: Database) -> None:
    append(db, 5)
    sql(db, "UPDATE audit_log SET target = 'elsewhere', hash = '" + "ab" * 32 + "' WHERE seq = 2")
    assert problems(db) == [(2, "edited"), (3, "link")]


def test_a_deleted_entry_is_named(db: Database) -> None:
    append(db, 6)
    sql(db, "DELETE FROM audit_log WHERE seq IN (3, 4)")
    result = AuditLog(db).verify()
    assert [(p.seq, p.kind) for p in result.problems] == [(3, "missing")]
    assert "seq 3..4: missing" in result.problems[0].detail
    sql(db, "DELETE FROM audit_log WHERE seq = 1")
    assert problems(db) == [(1, "missing"), (3, "missing")]


def test_reordered_entries_are_named(db: Database) -> None:
    append(db, 5)
    sql(
        db,
        "UPDATE audit_log SET seq = -1 WHERE seq = 2",
        "UPDATE audit_log SET seq = 2 WHERE seq = 3",
        "UPDATE audit_log SET seq = 3 WHERE seq = -1",
    )
    found = problems(db)
    assert (2, "edited") in found and (3, "edited") in found
    assert {s for s, _ in found} == {2, 3, 4}


def test_swapped_contents_are_named(db: Database) -> None:
    append(db, 4)
    cols = "at, actor, action, target, before, after, request_id, client, prev_hash, hash"
    sql(
        db,
        f"CREATE TEMP TABLE keep AS SELECT {cols} FROM audit_log WHERE seq = 2",
        f"UPDATE audit_log SET ({cols}) = (SELECT {cols} FROM audit_log WHERE seq = 3) WHERE seq = 2",
        f"UPDATE audit_log SET ({cols}) = (SELECT {cols} FROM keep) WHERE seq = 3",
    )
    assert {s for s, _ in problems(db)} == {2, 3, 4}


def test_deleting_the_newest_entry_needs_the_pinned_head(db: Database) -> None:
    append(db, 4)
    head = AuditLog(db).verify().head_hash
    sql(db, "DELETE FROM audit_log WHERE seq = 4")
    assert AuditLog(db).verify().ok  # the limit of a bare chain: nothing after the cut to disagree
    result = AuditLog(db).verify(expect_head=head)
    assert [(p.seq, p.kind) for p in result.problems] == [(None, "head")]
    assert head in result.problems[0].detail and "ends at seq 3" in result.problems[0].detail


def test_concurrent_appenders_keep_one_chain(database_url: str) -> None:
    url = database_url
    Database(url)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            append(Database(url), 15, action=f"worker.{k}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    log = AuditLog(Database(url))
    result = log.verify()
    assert (result.ok, result.rows, result.head_seq) == (True, 60, 60), result.problems
    assert sorted(e.action for e in log.list(limit=1000)).count("worker.3") == 15


def test_list_filters_by_time_and_actor(db: Database) -> None:
    with audit_context(AuditContext(actor="ann")):
        append(db, 3)
    with audit_context(AuditContext(actor="bob")):
        append(db, 2)
    log = AuditLog(db)
    assert [e.seq for e in log.list(actor="bob")] == [4, 5]
    assert [e.seq for e in log.list(limit=2)] == [4, 5]
    assert len(log.list(since=datetime.now(UTC) - timedelta(minutes=5))) == 5
    assert log.list(since=datetime.now(UTC) + timedelta(minutes=5)) == []


def test_the_local_actor_is_maas_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_USER", "operator-7")
    assert current_audit_context() == AuditContext(actor="operator-7")
    with audit_context(AuditContext(actor="key-2")):
        assert current_audit_context().actor == "key-2"
    assert current_audit_context().actor == "operator-7"


def test_registry_mutations_are_audited(registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_USER", "cli-user")
    files = [make_multi_io_model(tmp_path / f"m{i}.onnx", scale=float(i + 1)) for i in range(2)]
    registry.register(files[0], "m", alias="production")
    with audit_context(AuditContext(actor="key-abc", request_id="r-1", client="192.0.2.1")):
        registry.register(files[1], "m")
        registry.set_alias("m", "production", 2, actor="claimed")  # the authenticated key wins
        registry.rollback("m")
        registry.update_version("m", 1, description="first", tags={"k": "v"})
        registry.update_version("m", 1, description="first")  # no change: no entry
        registry.deploy("m", max_batch_size=8)
        registry.deploy("m", max_batch_size=8)  # no change: no entry
        registry.deploy("m", instances=2)
        registry.undeploy("m")
    registry.set_alias("m", "staging", 2, actor="ann")
    registry.delete_version("m", 2, force=True)
    registry.delete_model("m")
    entries = AuditLog(registry.store.db).list()  # type: ignore[attr-defined]
    got = [(e.actor, e.action, e.target, e.before, e.after) for e in entries]
    first = registry.store.version_digests()  # m is gone; the digest is checked by shape below
    assert got[0][:4] == ("cli-user", "model.register", "models:/m/1", None) and first == {}
    after = entries[0].after
    assert after["digest"].startswith("sha256:") and (after["format"], after["alias"]) == ("onnx", "production")
    assert after["size"] == files[0].stat().st_size
    assert got[1] == ("cli-user", "alias.set", "models:/m@production", None, {"version": 1})
    assert got[2][:3] == ("key-abc", "model.register", "models:/m/2") and got[2][4]["alias"] is None
    assert got[3] == ("key-abc", "alias.set", "models:/m@production", {"version": 1}, {"version": 2})
    assert got[4] == ("key-abc", "alias.rollback", "models:/m@production", {"version": 2}, {"version": 1})
    assert got[5] == (
        "key-abc",
        "model.update",
        "models:/m/1",
        {"description": "", "tags": {}},
        {"description": "first", "tags": {"k": "v"}},
    )
    assert got[6][:4] == ("key-abc", "deployment.put", "models:/m", None)
    assert got[6][4]["max_batch_size"] == 8 and got[6][4]["revision"] == 1
    assert got[7][3]["instances"] == 1 and got[7][4]["instances"] == 2 and got[7][4]["revision"] == 2
    assert got[8][:2] == ("key-abc", "deployment.delete") and got[8][3]["revision"] == 2 and got[8][4] is None
    assert {(e.request_id, e.client) for e in entries[2:9]} == {("r-1", "192.0.2.1")}
    assert got[9] == ("ann", "alias.set", "models:/m@staging", None, {"version": 2})
    assert got[10] == ("cli-user", "alias.delete", "models:/m@staging", {"version": 2}, None)
    assert got[11][:3] == ("cli-user", "model.delete_version", "models:/m/2") and got[11][3]["aliases"] == ["staging"]
    assert got[12] == (
        "cli-user",
        "model.delete",
        "models:/m",
        {"versions": [1], "aliases": {"production": 1}},
        None,
    )
    assert len(got) == 13
    assert AuditLog(registry.store.db).verify().ok  # type: ignore[attr-defined]


def test_a_failed_mutation_leaves_no_entry(registry: Registry) -> None:
    with pytest.raises(Exception, match="not registered"):
        registry.set_alias("nope", "production", 1)
    assert AuditLog(registry.store.db).verify().rows == 0  # type: ignore[attr-defined]
