"""Training runs as registry records: lifecycle, step metrics, checkpoints, lookups and the migration."""

import hashlib
import json
import math
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from maas.errors import Conflict, InvalidInput, NotFound
from maas.registry import Registry, RunStep, config_hash
from maas.registry.sql.engine import SCHEMA_HEAD

pytestmark = pytest.mark.each_database  # every test that opens a database: on SQLite and on PostgreSQL

CONFIG = {"model": {"hidden": 64}, "lr": 0.001, "steps": [1, 2]}


def test_run_lifecycle(registry: Registry) -> None:
    run = registry.runs.create_run(CONFIG, strategy="ddp", world_size=2, name="mnist")
    assert len(run.id) == 32 and int(run.id, 16) >= 0
    assert (run.status, run.name, run.strategy, run.world_size) == ("created", "mnist", "ddp", 2)
    assert run.config == CONFIG and run.started_at is None and run.last_step is None
    canonical = json.dumps(CONFIG, sort_keys=True, separators=(",", ":"))
    assert (
        run.config_hash == hashlib.sha256(canonical.encode()).hexdigest() == config_hash(dict(reversed(CONFIG.items())))
    )

    started = registry.runs.start_run(run.id)
    assert started.status == "running" and started.started_at is not None and started.ended_at is None

    assert registry.runs.log_run_steps(run.id, [RunStep(1, 2.5, 100.0, 0.1), (2, 2.0), {"step": 3, "loss": 1.5}]) == 3
    registry.runs.add_run_checkpoint(run.id, 2, "/ckpt/step-2")

    done = registry.runs.finish_run(run.id, status="succeeded", eval_metrics={"accuracy": 0.9}, model_uri="m/3")
    assert (done.status, done.eval_metrics, done.model_uri, done.error) == (
        "succeeded",
        {"accuracy": 0.9},
        "models:/m/3",
        None,
    )
    assert done.ended_at is not None and done.started_at == started.started_at
    assert done.duration_s is not None and done.duration_s >= 0
    assert (done.last_step, done.last_loss) == (3, 1.5)
    assert registry.runs.get_run(run.id) == done

    steps = registry.runs.run_steps(run.id)
    assert [(s.step, s.loss, s.samples_per_s, s.lr) for s in steps] == [
        (1, 2.5, 100.0, 0.1),
        (2, 2.0, None, None),
        (3, 1.5, None, None),
    ]
    assert all(s.at.tzinfo is not None for s in steps)
    assert [(c.step, c.path) for c in registry.runs.run_checkpoints(run.id)] == [(2, "/ckpt/step-2")]
    json.dumps(done.to_dict())  # plain JSON values only


def test_resumed_run_replaces_steps_and_checkpoints_it_logs_again(registry: Registry) -> None:
    run = registry.runs.create_run(CONFIG, strategy="single", world_size=1)
    first = registry.runs.start_run(run.id)
    registry.runs.log_run_steps(run.id, [(s, 10.0 - s) for s in range(1, 6)])
    registry.runs.add_run_checkpoint(run.id, 3, "/a/step-3")
    registry.runs.finish_run(run.id, status="interrupted", error="SIGTERM")

    # Resumed from the step-3 checkpoint: steps 4..5 run again with other losses; one step twice in a batch.
    resumed = registry.runs.start_run(run.id)
    assert resumed.status == "running" and resumed.started_at == first.started_at
    assert resumed.ended_at is None and resumed.error is None
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    registry.runs.log_run_steps(run.id, [RunStep(4, 0.4, at=at), RunStep(5, 0.55), RunStep(5, 0.5), RunStep(6, 0.3)])
    registry.runs.add_run_checkpoint(run.id, 3, Path("/b/step-3"))

    steps = registry.runs.run_steps(run.id)
    assert [(s.step, s.loss) for s in steps] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 0.4), (5, 0.5), (6, 0.3)]
    assert steps[3].at == at
    assert [(c.step, c.path) for c in registry.runs.run_checkpoints(run.id)] == [(3, "/b/step-3")]
    assert registry.runs.get_run(run.id).last_step == 6


def test_a_diverged_step_is_logged_as_nan(registry: Registry) -> None:
    run = registry.runs.create_run({}, strategy="single", world_size=1)
    registry.runs.log_run_steps(run.id, [(1, 1.0), (2, float("nan"), float("nan"))])
    steps = registry.runs.run_steps(run.id)
    assert math.isnan(steps[1].loss) and steps[1].samples_per_s is None
    assert math.isnan(registry.runs.get_run(run.id).last_loss or 0.0)


