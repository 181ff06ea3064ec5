"""Following the registry: which version each bare model name means (aliases, rollbacks, new versions) and how
each model is deployed (batching, instances, threads).

A thread polls the registry every ``interval_s``. When what a name should run changes (another version, or
another thread count from its deployment), the new runtime is loaded in the background and only then made
current; requests already running keep the runtime they started with, so no request fails during a swap and
each response names the version that computed it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

from maas.registry import Registry
from maas.registry.entities import Deployment
from maas.serving.manager.loading import Key, LoadedModel, Loader
from maas.serving.metrics import ServerMetrics

log = logging.getLogger(__name__)


@dataclass
class Served:
    """What a bare model name is served at."""

    name: str
    target: Key | None = None  # what it should run (from the registry and its deployment)
    current: LoadedModel | None = None  # what it runs now; switches once ``target`` has loaded


class Watcher:
    def __init__(
        self,
        registry: Registry,
        loader: Loader,
        *,
        only: set[str] | None,
        interval_s: float,
        metrics: ServerMetrics,
        default_threads: int | None,
    ) -> None:
        self.registry = registry
        self.loader = loader
        self.only = only
        self.interval_s = interval_s
        self.metrics = metrics
        self.default_threads = default_threads
        self.served: dict[str, Served] = {}  # guarded by loader.lock
        #: Stored deployments by name; replaced whole on each sync (readers need no lock).
        self.deployments: dict[str, Deployment] = {}
        self._sync_lock = threading.Lock()  # one sync at a time, so an older snapshot never lands after a newer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._initial_done = threading.Event()
        self._initial_error: str | None = None
        loader.on_loaded = self._on_loaded

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="maas-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def ready(self) -> tuple[bool, str]:
        """Ready once the first sync has run and every model it found has finished loading (or failed: a broken
        model must not keep the others from being served)."""
        if not self._initial_done.is_set():
            return False, self._initial_error or "loading models"
        return True, ""

    def _watch(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                waits = self.sync()
                if first:
                    for ev in waits:
                        ev.wait()
                    first = False
                    self._initial_done.set()
                self._evict()
            except Exception as exc:  # a database hiccup must not kill the watcher
                # Readiness is answered to anyone: the database's own words (its host, user, SQL) stay in the log.
                self._initial_error = f"cannot read the registry ({type(exc).__name__}); the server's log has details"
                log.exception("registry sync failed")
            self._stop.wait(self.interval_s)

    # --- deployments ---------------------------------------------------------------------------

    def deployment(self, name: str) -> Deployment:
        """How ``name`` is deployed: its stored deployment, else the defaults (revision 0)."""
        return self.deployments.get(name) or Deployment(name)

    def threads_for(self, name: str) -> int | None:
        dep = self.deployments.get(name)
        return dep.threads if dep is not None and dep.threads is not None else self.default_threads

    # --- following the registry ----------------------------------------------------------------

    def sync(self) -> list[threading.Event]:
        """Read what each bare name should run and start loading whatever is new; returns the events of loads
        started or in progress."""
        with self._sync_lock:
            return self._sync()

    def _sync(self) -> list[threading.Event]:
        targets = {t.name: t for t in self.registry.serving_targets() if self.only is None or t.name in self.only}
        digests = self.registry.version_digests()
        self.deployments = {d.name: d for d in self.registry.list_deployments()}
        events = []
        with self.loader.lock:
            self.loader.drop_stale(digests)
            for served in self.served.values():
                cur = served.current
                if cur is not None and digests.get((served.name, cur.version)) != cur.version_info.artifact_digest:
                    served.current = None
            for name in list(self.served):
                if name not in targets:
                    del self.served[name]
                    with contextlib.suppress(KeyError):
                        self.metrics.serving.remove(name)
            for name, t in targets.items():
                served = self.served.setdefault(name, Served(name))
                if t.version is None:
                    served.target = None
                    continue
                served.target = (name, t.version, self.threads_for(name))
                slot = self.loader.slot(served.target)
                if slot.loaded is not None and served.current is not slot.loaded:
                    self._switch(served, slot.loaded)
                events.append(slot.done)
        return events

    def _on_loaded(self, key: Key, loaded: LoadedModel) -> None:
        """Called by the loader with its lock held."""
        served = self.served.get(key[0])
        if served is not None and served.target == key:
            self._switch(served, loaded)

    def _switch(self, served: Served, loaded: LoadedModel) -> None:
        old = served.current
        served.current = loaded
        self.metrics.serving.labels(served.name).set(loaded.version)
        if old is not None and old.version != loaded.version:
            log.info("%s now serves version %s (was %s)", served.name, loaded.version, old.version)
        elif old is not None and old.threads != loaded.threads:
            log.info("%s now runs with %s compute threads (was %s)", served.name, loaded.threads, old.threads)

    def _evict(self) -> None:
        with self.loader.lock:
            keep: set[Key] = set()
            for served in self.served.values():
                if served.target is not None:
                    keep.add(served.target)
                if served.current is not None:
                    cur = served.current
                    keep.add((cur.name, cur.version, cur.threads))
            # Runtimes of a version loaded with other threads than its deployment now asks for: freed at once.
            replaced = {key for key in self.loader.slots if key not in keep and key[2] != self.threads_for(key[0])}
            self.loader.drop(keep, also=replaced)
