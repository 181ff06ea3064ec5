"""Several processes changing one model at the same moment, on SQLite and on PostgreSQL: registrations get one version
number each, and alias moves queue instead of losing one another."""

import contextlib
import itertools
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maas.errors import Conflict
from maas.registry import Registry
from maas.registry.audit import AuditLog
from maas.testing.models import make_multi_io_model

pytestmark = [pytest.mark.slow, pytest.mark.each_database]


def test_eight_processes_get_versions_one_to_eight(
    database_url: str, home: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    files = [make_multi_io_model(tmp_path / f"m{i}.onnx", scale=float(i)) for i in range(8)]
    env = {**cli_env, "MAAS_DATABASE_URL": database_url}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "maas", "models", "register", str(f), "--name", "race", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for f in files
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "locked" not in err.lower()
    versions = sorted(json.loads(out)["version"] for out, _ in outs)
    assert versions == list(range(1, 9))
    reg = Registry()
    stored = reg.list_versions("race")
    assert [v.version for v in stored] == list(range(1, 9))
    assert len({v.artifact_digest for v in stored}) == 8
    assert all(r.ok for r in reg.verify("race"))


MOVERS, MOVES, REGISTRARS = 4, 15, 2


def _load(url: str, home: str, job: str, files: list[str], start: float) -> int:
    """In a child process: move `hot@production` MOVES times (every fifth a rollback), or register ``files`` as new
    versions of `hot`; how many alias events it made."""
    reg = Registry(url, home=Path(home))
    while time.time() < start:
        time.sleep(0.001)
    if job == "register":
        for f in files:
            reg.register(f, "hot")
        return 0
    made = 0
    for i in range(MOVES):
        if i % 5 == 4:
            with contextlib.suppress(Conflict):  # the others' moves may have left nothing to roll back to
                reg.rollback("hot", "production", actor=job)
                made += 1
        else:
            reg.set_alias("hot", "production", 1 + (i + int(job[-1])) % 3, actor=job)
            made += 1
    return made


def test_alias_moves_under_load_keep_one_history(database_url: str, home: Path, tmp_path: Path) -> None:
    files = [str(make_multi_io_model(tmp_path / f"m{i}.onnx", scale=float(i))) for i in range(3 + 2 * REGISTRARS)]
    reg = Registry()
    for f in files[:3]:
        reg.register(f, "hot")
    reg.set_alias("hot", "production", 1)
    jobs = [(f"mover-{k}", []) for k in range(MOVERS)]
    jobs += [("register", files[3 + 2 * k : 5 + 2 * k]) for k in range(REGISTRARS)]
    start = time.time() + 3.0  # every child imported and connected before the load starts
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        results = [pool.apply_async(_load, (database_url, str(home), job, fs, start)) for job, fs in jobs]
        moves = sum(r.get(timeout=300) for r in results)

    history = reg.alias_history("hot", "production")
    assert len(history) == 1 + moves and moves >= MOVERS * MOVES * 4 // 5
    for before, after in itertools.pairwise(history):
        assert after.from_version == before.to_version, (before, after)  # no move was lost or crossed another
    assert reg.get_model("hot").aliases == {"production": history[-1].to_version}
    assert {e.actor for e in history[1:]} == {f"mover-{k}" for k in range(MOVERS)}
    assert [v.version for v in reg.list_versions("hot")] == list(range(1, 4 + 2 * REGISTRARS))
    log = AuditLog(reg.store.db)  # type: ignore[attr-defined]
    result = log.verify()
    assert result.ok, result.problems
    assert result.rows == len(files) + len(history)  # one entry per registration and per alias move