def test_evaluations_are_kept_per_step_and_replaced_on_resume(registry: Registry) -> None:
    run = registry.runs.create_run(CONFIG, strategy="ddp", world_size=2)
    registry.runs.log_run_eval(run.id, 20, {"accuracy": 0.5, "mse": float("nan")})
    registry.runs.log_run_eval(run.id, 10, {"accuracy": 0.25})
    registry.runs.log_run_eval(run.id, 20, {"accuracy": 0.75, "mse": 1.0})  # a resumed run evaluates step 20 again
    evals = registry.runs.run_evals(run.id[:8])
    assert [(e.step, e.metrics) for e in evals] == [(10, {"accuracy": 0.25}), (20, {"accuracy": 0.75, "mse": 1.0})]
    registry.runs.log_run_eval(run.id, 30, {"loss": float("nan")})  # diverged: JSON has no NaN, it comes back as NaN
    assert math.isnan(registry.runs.run_evals(run.id)[-1].metrics["loss"])
    assert evals[0].to_dict()["metrics"] == {"accuracy": 0.25}
    with pytest.raises(InvalidInput, match="non-empty mapping"):
        registry.runs.log_run_eval(run.id, 40, {})
    with pytest.raises(InvalidInput, match="must be a number"):
        registry.runs.log_run_eval(run.id, 40, {"accuracy": "high"})  # type: ignore[dict-item]
    with pytest.raises(InvalidInput, match="integer >= 0"):
        registry.runs.log_run_eval(run.id, -1, {"accuracy": 0.5})
    with pytest.raises(NotFound):
        registry.runs.log_run_eval("f" * 32, 1, {"accuracy": 0.5})


def test_a_succeeded_run_stays_succeeded_and_non_finite_metrics_read_back_as_nan(registry: Registry) -> None:
    run = registry.runs.create_run(CONFIG, strategy="ddp", world_size=4)
    registry.runs.start_run(run.id)
    done = registry.runs.finish_run(run.id, status="succeeded", eval_metrics={"mse": float("inf"), "acc": 0.5})
    assert math.isnan(done.eval_metrics["mse"]) and done.eval_metrics["acc"] == 0.5
    # Another node of the job failing afterwards does not undo the result.
    late = registry.runs.finish_run(run.id, status="failed", error="rendezvous closed", eval_metrics={"acc": 0.0})
    assert (late.status, late.error, late.eval_metrics["acc"]) == ("succeeded", None, 0.5)
    registry.runs.log_run_eval(run.id, 4, {"mse": float("-inf")})
    assert math.isnan(registry.runs.run_evals(run.id)[0].metrics["mse"])


def test_nodes_of_one_job_share_the_run_they_name(registry: Registry) -> None:
    run_id = "a" * 32
    first = registry.runs.create_run(CONFIG, strategy="ddp", world_size=4, run_id=run_id)
    registry.runs.start_run(run_id)
    joined = registry.runs.create_run(dict(reversed(CONFIG.items())), strategy="ddp", world_size=4, run_id=run_id)
    assert first.id == joined.id == run_id and joined.status == "running"
    assert len(registry.runs.list_runs()) == 1
    with pytest.raises(Conflict, match="another config"):
        registry.runs.create_run({"other": 1}, strategy="ddp", world_size=4, run_id=run_id)
    with pytest.raises(InvalidInput, match="32 lowercase hex"):
        registry.runs.create_run(CONFIG, strategy="ddp", world_size=4, run_id="../etc")


def test_get_run_by_unique_prefix(registry: Registry) -> None:
    run = registry.runs.create_run(CONFIG, strategy="ddp", world_size=1)
    assert registry.runs.get_run(run.id[:6]).id == run.id
    assert registry.runs.get_run(run.id.upper()).id == run.id
    with pytest.raises(InvalidInput, match="at least 6"):
        registry.runs.get_run(run.id[:5])
    with pytest.raises(InvalidInput, match="not a run id"):
        registry.runs.get_run("../etc/passwd")
    with pytest.raises(NotFound, match="maas runs list"):
        registry.runs.get_run("f" * 32 if not run.id.startswith("f") else "0" * 32)


def test_an_ambiguous_prefix_is_refused(registry: Registry) -> None:
    # Two runs whose ids share their first 6 digits: rename one directly, ids are never user input.
    a = registry.runs.create_run({}, strategy="single", world_size=1)
    b = registry.runs.create_run({}, strategy="single", world_size=1)
    twin = a.id[:6] + b.id[6:]
    with registry.store.engine.begin() as conn:
        conn.execute(text("UPDATE runs SET id = :new WHERE id = :old"), {"new": twin, "old": b.id})
    with pytest.raises(InvalidInput, match="ambiguous"):
        registry.runs.get_run(a.id[:6])
    assert registry.runs.get_run(a.id[:6] + b.id[6:12]).id == twin


