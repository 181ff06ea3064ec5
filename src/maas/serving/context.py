"""What one server process shares between its API families: settings, registry, model manager, metrics, the
inference threads and the serving engine; built once, started and stopped with the server."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from maas.registry import Registry
from maas.serving import memory
from maas.serving.access.control import AccessControl
from maas.serving.budget import InflightBytes
from maas.serving.engine.core import Engine
from maas.serving.llm.engines import Generators
from maas.serving.manager import ModelManager
from maas.serving.metrics import ServerMetrics
from maas.serving.settings import ServerSettings

log = logging.getLogger(__name__)

#: How often schedulers of versions no longer loaded are forgotten.
SWEEP_INTERVAL_S = 5.0


@dataclass
class ServingContext:
    settings: ServerSettings
    registry: Registry
    metrics: ServerMetrics
    manager: ModelManager
    executor: ThreadPoolExecutor
    engine: Engine
    #: Language models' generation engines, one per loaded version (continuous batching).
    generators: Generators
    #: Keys, limits and metering of every request, REST and gRPC.
    access: AccessControl
    #: Request bytes in flight, REST and gRPC together (MAAS_MAX_INFLIGHT_BYTES).
    inflight: InflightBytes = field(default_factory=lambda: InflightBytes(0))
    grpc_server: Any = None
    _sweeper: asyncio.Task[None] | None = None

    @classmethod
    def build(cls, settings: ServerSettings, registry: Registry | None = None) -> ServingContext:
        registry = registry or Registry()
        metrics = ServerMetrics()
        manager = ModelManager(
            registry,
            models=settings.models,
            device=settings.device,
            watch_interval_s=settings.watch_interval_s,
            metrics=metrics,
        )
        executor = ThreadPoolExecutor(max_workers=settings.infer_threads, thread_name_prefix="maas-infer")
        engine = Engine(manager, metrics, executor, settings)
        generators = Generators(settings, metrics, manager)
        inflight = InflightBytes(settings.max_inflight_bytes)
        access = AccessControl(
            registry,
            mode=settings.auth,
            host=settings.host,
            allow_unauthenticated=settings.allow_unauthenticated,
            metrics=metrics.keys,
        )
        return cls(settings, registry, metrics, manager, executor, engine, generators, access, inflight)

    async def start(self) -> None:
        """Start following the registry (models load in the background) and the gRPC endpoint, if configured."""
        memory.tune_allocator()
        memory.freeze_heap()
        self.manager.start()
        await self.access.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        if self.settings.grpc_port is not None:
            from maas.serving.grpc.server import MIN_IDLE_TIMEOUT_S, start_grpc

            self.grpc_server = await start_grpc(
                self.engine,
                self.settings.host,
                self.settings.grpc_port,
                max_message_bytes=self.settings.max_request_bytes,
                reuse_port=self.settings.workers > 1,  # the workers share the port; the supervisor checked it free
                inflight=self.inflight,
                max_connections=self.settings.max_connections,
                header_timeout_s=self.settings.header_timeout_s,
                body_timeout_s=self.settings.body_timeout_s,
                idle_timeout_s=max(self.settings.keepalive_timeout_s, MIN_IDLE_TIMEOUT_S),
                tls=self.settings.tls(),
                access=self.access,
            )

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.engine.sweep()
            self.generators.sweep()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=2)
        await self.generators.close()
        await self.engine.close()
        await self.access.stop()
        self.manager.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
