"""Loading and unloading model versions: one slot per (name, version, threads), loaded in the background,
dropped when deleted, replaced by other bytes, or idle.

A slot is filled once; a request that finds it loading waits on its event. Unloading never closes a runtime a
request may still hold: the runtime is freed when the last reference goes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from maas import runtimes
from maas.errors import MaasError, Unavailable
from maas.registry import ModelVersion, Registry
from maas.runtimes.base import Runtime
from maas.serving import memory
from maas.serving.errors import public_message
from maas.serving.metrics import ServerMetrics

log = logging.getLogger(__name__)

#: A loaded version nothing serves by name is unloaded after this long without requests.
IDLE_UNLOAD_S = 300.0
#: A failed load is retried after this long (a restored artifact recovers).
RETRY_FAILED_S = 10.0

Key = tuple[str, int, int | None]


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One model version, loaded and ready to run (``threads``: the compute threads it was loaded with)."""

    version_info: ModelVersion
    runtime: Runtime
    load_seconds: float
    threads: int | None = None

    @property
    def name(self) -> str:
        return self.version_info.name

    @property
    def version(self) -> int:
        return self.version_info.version


@dataclass
class Slot:
    """The load state of one key."""

    done: threading.Event = field(default_factory=threading.Event)
    loaded: LoadedModel | None = None
    error: MaasError | None = None
    finished_at: float = 0.0
    last_used: float = field(default_factory=time.monotonic)

    def retry_due(self) -> bool:
        return self.error is not None and time.monotonic() - self.finished_at > RETRY_FAILED_S


class Loading(Exception):
    """Raised while the wanted version is still loading: wait on ``event``, then ask again."""

    def __init__(self, event: threading.Event, what: str) -> None:
        super().__init__(what)
        self.event = event
        self.what = what


class Loader:
    """The slots and the threads that fill them. ``lock`` guards ``slots`` (and the watcher's state beside it)."""

    def __init__(
        self,
        registry: Registry,
        *,
        device: str,
        metrics: ServerMetrics,
        load_workers: int = 2,
        on_loaded: Callable[[Key, LoadedModel], None] | None = None,
    ) -> None:
        self.registry = registry
        self.device = device
        self.metrics = metrics
        self.lock = threading.Lock()
        self.slots: dict[Key, Slot] = {}
        self.on_loaded = on_loaded
        self._pool = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="maas-load")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def slot(self, key: Key) -> Slot:
        """The slot of ``key``, starting its load if there is none (or its last failure is old). Hold ``lock``."""
        slot = self.slots.get(key)
        if slot is not None and slot.retry_due():
            slot = None
        if slot is None:
            slot = Slot()
            self.slots[key] = slot
            self._pool.submit(self._load, key, slot)
        return slot

    def _load(self, key: Key, slot: Slot) -> None:
        name, version, threads = key
        started = time.perf_counter()
        try:
            mv = self.registry.get_version(name, version)
            path = self.registry.artifact_path(mv)  # re-checks the sha256
            runtime = runtimes.load(path, mv.format, device=self.device, threads=threads)
            loaded = LoadedModel(mv, runtime, time.perf_counter() - started, threads)
            self.metrics.load_seconds.labels(name, str(version)).set(loaded.load_seconds)
            log.info("loaded %s in %.3fs", mv.uri, loaded.load_seconds)
            memory.freeze_heap()  # the model's objects are long-lived: keep full collections from scanning them
            with self.lock:
                slot.loaded = loaded
                if self.on_loaded is not None:
                    self.on_loaded(key, loaded)
                self._count()
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
            slot.error = err
        finally:
            slot.finished_at = time.monotonic()
            slot.done.set()

    @staticmethod
    def take(slot: Slot, what: str) -> LoadedModel:
        """The slot's model (marking it used), its load error, or ``Loading``."""
        if slot.loaded is not None:
            slot.last_used = time.monotonic()
            return slot.loaded
        if slot.error is not None:
            raise slot.error
        raise Loading(slot.done, what)

    def drop_stale(self, digests: dict[tuple[str, int], str]) -> None:
        """Forget versions deleted, or replaced by other bytes under the same number. Hold ``lock``."""
        for key, slot in list(self.slots.items()):
            loaded = slot.loaded
            gone = key[:2] not in digests or (
                loaded is not None and loaded.version_info.artifact_digest != digests[key[:2]]
            )
            if gone and slot.done.is_set():
                del self.slots[key]

    def drop(self, keep: Collection[Key], *, idle_s: float = IDLE_UNLOAD_S, also: Collection[Key] = ()) -> None:
        """Unload what is not in ``keep`` and idle for ``idle_s``, and every finished key in ``also``. Hold ``lock``."""
        now = time.monotonic()
        for key, slot in list(self.slots.items()):
            if key in keep or not slot.done.is_set():
                continue
            if key in also or now - slot.last_used > idle_s:
                del self.slots[key]
        self._count()

    def loaded_versions(self) -> dict[str, list[int]]:
        with self.lock:
            out: dict[str, list[int]] = {}
            for (name, version, _), slot in self.slots.items():
                if slot.loaded is not None and version not in out.setdefault(name, []):
                    out[name].append(version)
            return out

    def _count(self) -> None:
        self.metrics.loaded.set(sum(1 for s in self.slots.values() if s.loaded is not None))