def test_list_runs_newest_first_with_status_filter_and_limit(registry: Registry) -> None:
    ids = [registry.runs.create_run({"i": i}, strategy="ddp", world_size=1).id for i in range(4)]
    registry.runs.start_run(ids[1])
    registry.runs.finish_run(ids[2], status="failed", error="boom")
    registry.runs.log_run_steps(ids[3], [(1, 3.0), (7, 1.25), (4, 2.0)])

    runs = registry.runs.list_runs()
    assert [r.id for r in runs] == ids[::-1]
    assert [(r.last_step, r.last_loss) for r in runs] == [(7, 1.25), (None, None), (None, None), (None, None)]
    assert [r.id for r in registry.runs.list_runs(limit=2)] == ids[:1:-1]
    assert [r.id for r in registry.runs.list_runs(status="running")] == [ids[1]]
    assert [(r.id, r.error) for r in registry.runs.list_runs(status="failed")] == [(ids[2], "boom")]
    assert registry.runs.list_runs(status="succeeded") == []


def test_bad_input_is_refused_naming_what_is_valid(registry: Registry) -> None:
    with pytest.raises(InvalidInput, match="created, running, succeeded, failed, interrupted"):
        registry.runs.list_runs(status="done")
    run = registry.runs.create_run({}, strategy="single", world_size=1)
    with pytest.raises(InvalidInput, match="succeeded, failed, interrupted"):
        registry.runs.finish_run(run.id, status="running")
    with pytest.raises(InvalidInput, match="JSON-serializable"):
        registry.runs.create_run({"path": Path("/x")}, strategy="single", world_size=1)
    with pytest.raises(InvalidInput, match="world_size"):
        registry.runs.create_run({}, strategy="single", world_size=0)
    with pytest.raises(InvalidInput, match="step number"):
        registry.runs.log_run_steps(run.id, [(-1, 1.0)])
    with pytest.raises(InvalidInput, match="loss must be a number"):
        registry.runs.log_run_steps(run.id, [(1, "low")])
    with pytest.raises(InvalidInput, match="a step must be"):
        registry.runs.log_run_steps(run.id, [(1,)])
    with pytest.raises(InvalidInput, match="names no version"):
        registry.runs.finish_run(run.id, status="succeeded", model_uri="models:/m@production")
    with pytest.raises(NotFound):
        registry.runs.log_run_steps("0" * 32 if not run.id.startswith("0") else "1" * 32, [(1, 1.0)])
    assert registry.runs.run_steps(run.id) == [] and registry.runs.get_run(run.id).status == "created"


def test_a_succeeded_run_cannot_restart(registry: Registry) -> None:
    run = registry.runs.create_run({}, strategy="single", world_size=1)
    registry.runs.finish_run(run.id, status="succeeded")
    with pytest.raises(Conflict, match="new run"):
        registry.runs.start_run(run.id)


def test_a_0001_database_upgrades_to_runs(empty_database_url: str, tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    url = empty_database_url
    engine = create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", "maas.registry:migrations")
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001_registry")
        conn.execute(
            text(
                "INSERT INTO registered_models (name, description, last_version, created_at, updated_at) "
                "VALUES ('old', '', 0, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
            )
        )
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001_registry"
    engine.dispose()

    registry = Registry(url, home=tmp_path / "home")
    assert registry.store.current_revision() == SCHEMA_HEAD == "0005_access"
    assert [m.name for m in registry.list_models()] == ["old"]
    run = registry.runs.create_run(CONFIG, strategy="ddp", world_size=2)
    registry.runs.log_run_steps(run.id, [(1, 1.0)])
    assert registry.runs.list_runs()[0].last_step == 1
    registry.runs.log_run_eval(run.id, 1, {"accuracy": 0.5})
    assert [e.metrics for e in registry.runs.run_evals(run.id)] == [{"accuracy": 0.5}]


def test_registry_run_methods_still_work_and_warn_with_their_replacement(registry: Registry) -> None:
    with pytest.warns(DeprecationWarning, match=r"use registry\.runs\.create_run\(\.\.\.\)") as caught:
        run = registry.create_run(CONFIG, strategy="single", world_size=1)
    assert caught[0].filename == __file__  # the warning points at the caller's line
    with pytest.warns(DeprecationWarning, match=r"registry\.runs\.log_run_steps"):
        assert registry.log_run_steps(run.id, [(1, 1.0)]) == 1
    with pytest.warns(DeprecationWarning, match=r"registry\.runs\.get_run"):
        assert registry.get_run(run.id) == registry.runs.get_run(run.id)


def test_nodes_finishing_at_once_lose_no_metric(registry: Registry) -> None:
    run = registry.runs.create_run(CONFIG, strategy="ddp", world_size=4)
    nodes = [Registry() for _ in range(4)]  # each its own engine, as the job's nodes have
    errors: list[BaseException] = []

    def finish(i: int, r: Registry) -> None:
        try:
            for j in range(4):
                r.runs.finish_run(run.id, status="succeeded", eval_metrics={f"node{i}-{j}": float(i)})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(i, r)) for i, r in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    done = registry.runs.get_run(run.id)
    assert done.status == "succeeded" and set(done.eval_metrics) == {f"node{i}-{j}" for i in range(4) for j in range(4)}
