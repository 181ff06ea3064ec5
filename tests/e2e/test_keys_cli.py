"""`maas keys` as an admin runs it: a key's secret shown once, listings without secrets, revoke and rotate audited,
and bad options refused with a message naming the fix."""

from __future__ import annotations

import json
import subprocess
import sys

from maas.access.keys import KeyStore, database_of
from maas.registry import Registry


def maas(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "maas", *args], env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_keys_create_list_rotate_revoke(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "MAAS_USER": "ops-ann"}
    made = json.loads(
        maas(env, "keys", "create", "--name", "shop app", "--role", "consumer", "--models", "digits*,sentiment",
             "--rpm", "120", "--tpm", "5000", "--concurrent", "4", "--quota-requests", "1000/day",
             "--quota-tokens", "200000/month", "--expires", "30d", "--json").stdout
    )  # fmt: skip
    assert made["key"].startswith(f"maas_{made['id']}_")
    assert made["role"] == "consumer" and made["models"] == ["digits*", "sentiment"] and made["state"] == "active"
    assert made["limits"] == {
        "rpm": 120,
        "tpm": 5000,
        "concurrent": 4,
        "requests_per_day": 1000,
        "tokens_per_month": 200000,
    }
    assert made["created_by"] == "ops-ann" and made["expires_at"]

    listed = json.loads(maas(env, "keys", "list", "--json").stdout)
    assert [k["id"] for k in listed] == [made["id"]] and "key" not in listed[0]
    table = maas(env, "keys", "list").stdout
    assert made["id"] in table and made["key"] not in table

    shown = maas(env, "keys", "create", "--name", "ops", "--role", "admin")
    assert "maas_" in shown.stdout and "only time" in shown.stderr

    keys = KeyStore(database_of(Registry()))
    assert keys.authenticate(made["key"])[1] == "ok"
    rotated = json.loads(maas(env, "keys", "rotate", made["id"], "--json").stdout)
    assert rotated["id"] == made["id"] and rotated["key"] != made["key"]
    assert keys.authenticate(made["key"]) == (None, "unknown")
    assert keys.authenticate(rotated["key"])[1] == "ok"

    revoked = json.loads(maas(env, "keys", "revoke", made["id"], "--json").stdout)
    assert revoked["state"] == "revoked"
    assert keys.authenticate(rotated["key"]) == (None, "revoked")

    audit = json.loads(maas(env, "audit", "list", "--json").stdout)
    assert [e["action"] for e in audit] == ["key.create", "key.create", "key.rotate", "key.revoke"]
    assert {e["actor"] for e in audit} == {"ops-ann"}
    assert all(made["key"] not in json.dumps(e) and rotated["key"] not in json.dumps(e) for e in audit)


def test_bad_options_are_named(cli_env: dict[str, str]) -> None:
    for args, words in [
        (["--role", "root"], "admin, publisher, consumer, monitor"),
        (["--role", "consumer"], "--models"),
        (["--role", "consumer", "--models", "a/b"], "pattern"),
        (["--role", "admin", "--expires", "tomorrow"], "duration"),
        (["--role", "admin", "--quota-requests", "10/month"], "per day"),
    ]:
        proc = maas(cli_env, "keys", "create", "--name", "x", *args, ok=False)
        assert proc.returncode != 0 and words in proc.stderr, (args, proc.stderr)
    proc = maas(cli_env, "keys", "revoke", "nope", ok=False)
    assert proc.returncode == 1 and "12 hex" in proc.stderr


def test_serving_a_public_address_without_auth_is_refused(cli_env: dict[str, str]) -> None:
    for args in (["--auth", "disabled"], []):
        env = {**cli_env, "MAAS_AUTH": "disabled"} if not args else cli_env
        proc = subprocess.run(
            [sys.executable, "-m", "maas", "serve", "--host", "0.0.0.0", "--port", "1", *args],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 1 and "--allow-unauthenticated" in proc.stderr, proc.stderr
    proc = maas(cli_env, "serve", "--auth", "sometimes", ok=False)
    assert proc.returncode == 1 and "auto, required, disabled" in proc.stderr
