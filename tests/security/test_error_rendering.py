"""Errors never carry the server's internals to a client: a bug is a 500 with a request id only, a model
that fails on a request is a 400 in the model's words without server paths, and a version that cannot load
is a 503 without them."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from maas import runtimes
from maas.errors import InvalidInput, Unavailable
from maas.registry import Registry
from maas.serving import errors
from maas.serving.budget import InflightBytes
from maas.serving.engine.core import Engine, guarded_run
from maas.serving.guard import RequestGuard
from maas.serving.manager import ModelManager
from maas.serving.metrics import ServerMetrics
from maas.serving.settings import ServerSettings
from maas.testing.models import make_linear_model

SECRET = "/srv/maas-home/artifacts/sha256/ab/secret-file.onnx"


def test_public_message_hides_paths_and_bounds_length() -> None:
    text = errors.public_message(f"cannot open {SECRET}: no such file\n  at C:\\Users\\me\\model.onnx " + "x" * 2000)
    assert "/srv" not in text and "Users" not in text and "\n" not in text
    assert text.count("<path>") == 2 and len(text) <= 600


def test_a_bug_is_a_500_with_the_request_id_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> None:
        raise KeyError(SECRET)

    errors.install(app)
    app.add_middleware(RequestGuard, max_body_bytes=1024, body_timeout_s=5, inflight=InflightBytes(1 << 20))
    with caplog.at_level(logging.ERROR), TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom", headers={"X-Request-ID": "req-42"})
    assert r.status_code == 500
    message = r.json()["error"]
    assert "req-42" in message and "secret" not in message and "KeyError" not in message
    assert r.headers["x-request-id"] == "req-42"
    assert any("req-42" in rec.getMessage() and rec.exc_info for rec in caplog.records)


class _Failing:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def infer(self, inputs: Any, outputs: Any = None) -> dict[str, np.ndarray]:
        raise self.exc

    def close(self) -> None:
        pass


def test_a_model_failing_on_a_request_is_400_without_paths(registry: Registry, tmp_path: Path) -> None:
    from maas.serving.api.v2 import protocol
    from maas.serving.manager import LoadedModel

    mv = registry.register(make_linear_model(tmp_path / "m.onnx"), "lin")
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}'
    request = protocol.decode_request(body, None, mv.signature)
    failing = LoadedModel(mv, _Failing(RuntimeError(f"shape mismatch in {SECRET} line 3")), 0.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput) as info:
        guarded_run(failing)(request.inputs, request.requested_outputs)
    assert "shape mismatch" in str(info.value) and "/srv" not in str(info.value)
    oom = LoadedModel(mv, _Failing(MemoryError()), 0.0)  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match="out of memory"):
        guarded_run(oom)(request.inputs, request.requested_outputs)


def test_a_version_that_cannot_load_is_503_without_paths(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.register(make_linear_model(tmp_path / "m.onnx"), "lin")

    def broken(path: Path, format: str, *, device: str = "cpu", threads: int | None = None) -> Any:
        raise InvalidInput(f"onnxruntime cannot load {path}: unknown operator in {SECRET}")

    monkeypatch.setattr(runtimes, "load", broken)
    manager = ModelManager(registry, watch_interval_s=0.05)
    for event in manager.sync():
        event.wait(10)
    with pytest.raises(Unavailable) as info:
        manager.lookup("lin")
    message = str(info.value)
    assert "cannot be loaded" in message and "unknown operator" in message
    assert str(tmp_path) not in message and "/srv" not in message and str(registry.home) not in message
    ready, why = manager.model_ready("lin", "1")
    assert not ready and "/srv" not in why
    with ThreadPoolExecutor(1) as pool:
        service = Engine(manager, ServerMetrics(), pool, ServerSettings(load_wait_s=0.1))
        with pytest.raises(Unavailable):
            asyncio.run(service.acquire("lin", None))


def test_reading_readiness_of_an_old_version_does_not_load_it(registry: Registry, tmp_path: Path) -> None:
    registry.register(make_linear_model(tmp_path / "a.onnx", seed=1), "lin")
    registry.register(make_linear_model(tmp_path / "b.onnx", seed=2), "lin")
    manager = ModelManager(registry, watch_interval_s=0.05)
    for event in manager.sync():
        event.wait(10)
    assert manager.loaded_versions() == {"lin": [2]}
    ready, why = manager.model_ready("lin", "1")
    assert not ready and "first inference request" in why
    assert manager.loaded_versions() == {"lin": [2]}
    assert manager.model_ready("lin", "2") == (True, "")


class _Panic(BaseException):
    """What a Rust extension (tokenizers, safetensors) raises when it panics: not an ``Exception``."""


def test_a_panicking_model_is_400_and_a_panic_anywhere_is_a_json_500(registry: Registry, tmp_path: Path) -> None:
    from maas.serving.api.v2 import protocol
    from maas.serving.manager import LoadedModel

    mv = registry.register(make_linear_model(tmp_path / "m.onnx"), "lin")
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}'
    request = protocol.decode_request(body, None, mv.signature)
    panicking = LoadedModel(mv, _Failing(_Panic("regex retry-limit-in-match over")), 0.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="retry-limit"):
        guarded_run(panicking)(request.inputs, request.requested_outputs)

    app = FastAPI()

    @app.get("/panic")
    async def panic() -> None:
        raise _Panic("boom at " + SECRET)

    errors.install(app)
    app.add_middleware(RequestGuard, max_body_bytes=1024, body_timeout_s=5, inflight=InflightBytes(1 << 20))
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/panic")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert "request id" in r.json()["error"] and "boom" not in r.json()["error"]
