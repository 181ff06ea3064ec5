"""The model manager: which versions are loaded, which one each bare name means, and the hot swap.

A watcher thread polls the registry. When the version a bare model name means changes (an alias
moved, a rollback, a first or newer version), the new version is loaded in the background and only
then made current; requests already running keep the version they started with, so no request fails
during a swap and each response names the version that computed it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from maas import runtimes
from maas.errors import InvalidInput, MaasError, NotFound, Unavailable
from maas.registry import ModelVersion, Registry
from maas.registry.uri import parse_version
from maas.runtimes.base import Runtime
from maas.serving import memory
from maas.serving.errors import public_message
from maas.serving.metrics import ServerMetrics

log = logging.getLogger(__name__)

#: A loaded version that is not current is unloaded after this long without requests.
IDLE_UNLOAD_S = 300.0
#: A failed load of a version a bare name means is retried this often (a restored artifact recovers).
RETRY_FAILED_S = 10.0


@dataclass(frozen=True)
class LoadedModel:
    """One model version, loaded and ready to run."""

    version_info: ModelVersion
    runtime: Runtime
    load_seconds: float

    @property
    def name(self) -> str:
        return self.version_info.name

    @property
    def version(self) -> int:
        return self.version_info.version


@dataclass
class _Slot:
    """The load state of one (name, version)."""

    done: threading.Event = field(default_factory=threading.Event)
    loaded: LoadedModel | None = None
    error: MaasError | None = None
    finished_at: float = 0.0
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class _Deployment:
    """What a bare model name is served at."""

    name: str
    target: int | None = None  # the version it should mean (from the registry)
    current: LoadedModel | None = None  # the version it means now; switches once target has loaded


class Loading(Exception):
    """Raised by :meth:`ModelManager.lookup` while the wanted version is still loading."""

    def __init__(self, event: threading.Event, what: str) -> None:
        super().__init__(what)
        self.event = event
        self.what = what


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
    ) -> None:
        self.registry = registry
        self.only = set(models) if models else None
        self.device = device
        self.watch_interval_s = watch_interval_s
        self.metrics = metrics or ServerMetrics()
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()  # one sync at a time, so an older snapshot never lands after a newer
        self._slots: dict[tuple[str, int], _Slot] = {}
        self._deployments: dict[str, _Deployment] = {}
        self._loader = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="maas-load")
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._initial_done = threading.Event()
        self._initial_error: str | None = None

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start following the registry; loading happens in the background (see :meth:`ready`)."""
        self._watcher = threading.Thread(target=self._watch, name="maas-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self._loader.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> tuple[bool, str]:
        """Ready once the first sync has run and every model it found has finished loading (or failed:
        a broken model must not keep the others from being served)."""
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
                self._evict_idle()
            except Exception as exc:  # a database hiccup must not kill the watcher
                self._initial_error = f"cannot read the registry: {exc}"
                log.exception("registry sync failed")
            self._stop.wait(self.watch_interval_s)

    # --- following the registry ----------------------------------------------------------------

    def sync(self) -> list[threading.Event]:
        """Read what each bare name should mean and start loading whatever is new; returns the events
        of loads started or in progress."""
        with self._sync_lock:
            return self._sync()

    def _sync(self) -> list[threading.Event]:
        targets = {t.name: t for t in self.registry.serving_targets() if self.only is None or t.name in self.only}
        digests = self.registry.version_digests()
        events = []
        with self._lock:
            self._drop_stale(digests)
            for name in list(self._deployments):
                if name not in targets:
                    del self._deployments[name]
                    with contextlib.suppress(KeyError):
                        self.metrics.serving.remove(name)
            for name, t in targets.items():
                dep = self._deployments.setdefault(name, _Deployment(name))
                dep.target = t.version
                if t.version is None:
                    continue
                slot = self._slots.get((name, t.version))
                if slot is not None and slot.error is not None and time.monotonic() - slot.finished_at > RETRY_FAILED_S:
                    del self._slots[(name, t.version)]
                    slot = None
                if slot is None:
                    slot = self._start_load(name, t.version)
                if slot.loaded is not None and (dep.current is None or dep.current.version != t.version):
                    self._switch(dep, slot.loaded)
                events.append(slot.done)
        return events

    def _drop_stale(self, digests: dict[tuple[str, int], str]) -> None:
        """Forget loaded versions that were deleted, or replaced by other bytes under the same number."""
        for key, slot in list(self._slots.items()):
            loaded = slot.loaded
            gone = key not in digests or (loaded is not None and loaded.version_info.artifact_digest != digests[key])
            if gone and slot.done.is_set():
                del self._slots[key]
        for dep in self._deployments.values():
            cur = dep.current
            if cur is not None and digests.get((dep.name, cur.version)) != cur.version_info.artifact_digest:
                dep.current = None

    def _switch(self, dep: _Deployment, loaded: LoadedModel) -> None:
        old = dep.current.version if dep.current else None
        dep.current = loaded
        self.metrics.serving.labels(dep.name).set(loaded.version)
        if old is not None:
            log.info("%s now serves version %s (was %s)", dep.name, loaded.version, old)

    def _start_load(self, name: str, version: int) -> _Slot:
        slot = _Slot()
        self._slots[(name, version)] = slot
        self._loader.submit(self._load, name, version, slot)
        return slot

    def _load(self, name: str, version: int, slot: _Slot) -> None:
        started = time.perf_counter()
        try:
            mv = self.registry.get_version(name, version)
            path = self.registry.artifact_path(mv)  # re-checks the sha256
            runtime = runtimes.load(path, mv.format, device=self.device)
            loaded = LoadedModel(mv, runtime, time.perf_counter() - started)
            self.metrics.load_seconds.labels(name, str(version)).set(loaded.load_seconds)
            log.info("loaded %s in %.3fs", mv.uri, loaded.load_seconds)
            memory.freeze_heap()  # the model's objects are long-lived: keep full collections from scanning them
            with self._lock:
                slot.loaded = loaded
                dep = self._deployments.get(name)
                if dep is not None and dep.target == version:
                    self._switch(dep, loaded)
                self.metrics.loaded.set(sum(1 for s in self._slots.values() if s.loaded is not None))
        except Exception as exc:
            # Whatever the cause, a version that cannot load is the server's problem, not the client's: 503,
            # with the runtime's words but no server paths (the log keeps the whole error).
            err = (
                exc
                if isinstance(exc, Unavailable)
                else Unavailable(f"models:/{name}/{version} cannot be loaded: {public_message(str(exc))}")
            )
            self.metrics.load_failures.labels(name, str(version)).inc()
            log.error("cannot load models:/%s/%s: %s", name, version, exc)
            slot.finished_at = time.monotonic()
            slot.error = err
        finally:
            slot.finished_at = time.monotonic()
            slot.done.set()

    def _evict_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            in_use = {(d.name, d.current.version) for d in self._deployments.values() if d.current}
            in_use |= {(d.name, d.target) for d in self._deployments.values() if d.target is not None}
            for key, slot in list(self._slots.items()):
                if key not in in_use and slot.done.is_set() and now - slot.last_used > IDLE_UNLOAD_S:
                    # No close(): a request may still hold it; the runtime is freed when the last one ends.
                    del self._slots[key]
            self.metrics.loaded.set(sum(1 for s in self._slots.values() if s.loaded is not None))

    # --- requests ------------------------------------------------------------------------------

    def lookup(self, name: str, version: str | None = None) -> LoadedModel:
        """The loaded model a request should use, without blocking: raises ``Loading`` (wait on its
        event and call again), ``NotFound``, or the load error (e.g. the digest mismatch)."""
        if version is None:
            with self._lock:
                dep = self._deployments.get(name)
                if dep is not None and dep.current is not None:
                    return dep.current
                if dep is not None and dep.target is not None:
                    slot = self._slots.get((name, dep.target))
                    if slot is not None:
                        return self._from_slot(slot, f"models:/{name}/{dep.target}")
                if dep is not None:
                    raise NotFound(f"model {name!r} has no versions to serve")
            self.check_served(name)
            # Registered after the last sync: pick it up now rather than on the next tick.
            self.sync()
            return self.lookup_after_sync(name)
        key = (name, parse_version(version))
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None and slot.error is not None and time.monotonic() - slot.finished_at > RETRY_FAILED_S:
                del self._slots[key]  # retry: the artifact may have been restored
                slot = None
        if slot is None:
            self.check_served(name)
            self.registry.get_version(name, int(version))  # NotFound for an unknown version
            with self._lock:
                slot = self._slots.get(key) or self._start_load(*key)
        return self._from_slot(slot, f"models:/{name}/{version}")

    def lookup_after_sync(self, name: str) -> LoadedModel:
        with self._lock:
            dep = self._deployments.get(name)
            if dep is None or dep.target is None:
                raise NotFound(f"model {name!r} has no versions to serve")
            if dep.current is not None:
                return dep.current
            return self._from_slot(self._slots[(name, dep.target)], f"models:/{name}/{dep.target}")

    def check_served(self, name: str) -> None:
        if self.only is not None and name not in self.only:
            raise NotFound(f"model {name!r} is not served here; this server serves {', '.join(sorted(self.only))}")
        self.registry.get_model(name)  # NotFound naming `maas models list`

    def serving_version(self, name: str) -> ModelVersion | None:
        """The version a bare name is being served at right now, if one is loaded."""
        with self._lock:
            dep = self._deployments.get(name)
            return dep.current.version_info if dep is not None and dep.current is not None else None

    @staticmethod
    def _from_slot(slot: _Slot, what: str) -> LoadedModel:
        if slot.loaded is not None:
            slot.last_used = time.monotonic()
            return slot.loaded
        if slot.error is not None:
            raise slot.error
        raise Loading(slot.done, what)

    def acquire_blocking(self, name: str, version: str | None, wait_s: float = 30.0) -> LoadedModel:
        """:meth:`lookup`, waiting up to ``wait_s`` for a load (for callers outside the event loop)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.lookup(name, version)
            except Loading as loading:
                if not loading.event.wait(max(0.0, deadline - time.monotonic())):
                    raise Unavailable(f"{loading.what} is loading; retry shortly") from None

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a model this server serves (safe to use as a metrics label)."""
        with self._lock:
            return name in self._deployments

    def model_ready(self, name: str, version: str | None) -> tuple[bool, str]:
        """Whether the model (a bare name: the version it means) is loaded, and why not. Never starts a load of
        an explicit version: that happens on its first inference request."""
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
        key = (name, parse_version(version))
        with self._lock:
            slot = self._slots.get(key)
        if slot is None:
            self.check_served(name)
            self.registry.get_version(name, key[1])  # NotFound for an unknown version
            return False, f"models:/{name}/{key[1]} is not loaded; it loads on its first inference request"
        self._from_slot(slot, f"models:/{name}/{key[1]}")
        return True, ""

    def loaded_versions(self) -> dict[str, list[int]]:
        with self._lock:
            out: dict[str, list[int]] = {}
            for (name, version), slot in self._slots.items():
                if slot.loaded is not None:
                    out.setdefault(name, []).append(version)
            return out
