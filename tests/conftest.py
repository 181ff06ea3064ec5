"""Shared fixtures. Every test gets its own MAAS_HOME, so nothing touches ~/.maas."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from maas.registry import Registry

TIERS = {"unit", "integration", "e2e", "security", "multihost"}

pytest_plugins = [
    "tests.llm_fixtures",  # smollm_gguf, smollm_dir: the real language model, converted once
    "tests.postgres_fixture",  # postgres_server, postgres_url: a throwaway PostgreSQL server, one database per test
]

#: The databases a module marked ``each_database`` runs its database tests on; select with ``-m postgres``.
DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


#: Per-test limit of tests marked slow that set none of their own: room for a loaded 2-core machine.
SLOW_TIMEOUT_S = 900


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """In a module marked ``each_database``, run every test that reaches ``database_kind`` (through ``database_url``,
    ``empty_database_url`` or ``registry``) once per database."""
    if "database_kind" in metafunc.fixturenames and metafunc.definition.get_closest_marker("each_database"):
        metafunc.parametrize("database_kind", DATABASES, indirect=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by its folder (tests/unit, tests/integration, tests/e2e, tests/security); give slow tests
    a larger time limit than the default unless they set one."""
    for item in items:
        for part in Path(str(item.fspath)).parts:
            if part in TIERS:
                item.add_marker(getattr(pytest.mark, part))
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "maas-home"
    monkeypatch.setenv("MAAS_HOME", str(path))
    monkeypatch.delenv("MAAS_DATABASE_URL", raising=False)
    return path


@pytest.fixture
def database_kind(request: pytest.FixtureRequest) -> str:
    """``sqlite``, or ``postgresql`` where the module is marked ``each_database``."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def database_url(
    request: pytest.FixtureRequest, database_kind: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """This test's registry database: the SQLite file ``Registry()`` opens under MAAS_HOME, or a fresh PostgreSQL
    database at the schema head, then also set as MAAS_DATABASE_URL, so that every ``Registry()`` of the test (and
    every ``maas`` it runs with ``cli_env``'s environment made after this) opens it."""
    if database_kind == "postgresql":
        url: str = request.getfixturevalue("postgres_url")
        monkeypatch.setenv("MAAS_DATABASE_URL", url)
        return url
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'maas.db'}"


@pytest.fixture
def empty_database_url(request: pytest.FixtureRequest, database_kind: str, tmp_path: Path) -> str:
    """A database with no tables yet, for migration tests: a new SQLite file, or a fresh PostgreSQL database."""
    if database_kind == "postgresql":
        url: str = request.getfixturevalue("postgres_empty_url")
        return url
    return f"sqlite:///{tmp_path / 'empty.db'}"


@pytest.fixture
def registry(database_url: str) -> Registry:
    return Registry()


@pytest.fixture
def cli_env(home: Path) -> Iterator[dict[str, str]]:
    """Environment for running the `maas` command in a subprocess against this test's MAAS_HOME."""
    yield {**os.environ, "MAAS_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1"}
