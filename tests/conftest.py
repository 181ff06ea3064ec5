"""Shared fixtures. Every test gets its own MAAS_HOME, so nothing touches ~/.maas."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from maas.registry import Registry

TIERS = {"unit", "integration", "e2e", "security"}

pytest_plugins = ["tests.llm_fixtures"]  # smollm_gguf, smollm_dir: the real language model, converted once


#: Per-test limit of tests marked slow that set none of their own: room for a loaded 2-core machine.
SLOW_TIMEOUT_S = 900


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
def registry(home: Path) -> Registry:
    return Registry()


@pytest.fixture
def cli_env(home: Path) -> Iterator[dict[str, str]]:
    """Environment for running the `maas` command in a subprocess against this test's MAAS_HOME."""
    yield {**os.environ, "MAAS_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1"}
