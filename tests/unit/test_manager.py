"""The model manager and the serving engine in-process, with a runtime whose load we control."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from maas import runtimes
from maas.errors import ArtifactIntegrityError, NotFound, Unavailable
from maas.registry import Registry
from maas.serving.engine.core import Engine
from maas.serving.manager import Loading, ModelManager
from maas.serving.metrics import ServerMetrics
from maas.serving.settings import ServerSettings
from maas.testing.models import make_linear_model
from tests.unit.test_registry import flip_byte


class GatedLoad:
    """Replaces runtimes.load: each load waits until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.real = runtimes.load

    def __call__(self, path: Path, format: str, *, device: str = "cpu", threads: int | None = None) -> runtimes.Runtime:
        assert self.gate.wait(10)
        return self.real(path, format, device=device, threads=threads)


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> GatedLoad:
    g = GatedLoad()
    monkeypatch.setattr(runtimes, "load", g)
    return g


def _manager(registry: Registry) -> ModelManager:
    return ModelManager(registry, watch_interval_s=0.05)


def test_loading_model_is_503_after_the_wait_then_served(registry: Registry, tmp_path: Path, gated: GatedLoad) -> None:
    registry.register(make_linear_model(tmp_path / "a.onnx"), "lin")
    manager = _manager(registry)
    manager.sync()
    assert manager.ready() == (False, "loading models")
    with pytest.raises(Loading):
        manager.lookup("lin")
    assert manager.model_ready("lin", None)[0] is False
    with ThreadPoolExecutor(2) as pool:
        service = Engine(manager, ServerMetrics(), pool, ServerSettings(load_wait_s=0.1))
        with pytest.raises(Unavailable, match="loading"):
            asyncio.run(service.acquire("lin", None))
        gated.gate.set()
        loaded = asyncio.run(service.acquire("lin", None))
    assert loaded.version == 1
    out = loaded.runtime.infer({"x": np.ones((2, 4), np.float32)})
    assert out["y"].shape == (2, 2)


def test_swap_happens_only_after_the_new_version_loaded(registry: Registry, tmp_path: Path, gated: GatedLoad) -> None:
    registry.register(make_linear_model(tmp_path / "a.onnx", seed=1), "lin", alias="production")
    registry.register(make_linear_model(tmp_path / "b.onnx", seed=2), "lin")
    manager = _manager(registry)
    gated.gate.set()
    for ev in manager.sync():
        ev.wait(10)
    assert manager.lookup("lin").version == 1
    gated.gate.clear()
    registry.set_alias("lin", "production", 2)
    events = manager.sync()
    assert manager.lookup("lin").version == 1  # still the old one while 2 loads
    gated.gate.set()
    for ev in events:
        ev.wait(10)
    assert manager.lookup("lin").version == 2
    assert manager.lookup("lin", "1").version == 1  # explicit versions stay reachable


def test_corrupt_model_fails_alone(registry: Registry, tmp_path: Path) -> None:
    bad = registry.register(make_linear_model(tmp_path / "a.onnx"), "bad")
    registry.register(make_linear_model(tmp_path / "b.onnx", seed=2), "good")
    flip_byte(registry.artifacts.local_path(bad.artifact_digest))
    manager = _manager(registry)
    for ev in manager.sync():
        ev.wait(10)
    with pytest.raises(ArtifactIntegrityError, match="digest mismatch"):
        manager.lookup("bad")
    assert manager.lookup("good").version == 1
    ok, why = manager.model_ready("bad", None)
    assert not ok and "digest mismatch" in why
    with pytest.raises(NotFound):
        manager.lookup("missing")
    with pytest.raises(NotFound):
        manager.lookup("good", "5")


def test_deleted_and_reregistered_model_is_not_served_from_a_stale_cache(registry: Registry, tmp_path: Path) -> None:
    first = registry.register(make_linear_model(tmp_path / "a.onnx", seed=1), "m")
    manager = _manager(registry)
    for ev in manager.sync():
        ev.wait(10)
    assert manager.lookup("m").version_info.artifact_digest == first.artifact_digest
    registry.delete_model("m")
    second = registry.register(make_linear_model(tmp_path / "b.onnx", seed=2), "m")
    assert second.version == 1 and second.artifact_digest != first.artifact_digest
    for ev in manager.sync():
        ev.wait(10)
    assert manager.lookup("m").version_info.artifact_digest == second.artifact_digest
    assert manager.lookup("m", "1").version_info.artifact_digest == second.artifact_digest


def test_deleted_version_is_no_longer_served(registry: Registry, tmp_path: Path) -> None:
    registry.register(make_linear_model(tmp_path / "a.onnx", seed=1), "m")
    registry.register(make_linear_model(tmp_path / "b.onnx", seed=2), "m")
    manager = _manager(registry)
    manager.sync()
    assert manager.acquire_blocking("m", "1").version == 1
    registry.delete_version("m", 1)
    manager.sync()
    with pytest.raises(NotFound):
        manager.lookup("m", "1")


def test_failed_explicit_version_recovers_once_the_artifact_is_restored(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import maas.serving.manager.loading as manager_module

    monkeypatch.setattr(manager_module, "RETRY_FAILED_S", 0.3)
    mv = registry.register(make_linear_model(tmp_path / "a.onnx"), "m")
    path = registry.artifacts.local_path(mv.artifact_digest)
    good = path.read_bytes()
    flip_byte(path)
    manager = _manager(registry)
    with pytest.raises(ArtifactIntegrityError):
        manager.acquire_blocking("m", "1")
    path.write_bytes(good)
    with pytest.raises(ArtifactIntegrityError):  # failures are remembered for RETRY_FAILED_S
        manager.acquire_blocking("m", "1")
    time.sleep(0.4)
    assert manager.acquire_blocking("m", "1").version == 1


def test_a_model_not_served_here_reads_as_missing(registry: Registry, tmp_path: Path) -> None:
    registry.register(make_linear_model(tmp_path / "a.onnx"), "a")
    registry.register(make_linear_model(tmp_path / "b.onnx"), "b")
    manager = ModelManager(registry, models=["a"], watch_interval_s=0.05)
    with pytest.raises(NotFound) as served_elsewhere:
        manager.check_served("b")
    with pytest.raises(NotFound) as absent:
        manager.check_served("zzz")
    # The same words as a model that does not exist: the list of served models is not a client's to learn.
    assert str(served_elsewhere.value).replace("'b'", "?") == str(absent.value).replace("'zzz'", "?")
    assert "'a'" not in str(served_elsewhere.value)
