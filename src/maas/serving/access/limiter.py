"""Rate limits and quotas of keys, as one server process enforces them (the rules: :mod:`maas.access.limits`).

Admission asks the shared :class:`~maas.access.limits.LimitStore` in a thread, except for a key this process already
saw refused: counters only grow within a window, so that refusal stands, without a round trip, until the time it
named. What a request gives back when it ends (its lease, its tokens) is queued and written by a thread, so ending
never waits on the store; a lease is also given back, awaited, before a response's last byte leaves (see
:meth:`Limiter.release`), so a client's next request finds its slot free.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from maas.access.limits import Charge, Counts, LimitReached, LimitStore, rate_headers, refusal, states
from maas.access.principal import KeyLimits, Principal
from maas.errors import Unavailable
from maas.serving.access.context import RequestMeter

log = logging.getLogger(__name__)

#: Refusals remembered at most (one per key).
MAX_REFUSED = 10_000


@dataclass
class Admission:
    """What letting one request in took (to give back when it ends), and the rate-limit headers to answer with."""

    headers: list[tuple[bytes, bytes]]
    key_id: str | None = None
    #: The concurrency lease taken (None without a concurrency limit); ``released`` once given back.
    lease: str | None = None
    released: bool = False
    #: Whether the request's tokens count against a per-minute and a per-month token limit.
    charge_minute: bool = False
    charge_month: bool = False


class Limiter:
    """See the module docstring."""

    def __init__(self, store: LimitStore, *, threads: int = 4) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="maas-limits")
        self._refused: OrderedDict[str, tuple[KeyLimits, Counts]] = OrderedDict()
        #: Leases of requests in flight in this process (lease -> key id), renewed until they end.
        self.held: dict[str, str] = {}
        self._charges: list[Charge] = []
        self._releases: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._draining = False

    async def admit(self, principal: Principal) -> Admission:
        """Admit a request of ``principal`` (a key with limits), or raise :class:`LimitReached`."""
        key_id, limits = principal.key_id, principal.limits
        assert key_id is not None
        at = time.time()
        known = self._refused.get(key_id)
        if known is not None:
            refused = refusal(limits, known[1], at) if known[0] == limits else None
            if refused is not None:
                raise refused
            del self._refused[key_id]
        lease = secrets.token_hex(8) if limits.concurrent is not None else None
        future = asyncio.get_running_loop().run_in_executor(self._pool, self.store.admit, key_id, limits, lease, at)
        try:
            counts = await asyncio.shield(future)
        except asyncio.CancelledError:
            if lease is not None:  # the caller left while the store counted it: give the lease back once it is in
                future.add_done_callback(lambda f: self._abandoned(f, key_id, lease))
            raise
        except Exception as exc:
            log.warning("rate-limit store failed: %s", exc)
            raise Unavailable("the rate-limit store cannot be reached; retry shortly") from None
        if not counts.admitted:
            refused = refusal(limits, counts, at) or LimitReached(
                "this API key has reached a limit; retry shortly", {"Retry-After": "1"}, "concurrent"
            )
            if refused.limit != "concurrent":
                self._remember(key_id, limits, replace(counts, leases=0))  # leases can fall: never assumed
            raise refused
        if lease is not None:
            self.held[lease] = key_id
        headers = rate_headers(states(limits, counts, at), at, counted=True)
        return Admission(
            [(k.encode(), v.encode()) for k, v in headers.items()],
            key_id,
            lease,
            charge_minute=limits.tpm is not None,
            charge_month=limits.tokens_per_month is not None,
        )

    def _remember(self, key_id: str, limits: KeyLimits, counts: Counts) -> None:
        self._refused[key_id] = (limits, counts)
        self._refused.move_to_end(key_id)
        if len(self._refused) > MAX_REFUSED:
            self._refused.popitem(last=False)

    def _abandoned(self, future: asyncio.Future[Counts], key_id: str, lease: str) -> None:
        if not future.cancelled() and future.exception() is None and future.result().admitted:
            self._queue([], [(key_id, lease)])

    async def release(self, admission: Admission) -> None:
        """Give back ``admission``'s lease now, and wait until the store has it (a failure queues it instead)."""
        if admission.lease is None or admission.released or admission.key_id is None:
            return
        admission.released = True
        self.held.pop(admission.lease, None)
        done = [(admission.key_id, admission.lease)]
        future = asyncio.get_running_loop().run_in_executor(self._pool, self.store.settle, (), done)

        def failed(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is not None:
                self._queue([], done)  # written later, by the background retry

        future.add_done_callback(failed)
        try:
            await asyncio.shield(future)
        except Exception as exc:  # queued for the background retry by ``failed``; the answer goes on regardless
            log.warning("giving back a concurrency slot failed (%s); retrying in the background", exc)

    def finish(self, admission: Admission, meter: RequestMeter) -> None:
        """Queue what a finished request gives back: its lease (unless released) and its tokens."""
        if admission.key_id is None:
            return
        releases: list[tuple[str, str]] = []
        if admission.lease is not None and not admission.released:
            admission.released = True
            self.held.pop(admission.lease, None)
            releases.append((admission.key_id, admission.lease))
        charges = []
        if (admission.charge_minute or admission.charge_month) and meter.tokens > 0:
            charges.append(
                Charge(admission.key_id, meter.tokens, time.time(), admission.charge_minute, admission.charge_month)
            )
        self._queue(charges, releases)

    def _queue(self, charges: list[Charge], releases: list[tuple[str, str]]) -> None:
        if charges or releases:
            with self._lock:
                self._charges += charges
                self._releases += releases
            self.kick()

    def kick(self) -> None:
        """Write what is queued, in a thread (unless a write is under way)."""
        with self._lock:
            if self._draining or not (self._charges or self._releases):
                return
            self._draining = True
        try:
            self._pool.submit(self.drain)
        except RuntimeError:  # shut down: stop() drains what is left
            with self._lock:
                self._draining = False

    def drain(self) -> bool:
        """Write what is queued (blocking); False when the store failed (it stays queued for the next try)."""
        while True:
            with self._lock:
                charges, releases = self._charges, self._releases
                self._charges, self._releases = [], []
                if not charges and not releases:
                    self._draining = False
                    return True
            try:
                self.store.settle(charges, releases)
            except Exception as exc:
                log.warning("rate-limit store failed (%s); %d charges and releases kept", exc, len(charges + releases))
                with self._lock:
                    self._charges[:0] = charges
                    self._releases[:0] = releases
                    self._draining = False
                return False

    def renew(self) -> Future[Any] | None:
        """Extend the leases of this process's requests in flight, in a thread."""
        held = list(self.held.items())
        if not held:
            return None
        return self._pool.submit(self.store.renew, [(key_id, lease) for lease, key_id in held], time.time())

    def close(self) -> None:
        """Give back every lease still held here, write what is queued, and close the store (blocking)."""
        with self._lock:
            self._releases += [(key_id, lease) for lease, key_id in self.held.items()]
        self.held.clear()
        self._pool.shutdown(wait=True)
        for _ in range(3):
            if self.drain():
                break
            time.sleep(0.2)
        self.store.close()
