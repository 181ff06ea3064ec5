"""`maas audit list` and `maas audit verify` as an operator runs them, against a log tampered with by sqlite3."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from maas.testing.models import make_multi_io_model


def maas(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "maas", *args], env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def tamper(home: Path, *statements: str) -> None:
    with sqlite3.connect(home / "maas.db") as conn:
        for st in statements:
            conn.execute(st)


def test_audit_list_and_verify_find_tampering(cli_env: dict[str, str], home: Path, tmp_path: Path) -> None:
    env = {**cli_env, "MAAS_USER": "ops-ann"}
    model = make_multi_io_model(tmp_path / "m.onnx")
    maas(env, "models", "register", str(model), "--name", "m", "--alias", "production")
    maas(env, "models", "register", str(model), "--name", "m")
    maas(env, "models", "alias", "set", "m", "production", "2")
    maas(env, "models", "rollback", "m")

    entries = json.loads(maas(env, "audit", "list", "--json").stdout)
    assert [(e["seq"], e["actor"], e["action"], e["target"]) for e in entries] == [
        (1, "ops-ann", "model.register", "models:/m/1"),
        (2, "ops-ann", "alias.set", "models:/m@production"),
        (3, "ops-ann", "model.register", "models:/m/2"),
        (4, "ops-ann", "alias.set", "models:/m@production"),
        (5, "ops-ann", "alias.rollback", "models:/m@production"),
    ]
    assert (entries[3]["before"], entries[3]["after"]) == ({"version": 1}, {"version": 2})
    assert json.loads(maas(env, "audit", "list", "--since", "1h", "--actor", "nobody", "--json").stdout) == []
    table = maas(env, "audit", "list", "--limit", "2").stdout
    assert "alias.rollback" in table and "model.register" not in table

    ok = maas(env, "audit", "verify")
    head = entries[-1]["hash"]
    assert "intact: 5 entries" in ok.stdout and head in ok.stdout
    assert json.loads(maas(env, "audit", "verify", "--json").stdout)["head_hash"] == head

    tamper(home, "UPDATE audit_log SET after = '{\"version\": 7}' WHERE seq = 4")
    bad = maas(env, "audit", "verify", ok=False)
    assert bad.returncode == 1 and "seq 4: contents do not match" in bad.stderr
    report = json.loads(maas(env, "audit", "verify", "--json", ok=False).stdout)
    assert not report["ok"] and [(p["seq"], p["kind"]) for p in report["problems"]] == [(4, "edited")]

    tamper(home, "DELETE FROM audit_log WHERE seq = 4", "DELETE FROM audit_log WHERE seq = 5")
    assert maas(env, "audit", "verify").returncode == 0  # a cut tail leaves a valid chain: that is what pins are for
    cut = maas(env, "audit", "verify", "--expect-head", head, ok=False)
    assert cut.returncode == 1 and head in cut.stderr and "ends at seq 3" in cut.stderr

    tamper(home, "DELETE FROM audit_log WHERE seq = 2")
    gap = maas(env, "audit", "verify", ok=False)
    assert gap.returncode == 1 and "seq 2: missing" in gap.stderr
