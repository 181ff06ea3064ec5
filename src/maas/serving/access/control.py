"""One server process's access control: whether keys are required, who a key is, and the hooks every request
passes on its way in (admission: rate limits, quotas, concurrency) and out (metering).

A key without limits (and every request with auth off) is admitted without a round trip to any store; usage is
added up in memory and written in the background (:mod:`maas.serving.access.recorder`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta

from maas import envs
from maas.access.keys import KeyStore, database_of
from maas.access.limits import LEASE_RENEW_S, LimitReached, open_limit_store
from maas.access.principal import Principal
from maas.access.usage import UsageStore
from maas.registry import Registry
from maas.serving.access.authenticator import Authenticator
from maas.serving.access.context import RequestMeter
from maas.serving.access.limiter import Admission, Limiter
from maas.serving.access.mode import auth_required, is_loopback
from maas.serving.access.recorder import FLUSH_S, UsageRecorder
from maas.serving.metrics import KeyMetrics

__all__ = ["AccessControl", "Admission"]

log = logging.getLogger(__name__)

#: How often old usage rows and expired counters are deleted.
PRUNE_EVERY_S = 3600.0


class AccessControl:
    """See the module docstring. ``required`` is decided once, from the auth mode and the bind address."""

    def __init__(
        self,
        registry: Registry,
        *,
        mode: str,
        host: str,
        allow_unauthenticated: bool,
        metrics: KeyMetrics | None = None,
    ) -> None:
        self.required = auth_required(mode, host, allow_unauthenticated=allow_unauthenticated)
        #: Without keys on a loopback bind, requests a browser page sends on its own are refused (:mod:`.browsers`).
        self.local_only = not self.required and is_loopback(host)
        db = database_of(registry)
        self.keys = KeyStore(db)
        self.authenticator = Authenticator.of(self.keys)
        self.limiter = Limiter(open_limit_store(db, envs.MAAS_REDIS_URL))
        self.usage = UsageRecorder(UsageStore(db))
        self.metrics = metrics
        self.retention = timedelta(days=int(envs.MAAS_USAGE_RETENTION_DAYS))
        self._task: asyncio.Task[None] | None = None

    async def admit(self, principal: Principal) -> Admission:
        """Let a request of ``principal`` in, or raise ``RateLimited`` (with its headers) when a limit is spent."""
        if principal.key_id is None or not principal.limits.any:
            return Admission([])
        try:
            return await self.limiter.admit(principal)
        except LimitReached as exc:
            if self.metrics is not None:
                self.metrics.refused(principal.key_id, exc.limit)
            raise

    async def release(self, admission: Admission) -> None:
        """Give back what ``admission`` holds while the request ends (its concurrency slot), awaited: call it before
        the response's last byte, so the client's next request finds the slot free. :meth:`finish` still follows."""
        if admission.lease is not None:
            await self.limiter.release(admission)

    def finish(self, principal: Principal, admission: Admission, meter: RequestMeter) -> None:
        """A request of ``principal`` ended (answered, failed or abandoned): give back what ``admission`` took and
        record what ``meter`` counted. Never blocks and never raises: it runs as the request is torn down."""
        try:
            self.limiter.finish(admission, meter)
            self.usage.record(principal.key_id, meter)
            if self.metrics is not None:
                self.metrics.observe(
                    principal.key_id or "-",
                    meter.model or "-",
                    error=meter.error,
                    prompt_tokens=meter.prompt_tokens,
                    completion_tokens=meter.completion_tokens,
                )
        except Exception:
            log.exception("recording the end of a request failed")

    async def start(self) -> None:
        """Start background work (flushing usage)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._background())

    async def stop(self) -> None:
        """Flush and stop background work."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        for attempt in range(3):
            try:
                self.usage.flush()
                break
            except Exception as exc:
                log.error("usage not written at shutdown (try %d of 3): %s", attempt + 1, exc)
                time.sleep(0.2)
        self.limiter.close()

    async def _background(self) -> None:
        renewed = pruned = 0.0
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await asyncio.to_thread(self.usage.flush)
            except Exception as exc:
                log.warning("usage not written yet (%s); %d requests kept for the next try", exc, self.usage.pending)
            self.limiter.kick()  # what a failed write left queued
            now = time.monotonic()
            if now - renewed >= LEASE_RENEW_S:
                renewed = now
                self.limiter.renew()
            if now - pruned >= PRUNE_EVERY_S:
                pruned = now
                try:
                    await asyncio.to_thread(self._prune)
                except Exception as exc:
                    log.warning("pruning usage and counters failed: %s", exc)

    def _prune(self) -> None:
        gone = self.usage.store.prune(datetime.now(UTC) - self.retention)
        if gone:
            log.info("deleted %d usage rows older than %s", gone, self.retention)
        self.limiter.store.sweep(time.time())
