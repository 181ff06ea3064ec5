"""``maas usage`` as a user runs it: per-period totals of the local registry's usage, as a table, JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from maas.access.keys import database_of
from maas.access.usage import Counters, UsageStore
from maas.registry import Registry


def maas(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "maas", *args], env=env, capture_output=True, text=True, timeout=120)


def test_usage_prints_totals_per_period_key_and_model(cli_env: dict[str, str]) -> None:
    store = UsageStore(database_of(Registry()))
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    store.add(
        {
            ("aaaaaaaaaaaa", "digits", 1, now): Counters(10, 1, 40, 0, 0, 0.25),
            ("aaaaaaaaaaaa", "chat", 2, now): Counters(3, 0, 3, 30, 60, 1.5),
            ("bbbbbbbbbbbb", "digits", 1, now - timedelta(days=3)): Counters(requests=5),
        }
    )
    table = maas(cli_env, "usage", "--since", "1d")
    assert table.returncode == 0, table.stderr
    assert "digits" in table.stdout and "chat" in table.stdout and "bbbbbbbbbbbb" not in table.stdout
    assert "total" in table.stdout and "13" in table.stdout

    as_json = json.loads(maas(cli_env, "usage", "--model", "digits", "--by", "total", "--json").stdout)
    assert [(t["key_id"], t["requests"], t["errors"], t["items"]) for t in as_json] == [
        ("aaaaaaaaaaaa", 10, 1, 40),
        ("bbbbbbbbbbbb", 5, 0, 0),
    ]
    rows = list(csv.DictReader(io.StringIO(maas(cli_env, "usage", "--key", "aaaaaaaaaaaa", "--csv").stdout)))
    assert {(r["model"], r["tokens"]) for r in rows} == {("digits", "0"), ("chat", "90")}

    wrong = maas(cli_env, "usage", "--by", "week")
    assert wrong.returncode == 1 and "minute, hour, day, total" in wrong.stderr
