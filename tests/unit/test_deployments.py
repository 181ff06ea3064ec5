"""Deployments: the rules of their values, the store on SQLite and PostgreSQL (revisions, undeploy, cascade), the
file form and the migration."""

import json
import math
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from maas.errors import InvalidInput, NotFound
from maas.registry import Deployment, Registry
from maas.registry.deployments import SETTINGS, check_deployment, defaults, merge_deployment, read_deployments
from maas.registry.sql.engine import SCHEMA_HEAD
from maas.testing.models import make_linear_model

pytestmark = pytest.mark.each_database  # every test that opens a database: on SQLite and on PostgreSQL


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_linear_model(tmp_path_factory.mktemp("m") / "linear.onnx")


@pytest.fixture
def reg(registry: Registry, model_file: Path) -> Registry:
    """A registry holding the models `a` and `b`."""
    registry.register(model_file, "a")
    registry.register(model_file, "b")
    return registry


# --- the rules ---------------------------------------------------------------------------------


def test_defaults_are_the_entity_defaults() -> None:
    d = Deployment("m")
    assert defaults() == {
        "max_batch_size": 1,
        "max_queue_delay_ms": 0.0,
        "preferred_batch_sizes": (),
        "max_queue_size": 256,
        "instances": 1,
        "threads": None,
    }
    assert (d.revision, d.updated_at) == (0, None)
    assert check_deployment(d) == d
    expected = {"name": "m", **defaults(), "preferred_batch_sizes": [], "revision": 0, "updated_at": None}
    assert json.loads(json.dumps(d.to_dict())) == expected


