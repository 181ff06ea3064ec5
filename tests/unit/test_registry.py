import threading
from pathlib import Path

import pytest

from maas.errors import ArtifactIntegrityError, Conflict, InvalidInput, NotFound
from maas.registry import Registry
from maas.registry.sql.engine import SCHEMA_HEAD
from maas.testing.models import make_linear_model, make_multi_io_model

pytestmark = pytest.mark.each_database  # every test that opens a database: on SQLite and on PostgreSQL


@pytest.fixture
def model_files(tmp_path: Path) -> list[Path]:
    return [make_multi_io_model(tmp_path / f"m{i}.onnx", scale=float(i + 1)) for i in range(4)]


def flip_byte(path: Path, offset: int = -20) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_register_records_signature_digest_and_lineage(registry: Registry, model_files: list[Path]) -> None:
    mv = registry.register(
        model_files[0], "multi", description="d", tags={"team": "x"}, metrics={"accuracy": 0.97}, creator="ann"
    )
    assert (mv.name, mv.version, mv.format) == ("multi", 1, "onnx")
    assert [s.describe() for s in mv.signature.inputs] == ["x FP32[-1, 4]", "ids INT64[-1, 3]", "mask BOOL[-1, 3]"]
    assert [s.datatype for s in mv.signature.outputs] == ["FP32", "INT64", "BOOL"]
    assert mv.artifact_digest.startswith("sha256:") and mv.artifact_size == model_files[0].stat().st_size
    assert mv.metrics == {"accuracy": 0.97} and mv.tags == {"team": "x"} and mv.lineage.creator == "ann"
    child = registry.register(model_files[1], "multi", parent="models:/multi/1", source_run="run-7")
    assert child.version == 2 and child.lineage.parent == "models:/multi/1" and child.lineage.source_run == "run-7"
    assert registry.get_version("multi", 2) == child


def test_versions_count_up_and_are_never_reused(registry: Registry, model_files: list[Path]) -> None:
    versions = [registry.register(f, "m").version for f in model_files[:3]]
    assert versions == [1, 2, 3]
    registry.delete_version("m", 3)
    assert registry.register(model_files[3], "m").version == 4


def test_resolve_uris(registry: Registry, model_files: list[Path]) -> None:
    for f in model_files[:3]:
        registry.register(f, "m")
    assert registry.resolve("m").version == 3  # no production alias: latest
    registry.set_alias("m", "production", 1)
    registry.set_alias("m", "staging", 2)
    assert registry.resolve("models:/m").version == 1
    assert registry.resolve("models:/m@staging").version == 2
    assert registry.resolve("models:/m@latest").version == 3
    assert registry.resolve("m/2").version == 2
    with pytest.raises(NotFound, match="no alias 'canary'"):
        registry.resolve("models:/m@canary")
    with pytest.raises(NotFound, match="no version 9"):
        registry.resolve("models:/m/9")
    with pytest.raises(NotFound, match="not registered"):
        registry.resolve("models:/other")


def test_alias_history_and_rollback_walks_back(registry: Registry, model_files: list[Path]) -> None:
    for f in model_files[:3]:
        registry.register(f, "m")
    registry.set_alias("m", "production", 1, actor="a")
    registry.set_alias("m", "production", 2, actor="b")
    registry.set_alias("m", "production", 3, actor="c")
    ev = registry.rollback("m")
    assert (ev.from_version, ev.to_version, ev.action) == (3, 2, "rollback")
    assert registry.rollback("m").to_version == 1
    with pytest.raises(Conflict, match="no earlier version"):
        registry.rollback("m")
    history = registry.alias_history("m", "production")
    assert [(e.action, e.from_version, e.to_version) for e in history] == [
        ("set", None, 1),
        ("set", 1, 2),
        ("set", 2, 3),
        ("rollback", 3, 2),
        ("rollback", 2, 1),
    ]
    assert [e.actor for e in history[:3]] == ["a", "b", "c"]


def test_rollback_after_delete_restores_alias_and_skips_deleted_versions(
    registry: Registry, model_files: list[Path]
) -> None:
    for f in model_files[:3]:
        registry.register(f, "m")
    registry.set_alias("m", "production", 1)
    registry.set_alias("m", "production", 2)
    registry.set_alias("m", "production", 3)
    registry.delete_version("m", 2)
    assert registry.rollback("m").to_version == 1  # 2 is gone
    registry.delete_alias("m", "production")
    assert registry.get_model("m").aliases == {}
    assert registry.rollback("m").to_version == 1


def test_delete_refused_while_alias_points_unless_forced(registry: Registry, model_files: list[Path]) -> None:
    registry.register(model_files[0], "m", alias="production")
    with pytest.raises(Conflict, match="production"):
        registry.delete_version("m", 1)
    registry.delete_version("m", 1, force=True)
    assert registry.list_versions("m") == []
    assert registry.get_model("m").aliases == {}


def test_shared_artifact_survives_deleting_one_version(registry: Registry, model_files: list[Path]) -> None:
    a = registry.register(model_files[0], "a")
    registry.register(model_files[0], "b")
    registry.delete_version("a", 1)
    assert registry.artifact_path(registry.get_version("b", 1)).exists()
    registry.delete_version("b", 1)
    assert not registry.artifacts.local_path(a.artifact_digest).exists()


