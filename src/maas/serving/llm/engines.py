"""The generation engines of one server: one per loaded causal-language-model version, started on its first request
and stopped once the model manager has let that version go (an alias moved, the version was deleted, it idled out)."""

from __future__ import annotations

import logging
from typing import Any

from maas.errors import InvalidInput
from maas.serving.llm.engine import BatchingEngine, EngineLimits
from maas.serving.manager import ModelManager
from maas.serving.manager.loading import LoadedModel
from maas.serving.metrics import ServerMetrics
from maas.serving.settings import ServerSettings

log = logging.getLogger(__name__)


def is_generative(runtime: Any) -> bool:
    """Whether a loaded runtime is a causal language model the engine can drive."""
    model = getattr(runtime, "model", None)
    return callable(getattr(model, "decode", None)) and callable(getattr(model, "prefill", None))


class Generators:
    def __init__(self, settings: ServerSettings, metrics: ServerMetrics, manager: ModelManager) -> None:
        self.limits = EngineLimits(
            max_running=settings.llm_max_batch,
            max_queue=settings.llm_max_queue,
            kv_cache_bytes=settings.llm_kv_cache_mb << 20,
            threads=settings.llm_threads,
            stall_timeout_s=settings.write_timeout_s,
        )
        self._metrics = metrics
        self._manager = manager
        self._engines: dict[LoadedModel, BatchingEngine] = {}

    def get(self, loaded: LoadedModel) -> BatchingEngine:
        """The engine of ``loaded`` (started now if this is its first request). ``InvalidInput`` when the model is
        not a causal language model."""
        engine = self._engines.get(loaded)
        if engine is not None and engine.alive:
            return engine
        if engine is not None:
            log.error("the generation engine of %s version %d stopped; starting another", loaded.name, loaded.version)
        runtime = loaded.runtime
        if not is_generative(runtime):
            raise InvalidInput(
                f"model {loaded.name!r} (format {loaded.version_info.format}) is not a causal language model; "
                "chat and completions serve causal_lm models (embedding models answer /v1/embeddings)"
            )
        model = runtime.model  # type: ignore[attr-defined]
        engine = BatchingEngine(
            model,
            int(model.cfg.vocab_size),
            limits=self.limits,
            kv_bytes_per_token=int(model.kv_bytes_per_token),
            observer=self._metrics.llm.observer(loaded.name, str(loaded.version)),
            name=f"{loaded.name}-{loaded.version}",
        )
        self._engines[loaded] = engine
        log.info("generation engine started for %s version %d", loaded.name, loaded.version)
        return engine

    def engines(self) -> dict[LoadedModel, BatchingEngine]:
        return dict(self._engines)

    def sweep(self) -> None:
        """Stop the engines of versions the manager no longer holds, once nothing runs or waits in them."""
        for loaded, engine in list(self._engines.items()):
            if not self._manager.holds(loaded) and engine.running == 0 and engine.queued == 0:
                engine.stop()
                del self._engines[loaded]
                log.info("generation engine stopped for %s version %d", loaded.name, loaded.version)

    async def close(self) -> None:
        engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            await engine.close()
