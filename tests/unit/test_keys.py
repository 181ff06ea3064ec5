"""API keys: made, checked, revoked, rotated and expired; roles and model patterns; auth modes by bind address."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from maas.access.keys import KeyStore, database_of, split_token
from maas.access.principal import KeyLimits, Principal, Role, check_patterns
from maas.access.times import parse_expiry
from maas.errors import InvalidInput, NotFound, RateLimited, Unauthorized
from maas.registry import Registry
from maas.registry.schema_access import ApiKeyRow
from maas.registry.sql.engine import now
from maas.serving.access.authenticator import Authenticator, FailureThrottle, bearer
from maas.serving.access.mode import auth_required, is_loopback

pytestmark = pytest.mark.each_database  # every test that opens a database: on SQLite and on PostgreSQL


@pytest.fixture
def keys(registry: Registry) -> KeyStore:
    return KeyStore(database_of(registry))


def test_a_key_authenticates_as_its_role_and_patterns(keys: KeyStore) -> None:
    key, token = keys.create("app", "consumer", models=["digits*", "sentiment"], limits=KeyLimits(rpm=5))
    found, why = keys.authenticate(token)
    assert why == "ok" and found is not None and found.id == key.id
    p = found.principal()
    assert p.role is Role.CONSUMER and p.limits.rpm == 5
    assert p.sees("digits") and p.sees("digits-v2") and p.sees("sentiment")
    assert not p.sees("sentiment2") and not p.sees("other")
    assert not p.may_publish("digits") and not p.may_read_metrics


def test_only_a_hash_of_the_secret_is_stored(keys: KeyStore) -> None:
    key, token = keys.create("app", "admin")
    _, secret = split_token(token) or ("", "")
    rows = keys.db.read(lambda s: [(r.secret_hash, r.id) for r in s.scalars(select(ApiKeyRow))])
    assert rows and all(secret not in h and secret not in i for h, i in rows)
    assert "secret" not in str(key.to_dict()).lower()


@pytest.mark.parametrize(
    "token",
    ["", "maas_", "Bearer x", "maas_000000000000_" + "A" * 43, "maas_zzzzzzzzzzzz_" + "A" * 43, "x" * 5000],
)
def test_wrong_and_malformed_keys_are_refused(keys: KeyStore, token: str) -> None:
    keys.create("app", "admin")
    found, why = keys.authenticate(token)
    assert found is None and why in ("malformed", "unknown")


def test_a_wrong_secret_for_a_real_id_is_refused(keys: KeyStore) -> None:
    _, token = keys.create("app", "admin")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert keys.authenticate(forged) == (None, "unknown")


def test_revoked_and_expired_keys_are_refused(keys: KeyStore) -> None:
    key, token = keys.create("app", "admin")
    keys.revoke(key.id)
    assert keys.authenticate(token) == (None, "revoked")
    assert keys.get(key.id).state() == "revoked"
    _, token2 = keys.create("soon", "admin", expires_at=now() + timedelta(hours=1))
    assert keys.authenticate(token2)[1] == "ok"
    keys.db.write(lambda s: s.execute(update(ApiKeyRow).values(expires_at=now() - timedelta(seconds=1))))
    assert keys.authenticate(token2) == (None, "expired")


def test_rotation_replaces_the_secret(keys: KeyStore) -> None:
    key, old = keys.create("app", "publisher", models=["a*"])
    rotated, new = keys.rotate(key.id)
    assert rotated.id == key.id and rotated.rotated_at is not None and new != old
    assert keys.authenticate(old) == (None, "unknown")
    assert keys.authenticate(new)[0] is not None
    keys.revoke(key.id)
    with pytest.raises(InvalidInput, match="revoked"):
        keys.rotate(key.id)


def test_bad_requests_are_clear_errors(keys: KeyStore) -> None:
    with pytest.raises(InvalidInput, match="role"):
        keys.create("app", "root")
    with pytest.raises(InvalidInput, match="--models"):
        keys.create("app", "consumer")
    with pytest.raises(InvalidInput, match="pattern"):
        keys.create("app", "consumer", models=["../etc"])
    with pytest.raises(InvalidInput, match="past"):
        keys.create("app", "admin", expires_at=now() - timedelta(days=1))
    with pytest.raises(NotFound):
        keys.revoke("0123456789ab")
    with pytest.raises(InvalidInput, match="12 hex"):
        keys.revoke("../../x")


def test_expiry_parsing() -> None:
    t0 = now()
    assert parse_expiry("30d", at=t0) == t0 + timedelta(days=30)
    assert parse_expiry("12h", at=t0) == t0 + timedelta(hours=12)
    assert parse_expiry("2027-01-31").year == 2027
    with pytest.raises(InvalidInput, match="duration"):
        parse_expiry("soon")


def test_roles() -> None:
    admin = Principal("a" * 12, "a", Role.ADMIN)
    monitor = Principal("b" * 12, "m", Role.MONITOR, ("*",))
    publisher = Principal("c" * 12, "p", Role.PUBLISHER, ("team-*",))
    assert admin.sees("x") and admin.may_publish("x") and admin.may_read_metrics
    assert not monitor.sees("x") and monitor.may_read_metrics and not monitor.may_publish("x")
    assert publisher.may_publish("team-a") and not publisher.may_publish("other") and publisher.sees("team-a")
    assert check_patterns([" a* ", "a*", "b?"]) == ("a*", "b?")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("::", False), ("10.0.0.5", False), ("example.com", False)],
)  # fmt: skip
def test_auth_modes_by_bind_address(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    assert auth_required("auto", host) is (not loopback)
    assert auth_required("required", host) is True
    if loopback:
        assert auth_required("disabled", host) is False
    else:
        with pytest.raises(InvalidInput, match="allow-unauthenticated"):
            auth_required("disabled", host)
        assert auth_required("disabled", host, allow_unauthenticated=True) is False
    with pytest.raises(InvalidInput, match="MAAS_AUTH"):
        auth_required("sometimes", host)


def test_bearer_parsing() -> None:
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer(None) is None and bearer("Bearer ") is None
    assert bearer("Bearer " + "x" * 600) is None


def test_the_authenticator_caches_briefly_and_throttles_failures(keys: KeyStore) -> None:
    key, token = keys.create("app", "consumer", models=["*"])
    auth = Authenticator(keys, cache_s=0.2, max_failures=3)

    async def scenario() -> None:
        assert (await auth.authenticate(f"Bearer {token}", "1.2.3.4")).key_id == key.id
        keys.revoke(key.id)
        # Trusted from the cache for at most cache_s, then refused.
        await asyncio.sleep(0.25)
        with pytest.raises(Unauthorized, match="revoked"):
            await auth.authenticate(f"Bearer {token}", "1.2.3.4")
        with pytest.raises(Unauthorized, match="requires an API key"):
            await auth.authenticate(None, "1.2.3.4")
        with pytest.raises(Unauthorized):
            await auth.authenticate("Bearer nope", "1.2.3.4")
        # Three failures from 1.2.3.4 in a minute: it is slowed and refused; another address is not.
        with pytest.raises(RateLimited):
            await auth.authenticate("Bearer nope", "1.2.3.4")
        _, good = keys.create("other", "admin")
        assert (await auth.authenticate(f"Bearer {good}", "5.6.7.8")).role is Role.ADMIN
        assert (await auth.authenticate(f"Bearer {good}", "1.2.3.4")).role is Role.ADMIN  # no lockout of valid keys

    asyncio.run(scenario())


def test_failure_throttle_window() -> None:
    throttle = FailureThrottle(2, window_s=0.1)
    throttle.failed("x")
    assert throttle.blocked_for("x") == 0
    throttle.failed("x")
    assert throttle.blocked_for("x") > 0
    import time

    time.sleep(0.12)
    assert throttle.blocked_for("x") == 0


def test_a_zero_failure_limit_turns_the_throttle_off() -> None:
    throttle = FailureThrottle(0)
    for _ in range(5):
        throttle.failed("x")
    assert throttle.blocked_for("x") == 0