def test_flipped_byte_is_refused_naming_both_digests(registry: Registry, model_files: list[Path]) -> None:
    mv = registry.register(model_files[0], "m")
    good = registry.register(model_files[1], "other")
    flip_byte(registry.artifacts.local_path(mv.artifact_digest))
    with pytest.raises(ArtifactIntegrityError) as info:
        registry.artifact_path(mv)
    msg = str(info.value)
    assert "models:/m/1" in msg and "digest mismatch" in msg and mv.artifact_digest in msg and "actual sha256:" in msg
    results = {(r.name, r.version): r for r in registry.verify()}
    assert not results[("m", 1)].ok and results[("other", 1)].ok
    assert registry.artifact_path(good).exists()


def test_missing_artifact_is_reported(registry: Registry, model_files: list[Path]) -> None:
    mv = registry.register(model_files[0], "m")
    registry.artifacts.local_path(mv.artifact_digest).unlink()
    with pytest.raises(ArtifactIntegrityError, match="missing"):
        registry.artifact_path(mv)


def test_crash_before_commit_leaves_no_version(
    registry: Registry, model_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.register(model_files[0], "m")

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated crash between artifact write and commit")

    monkeypatch.setattr(registry.store, "create_version", boom)
    with pytest.raises(RuntimeError):
        registry.register(model_files[1], "m")
    monkeypatch.undo()
    assert [v.version for v in registry.list_versions("m")] == [1]
    assert registry.register(model_files[1], "m").version == 2


def test_crash_mid_artifact_write_leaves_no_partial_file(
    registry: Registry, model_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    real_replace = os.replace

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        registry.register(model_files[0], "m")
    monkeypatch.setattr(os, "replace", real_replace)
    tmp = registry.home / "artifacts" / "tmp"
    assert not list(tmp.glob("*")) and not list((registry.home / "artifacts").glob("sha256/*/*"))
    with pytest.raises(NotFound):
        registry.get_model("m")


def test_bad_input_is_refused_before_anything_is_stored(registry: Registry, tmp_path: Path) -> None:
    model = make_linear_model(tmp_path / "lin.onnx")
    with pytest.raises(InvalidInput, match="invalid model name"):
        registry.register(model, "../evil")
    with pytest.raises(InvalidInput, match="does not exist"):
        registry.register(tmp_path / "nope.onnx", "m")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(InvalidInput):
        registry.register(junk, "m")
    with pytest.raises(InvalidInput, match="cannot be set"):
        registry.register(model, "m", alias="latest")
    assert registry.list_models() == []


def test_schema_head_matches_the_migrations(registry: Registry) -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", "maas.registry:migrations")
    assert ScriptDirectory.from_config(cfg).get_current_head() == SCHEMA_HEAD
    assert registry.store.current_revision() == SCHEMA_HEAD


def test_every_migration_goes_down_and_up_again(empty_database_url: str, tmp_path: Path) -> None:
    """Each revision's downgrade removes exactly what its upgrade made, from the head down to an empty database, and
    the registry opened afterwards brings it back to the head and works."""
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine, inspect

    cfg = Config()
    cfg.set_main_option("script_location", "maas.registry:migrations")
    revisions = [r.revision for r in reversed(list(ScriptDirectory.from_config(cfg).walk_revisions()))]
    assert revisions[-1] == SCHEMA_HEAD
    engine = create_engine(empty_database_url)

    def tables() -> set[str]:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}

    def migrate(action: str, revision: str) -> None:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            getattr(command, action)(cfg, revision)

    made: list[set[str]] = []
    for revision in revisions:
        before = tables()
        migrate("upgrade", revision)
        made.append(tables() - before)
        assert made[-1], f"{revision} made no table"
    for revision, new in zip(reversed(revisions), reversed(made), strict=True):
        before = tables()
        migrate("downgrade", "-1")
        assert before - tables() == new, f"the downgrade of {revision}"
    assert tables() == set()
    engine.dispose()

    registry = Registry(empty_database_url, home=tmp_path / "home")
    assert registry.store.current_revision() == SCHEMA_HEAD
    mv = registry.register(make_linear_model(tmp_path / "lin.onnx"), "m", alias="production")
    assert registry.resolve("models:/m").version == mv.version == 1


def test_concurrent_updates_of_one_version_lose_no_tag(registry: Registry, model_files: list[Path]) -> None:
    registry.register(model_files[0], "m")
    writers = [Registry() for _ in range(4)]  # each its own engine, as separate processes would have
    errors: list[BaseException] = []

    def work(i: int, r: Registry) -> None:
        try:
            for j in range(5):
                r.update_version("m", 1, tags={f"w{i}-{j}": "x"}, metrics={f"m{i}": float(j)})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, r)) for i, r in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    mv = registry.get_version("m", 1)
    assert set(mv.tags) == {f"w{i}-{j}" for i in range(4) for j in range(5)}  # each merge saw the one before
    assert mv.metrics == {f"m{i}": 4.0 for i in range(4)}


@pytest.mark.postgres
def test_a_bare_postgresql_url_opens_with_psycopg(postgres_url: str, tmp_path: Path) -> None:
    bare = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    registry = Registry(bare, home=tmp_path / "home")
    assert registry.store.engine.dialect.driver == "psycopg"
    assert registry.register(make_linear_model(tmp_path / "lin.onnx"), "m").version == 1