def test_values_are_normalised() -> None:
    d = merge_deployment(Deployment("m"), {"max_batch_size": 32, "preferred_batch_sizes": [32, 8, 16, 8]})
    assert d.preferred_batch_sizes == (8, 16, 32)
    d = merge_deployment(d, {"max_queue_delay_ms": 5, "threads": 4, "instances": 64})
    assert d.max_queue_delay_ms == 5.0 and isinstance(d.max_queue_delay_ms, float)
    assert (d.threads, d.instances, d.max_batch_size) == (4, 64, 32)
    edges = {"max_batch_size": 4096, "max_queue_delay_ms": 10_000, "max_queue_size": 1_000_000, "threads": 256}
    assert merge_deployment(Deployment("m"), edges).max_queue_size == 1_000_000


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be from 1 to 4096, got 0"),
        ({"max_batch_size": 4097}, "max_batch_size must be from 1 to 4096, got 4097"),
        ({"max_batch_size": "8"}, "max_batch_size must be an integer from 1 to 4096, got '8'"),
        ({"max_batch_size": 2.5}, "max_batch_size must be an integer from 1 to 4096, got 2.5"),
        ({"instances": True}, "instances must be an integer from 1 to 64, got True"),
        ({"instances": 65}, "instances must be from 1 to 64, got 65"),
        ({"max_queue_size": 0}, "max_queue_size must be from 1 to 1000000, got 0"),
        ({"threads": 0}, "threads must be from 1 to 256, got 0"),
        ({"threads": 257}, "threads must be from 1 to 256, got 257"),
        ({"max_queue_delay_ms": -1}, "max_queue_delay_ms must be from 0 to 10000 milliseconds, got -1"),
        ({"max_queue_delay_ms": 10_001}, "max_queue_delay_ms must be from 0 to 10000 milliseconds, got 10001"),
        ({"max_queue_delay_ms": math.nan}, "max_queue_delay_ms must be from 0 to 10000 milliseconds, got nan"),
        ({"max_queue_delay_ms": "5"}, "max_queue_delay_ms must be a number of milliseconds from 0 to 10000, got '5'"),
        ({"preferred_batch_sizes": "8,16"}, "preferred_batch_sizes must be a list of integers"),
        ({"preferred_batch_sizes": [0, 8]}, "preferred_batch_sizes [0, 8]: each size must be from 1 to 4096, got 0"),
        ({"preferred_batch_sizes": [8, 16]}, "preferred_batch_sizes [8, 16] has 16, above max_batch_size 1"),
        (
            {"max_batch_size": 8, "preferred_batch_sizes": [4, 32]},
            "preferred_batch_sizes [4, 32] has 32, above max_batch_size 8",
        ),
    ],
)
def test_a_bad_value_names_the_setting_the_value_and_the_range(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        merge_deployment(Deployment("m"), changes)
    assert message in str(caught.value)


def test_unknown_settings_are_refused_with_the_valid_ones() -> None:
    with pytest.raises(InvalidInput, match=r"'max_batch' is not a deployment setting \(did you mean 'max_batch_size'"):
        merge_deployment(Deployment("m"), {"max_batch": 8})
    with pytest.raises(InvalidInput, match="the settings: " + ", ".join(SETTINGS)):
        merge_deployment(Deployment("m"), {"revision": 7})


# --- the store ---------------------------------------------------------------------------------


def test_deploy_round_trips_through_the_database(reg: Registry, home: Path) -> None:
    assert reg.get_deployment("a") == Deployment("a")
    assert reg.list_deployments() == []
    d = reg.deploy("a", max_batch_size=32, max_queue_delay_ms=2.5, preferred_batch_sizes=[16, 8], threads=3)
    assert (d.max_batch_size, d.max_queue_delay_ms, d.preferred_batch_sizes, d.threads) == (32, 2.5, (8, 16), 3)
    assert (d.max_queue_size, d.instances, d.revision) == (256, 1, 1)
    assert d.updated_at is not None and d.updated_at.tzinfo is not None
    other = Registry()  # another connection to the same file: what a server process sees
    assert other.get_deployment("a") == d
    assert other.list_deployments() == [d]
    assert other.get_deployment("b") == Deployment("b")


def test_the_revision_counts_each_change_once(reg: Registry) -> None:
    assert reg.deploy("a", max_batch_size=8).revision == 1
    assert reg.deploy("a", instances=2).revision == 2
    same = reg.deploy("a", instances=2, max_batch_size=8)  # changes nothing
    assert same.revision == 2 and same == reg.get_deployment("a")
    with pytest.raises(InvalidInput, match="instances must be from 1 to 64"):
        reg.deploy("a", max_batch_size=16, instances=0)
    assert reg.get_deployment("a") == same  # a refused deploy changes nothing, the valid setting neither
    merged = reg.deploy("a", threads=2)
    assert (merged.max_batch_size, merged.instances, merged.threads, merged.revision) == (8, 2, 2, 3)
    assert reg.deploy("a", threads=None).threads is None
    reset = reg.deploy("a", reset=True, max_queue_size=10)
    assert reset == Deployment("a", max_queue_size=10, revision=5, updated_at=reset.updated_at)


def test_undeploy_goes_back_to_the_defaults_and_revisions_keep_counting(reg: Registry) -> None:
    reg.deploy("a", max_batch_size=8)
    reg.deploy("b", instances=2)
    assert [d.name for d in reg.list_deployments()] == ["a", "b"]
    assert reg.undeploy("a") is True
    assert reg.undeploy("a") is False
    assert reg.get_deployment("a") == Deployment("a")
    assert [d.name for d in reg.list_deployments()] == ["b"]
    # A server that still holds revision 1 of `a` must see the next deployment as new.
    again = reg.deploy("a", max_batch_size=8)
    assert again.revision > 1 and again.max_batch_size == 8


def test_unknown_models_are_not_found(reg: Registry) -> None:
    for call in (
        lambda: reg.deploy("nope", max_batch_size=2),
        lambda: reg.get_deployment("nope"),
        lambda: reg.undeploy("nope"),
    ):
        with pytest.raises(NotFound, match="model 'nope' is not registered"):
            call()
    with pytest.raises(InvalidInput):
        reg.deploy("../etc", max_batch_size=2)


def test_a_deleted_model_takes_its_deployment_along(reg: Registry, model_file: Path) -> None:
    reg.deploy("a", max_batch_size=8)
    reg.deploy("b", max_batch_size=4)
    reg.delete_model("a")
    with reg.store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM deployments")).scalar() == 1
    assert [d.name for d in reg.list_deployments()] == ["b"]
    reg.register(model_file, "a")
    assert reg.get_deployment("a") == Deployment("a")


def test_concurrent_deploys_get_one_revision_each(reg: Registry) -> None:
    writers = [Registry() for _ in range(6)]  # each its own engine, as separate processes would have
    errors: list[BaseException] = []

    def work(i: int, r: Registry) -> None:
        try:
            for j in range(3):
                r.deploy("a", max_queue_size=1000 + 10 * i + j)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, r)) for i, r in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert reg.get_deployment("a").revision == 18


