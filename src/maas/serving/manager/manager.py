"""The lookups a request makes, over the loader and the watcher.

:meth:`ModelManager.find` answers from memory only (no database, no waiting), so the event loop can call it for
every request; anything it cannot answer goes to :meth:`ModelManager.lookup` in a thread.
"""

from __future__ import annotations

import threading
import time

from maas import envs
from maas.errors import InvalidInput, MaasError, NotFound, Unavailable
from maas.registry import ModelVersion, Registry
from maas.registry.entities import Deployment
from maas.registry.uri import parse_version
from maas.serving.access.context import not_registered
from maas.serving.manager.loading import LoadedModel, Loader, Loading
from maas.serving.manager.watching import Watcher
from maas.serving.metrics import ServerMetrics


class ModelManager:
    def __init__(
        self,
        registry: Registry,
        *,
        models: list[str] | None = None,
        device: str = "cpu",
        watch_interval_s: float = 0.5,
        metrics: ServerMetrics | None = None,
        load_workers: int = 2,
        default_threads: int | None = None,
    ) -> None:
        self.registry = registry
        self.only = set(models) if models else None
        self.metrics = metrics or ServerMetrics()
        self.loader = Loader(registry, device=device, metrics=self.metrics, load_workers=load_workers)
        threads = default_threads if default_threads is not None else envs.MAAS_RUNTIME_THREADS
        self.watcher = Watcher(
            registry,
            self.loader,
            only=self.only,
            interval_s=watch_interval_s,
            metrics=self.metrics,
            default_threads=threads or None,
        )

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start following the registry; loading happens in the background (see :meth:`ready`)."""
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()
        self.loader.shutdown()

    def ready(self) -> tuple[bool, str]:
        return self.watcher.ready()

    def sync(self) -> list[threading.Event]:
        return self.watcher.sync()

    def deployment(self, name: str) -> Deployment:
        return self.watcher.deployment(name)

    # --- requests ------------------------------------------------------------------------------

    def find(self, name: str, version: str | None = None) -> LoadedModel | None:
        """The loaded model a request should use, if memory alone can tell (else None: ask :meth:`lookup`)."""
        if version is None:
            served = self.watcher.served.get(name)
            return served.current if served is not None else None
        try:
            key = (name, int(version), self.watcher.threads_for(name))
        except ValueError:
            return None
        slot = self.loader.slots.get(key)
        if slot is None or slot.loaded is None:
            return None
        slot.last_used = time.monotonic()
        return slot.loaded

    def lookup(self, name: str, version: str | None = None) -> LoadedModel:
        """The loaded model a request should use, without blocking: raises ``Loading`` (wait on its event and call
        again), ``NotFound``, or the load error (e.g. the digest mismatch). May read the registry."""
        if version is None:
            with self.loader.lock:
                served = self.watcher.served.get(name)
                if served is not None and served.current is not None:
                    return served.current
                if served is not None and served.target is not None:
                    return self.loader.take(self.loader.slot(served.target), _uri(name, served.target[1]))
                if served is not None:
                    raise NotFound(f"model {name!r} has no versions to serve")
            self.check_served(name)
            # Registered after the last sync: pick it up now rather than on the next tick.
            self.sync()
            return self.lookup_after_sync(name)
        number = parse_version(version)
        key = (name, number, self.watcher.threads_for(name))
        with self.loader.lock:
            slot = self.loader.slots.get(key)
            known = slot is not None and not slot.retry_due()
        if not known:
            self.check_served(name)
            self.registry.get_version(name, number)  # NotFound for an unknown version
        with self.loader.lock:
            slot = self.loader.slot(key)
        return self.loader.take(slot, _uri(name, number))

    def lookup_after_sync(self, name: str) -> LoadedModel:
        with self.loader.lock:
            served = self.watcher.served.get(name)
            if served is None or served.target is None:
                raise NotFound(f"model {name!r} has no versions to serve")
            if served.current is not None:
                return served.current
            return self.loader.take(self.loader.slot(served.target), _uri(name, served.target[1]))

    def acquire_blocking(self, name: str, version: str | None, wait_s: float = 30.0) -> LoadedModel:
        """:meth:`lookup`, waiting up to ``wait_s`` for a load (for callers outside the event loop)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.lookup(name, version)
            except Loading as loading:
                if not loading.event.wait(max(0.0, deadline - time.monotonic())):
                    raise Unavailable(f"{loading.what} is loading; retry shortly") from None

    def check_served(self, name: str) -> None:
        if self.only is not None and name not in self.only:
            # Word for word a missing model's answer: the list of served models is not a client's to learn.
            raise not_registered(name)
        self.registry.get_model(name)  # NotFound naming `maas models list`

    def serving_version(self, name: str) -> ModelVersion | None:
        """The version a bare name is being served at right now, if one is loaded."""
        served = self.watcher.served.get(name)
        return served.current.version_info if served is not None and served.current is not None else None

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a model this server serves (safe to use as a metrics label)."""
        return name in self.watcher.served

    def model_ready(self, name: str, version: str | None) -> tuple[bool, str]:
        """Whether the model (a bare name: the version it means) is loaded, and why not. Never starts a load of an
        explicit version: that happens on its first inference request."""
        try:
            if version is not None:
                return self._version_ready(name, version)
            self.lookup(name, version)
            return True, ""
        except Loading as loading:
            return False, f"{loading.what} is loading"
        except MaasError as exc:
            if isinstance(exc, (NotFound, InvalidInput)):
                raise
            return False, str(exc)

    def _version_ready(self, name: str, version: str) -> tuple[bool, str]:
        number = parse_version(version)
        with self.loader.lock:
            slot = self.loader.slots.get((name, number, self.watcher.threads_for(name)))
        if slot is None:
            self.check_served(name)
            self.registry.get_version(name, number)  # NotFound for an unknown version
            return False, f"models:/{name}/{number} is not loaded; it loads on its first inference request"
        self.loader.take(slot, _uri(name, number))
        return True, ""

    def holds(self, loaded: LoadedModel) -> bool:
        """Whether ``loaded`` is still one of the manager's (not unloaded, deleted or replaced)."""
        served = self.watcher.served.get(loaded.name)
        if served is not None and served.current is loaded:
            return True
        slot = self.loader.slots.get((loaded.name, loaded.version, loaded.threads))
        return slot is not None and slot.loaded is loaded

    def loaded_versions(self) -> dict[str, list[int]]:
        return self.loader.loaded_versions()


def _uri(name: str, version: int) -> str:
    return f"models:/{name}/{version}"
