"""Usage of one server process, added up in memory per key, model, version and UTC minute, and added to the database
by :meth:`UsageRecorder.flush` (every :data:`FLUSH_S`, and when the server stops), so that recording a request never
waits on the database. A flush that fails keeps what it held for the next one: every request is counted once."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from maas.access.usage import Counters, UsageKey, UsageStore, minute_of
from maas.serving.access.context import RequestMeter

#: Seconds between flushes.
FLUSH_S = 0.5


class UsageRecorder:
    """See the module docstring. :meth:`record` is called on the event loop, :meth:`flush` in a thread."""

    def __init__(self, store: UsageStore) -> None:
        self.store = store
        self._pending: dict[UsageKey, Counters] = {}
        self._lock = threading.Lock()
        self._flushing = threading.Lock()

    def record(self, key_id: str | None, meter: RequestMeter, at: datetime | None = None) -> None:
        """Count one finished request of ``key_id`` (None: auth off) that used what ``meter`` holds."""
        model = meter.model or "-"
        key = (key_id or "-", model, meter.version if meter.model else 0, minute_of(at or datetime.now(UTC)))
        with self._lock:
            c = self._pending.get(key)
            if c is None:
                c = self._pending[key] = Counters()
            c.requests += 1
            c.errors += int(meter.error)
            c.items += meter.items
            c.prompt_tokens += meter.prompt_tokens
            c.completion_tokens += meter.completion_tokens
            c.compute_s += meter.compute_s

    @property
    def pending(self) -> int:
        """Requests recorded here and not yet in the database."""
        with self._lock:
            return sum(c.requests for c in self._pending.values())

    def flush(self) -> None:
        """Add what was recorded since the last flush to the database (blocking). When that fails, what it held is
        kept for the next flush and the error is raised."""
        with self._flushing:
            with self._lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return
            try:
                self.store.add(batch)
            except BaseException:
                with self._lock:
                    for key, counters in batch.items():
                        self._pending.setdefault(key, Counters()).add(counters)
                raise