# --- the file form -----------------------------------------------------------------------------


def test_a_file_of_one_or_several_deployments(tmp_path: Path) -> None:
    one = tmp_path / "one.yaml"
    one.write_text("name: a\nmax_batch_size: 16\npreferred_batch_sizes: [8, 4]\nthreads: default\n")
    assert read_deployments(one) == [("a", {"max_batch_size": 16, "preferred_batch_sizes": [4, 8], "threads": None})]
    many = tmp_path / "many.yaml"
    many.write_text("deployments:\n  - name: a\n    instances: 2\n  - name: b\n    max_queue_delay_ms: 3\n")
    assert read_deployments(many) == [("a", {"instances": 2}), ("b", {"max_queue_delay_ms": 3.0})]
    bare = tmp_path / "bare.yaml"
    bare.write_text("- name: a\n  threads: 4\n")
    assert read_deployments(bare) == [("a", {"threads": 4})]


@pytest.mark.parametrize(
    ("content", "messages"),
    [
        (
            "name: a\nmax_batch_size: 8\nmax_qeue_size: 3\n",
            ["line 3: unknown key 'max_qeue_size' (did you mean 'max_queue_size'?)", "valid keys: name, max_batch"],
        ),
        (
            "deployments:\n  - name: a\n  - name: b\n    instances: 0\n    threads: lots\n",
            [
                "line 4: deployments.1.instances: must be from 1 to 64, got 0",
                "line 5: deployments.1.threads: must be an integer from 1 to 256, or 'default'",
            ],
        ),
        ("max_batch_size: 2\n", ["missing key 'name'"]),
        ("deployments:\n  - name: a\n  - name: a\n", ["line 3: model 'a' is deployed twice"]),
        ("", ["must be a YAML mapping", "it is empty"]),
    ],
)
def test_file_mistakes_name_the_line_and_the_fix(tmp_path: Path, content: str, messages: list[str]) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(content)
    with pytest.raises(InvalidInput) as caught:
        read_deployments(path)
    for message in messages:
        assert message in str(caught.value)


# --- the migration -----------------------------------------------------------------------------


def _alembic(url: str, action: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "maas.registry:migrations")
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, revision)
    engine.dispose()


def test_the_migration_goes_down_and_up(empty_database_url: str, tmp_path: Path, model_file: Path) -> None:
    url = empty_database_url
    reg = Registry(url, home=tmp_path / "home")
    reg.register(model_file, "a")
    reg.deploy("a", max_batch_size=8)
    reg.store.engine.dispose()

    _alembic(url, "downgrade", "0003_run_evals")
    engine = create_engine(url)
    assert "deployments" not in inspect(engine).get_table_names()
    engine.dispose()

    reg = Registry(url, home=tmp_path / "home")  # brings the schema back up to head
    assert reg.store.current_revision() == SCHEMA_HEAD
    assert [m.name for m in reg.list_models()] == ["a"]
    assert reg.get_deployment("a") == Deployment("a")
    assert reg.deploy("a", instances=3).revision == 1
