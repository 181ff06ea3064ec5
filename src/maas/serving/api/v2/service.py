"""Open Inference Protocol v2 operations, independent of the web framework: the router calls these."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from maas import __version__
from maas.errors import MaasError, Unavailable
from maas.registry import validate_name
from maas.registry.uri import parse_version
from maas.serving.api.v2 import protocol
from maas.serving.manager import LoadedModel, Loading, ModelManager
from maas.serving.metrics import UNKNOWN, ServerMetrics

EXTENSIONS = ["binary_tensor_data"]


class V2Service:
    def __init__(
        self, manager: ModelManager, metrics: ServerMetrics, executor: ThreadPoolExecutor, load_wait_s: float
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.executor = executor
        self.load_wait_s = load_wait_s

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "maas", "version": __version__, "extensions": EXTENSIONS}

    async def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        validate_name(name)

        def work() -> dict[str, Any]:
            reg = self.manager.registry
            self.manager.check_served(name)
            if version is None:
                mv = self.manager.serving_version(name) or reg.resolve(name)
            else:
                mv = reg.get_version(name, parse_version(version))
            versions = [str(v.version) for v in reg.list_versions(name)]
            return protocol.model_metadata(name, versions, mv.format, mv.signature) | {"version": str(mv.version)}

        result: dict[str, Any] = await self._run(work)
        return result

    async def model_ready(self, name: str, version: str | None) -> tuple[bool, str]:
        validate_name(name)
        result: tuple[bool, str] = await self._run(self.manager.model_ready, name, version)
        return result

    async def acquire(self, name: str, version: str | None) -> LoadedModel:
        """The loaded model for a request; waits (without holding a thread) up to ``load_wait_s`` for a
        load in progress, then answers 503."""
        deadline = time.monotonic() + self.load_wait_s
        while True:
            try:
                loaded: LoadedModel = await self._run(self.manager.lookup, name, version)
                return loaded
            except Loading as loading:
                while not loading.event.is_set():
                    if time.monotonic() >= deadline:
                        raise Unavailable(f"{loading.what} is loading; retry shortly") from None
                    await asyncio.sleep(0.01)

    async def infer(
        self, name: str, version: str | None, body: bytes, header_length: int | None
    ) -> tuple[bytes, dict[str, str]]:
        started = time.perf_counter()
        label_name, label_version = UNKNOWN, ""
        try:
            validate_name(name)
            if self.manager.knows(name):
                label_name = name
            loaded = await self.acquire(name, version)
            label_name, label_version = loaded.name, str(loaded.version)
            result: tuple[bytes, dict[str, str]] = await self._run(self._infer, loaded, body, header_length)
        except BaseException as exc:
            self.metrics.observe_request(label_name, label_version, time.perf_counter() - started, exc)
            raise
        self.metrics.observe_request(label_name, label_version, time.perf_counter() - started, None)
        return result

    @staticmethod
    def _infer(loaded: LoadedModel, body: bytes, header_length: int | None) -> tuple[bytes, dict[str, str]]:
        req = protocol.decode_request(body, header_length, loaded.version_info.signature)
        try:
            outputs = loaded.runtime.infer(req.inputs, req.requested_outputs)
        except MaasError:
            raise
        except Exception as exc:  # the runtime refused inputs the signature allowed, or the model itself failed
            raise MaasError(
                f"{loaded.version_info.uri} failed to run on this request: {type(exc).__name__}: {exc}"
            ) from exc
        return protocol.encode_response(loaded.name, str(loaded.version), req.id, outputs, req.binary)
