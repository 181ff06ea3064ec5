"""From the credentials a request presents to the principal it acts as.

Keys are looked up in the database and trusted for ``MAAS_AUTH_CACHE_S`` (so a revoked or expired key fails
within that time on every process); failed attempts are counted per client address, and past
``MAAS_AUTH_MAX_FAILURES`` a minute that address's failing attempts are slowed and answered 429 until the minute
passes (a valid key still gets in: guessing from a shared address must not lock its honest users out).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict, deque

from maas import envs
from maas.access.keys import ApiKey, KeyStore
from maas.access.principal import Principal
from maas.errors import RateLimited, Unauthorized

#: Lookups (and client addresses) remembered at most; beyond, the oldest are forgotten.
MAX_ENTRIES = 10_000
FAILURE_WINDOW_S = 60.0
#: The most a throttled attempt is held before its 429, so that guessing costs time, not just a status code.
MAX_DELAY_S = 2.0

_REASONS = {
    "malformed": "the API key is not valid: maas keys look like maas_<id>_<secret>, as `maas keys create` printed",
    "unknown": "the API key is not valid (unknown, or its secret was rotated)",
    "revoked": "the API key was revoked; ask an admin for a new one",
    "expired": "the API key has expired; ask an admin for a new one",
}


class TooManyFailures(RateLimited):
    """A client address failed too often; ``headers`` say when to come back."""

    def __init__(self, wait_s: float) -> None:
        seconds = max(1, math.ceil(wait_s))
        super().__init__(f"too many failed API-key attempts from this address; retry in {seconds} s")
        self.headers = {"Retry-After": str(seconds)}


class FailureThrottle:
    """Failed authentications per client address over the last minute."""

    def __init__(self, max_failures: int, window_s: float = FAILURE_WINDOW_S) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._seen.get(client)
        if times is None:
            times = self._seen[client] = deque()
            if len(self._seen) > MAX_ENTRIES:
                self._seen.popitem(last=False)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def failed(self, client: str) -> None:
        if self.max_failures <= 0:
            return
        now = time.monotonic()
        times = self._recent(client, now)
        times.append(now)
        self._seen.move_to_end(client)
        if len(times) > self.max_failures * 4:
            times.popleft()  # bounded memory; still far over the limit

    def blocked_for(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 when it may now."""
        if self.max_failures <= 0:
            return 0.0  # MAAS_AUTH_MAX_FAILURES=0: no throttle
        now = time.monotonic()
        times = self._recent(client, now)
        if len(times) < self.max_failures:
            return 0.0
        return max(times[-self.max_failures] + self.window_s - now, 0.001)


class Authenticator:
    """Bearer tokens to principals, with a short-lived cache and a failure throttle."""

    @classmethod
    def of(cls, keys: KeyStore) -> Authenticator:
        """The authenticator of a server over ``keys``, with the MAAS_AUTH_CACHE_S and MAAS_AUTH_MAX_FAILURES
        settings."""
        return cls(keys, cache_s=float(envs.MAAS_AUTH_CACHE_S), max_failures=int(envs.MAAS_AUTH_MAX_FAILURES))

    def __init__(self, keys: KeyStore, *, cache_s: float, max_failures: int) -> None:
        self.keys = keys
        self.cache_s = cache_s
        self.throttle = FailureThrottle(max_failures)
        self._cache: OrderedDict[str, tuple[float, ApiKey | None, str]] = OrderedDict()

    async def authenticate(self, authorization: str | None, client: str) -> Principal:
        """The principal of an ``Authorization`` header value (``Bearer <key>``) from ``client``.

        :class:`Unauthorized` when absent or not valid; :class:`RateLimited`, after a delay, when not valid and
        ``client`` failed too often in the last minute."""
        token = bearer(authorization)
        key, reason = (None, "missing") if token is None else await self._lookup(token)
        if key is not None and key.state() == "active":
            return key.principal()  # a valid key always gets in, so that guessing from one address locks no one out
        wait = self.throttle.blocked_for(client)
        if wait > 0:
            await asyncio.sleep(min(wait, MAX_DELAY_S))
            raise TooManyFailures(wait)
        self.throttle.failed(client)
        if token is None:
            raise Unauthorized(
                "this server requires an API key: send the header `Authorization: Bearer <key>` "
                "(an admin makes keys with `maas keys create`)"
            )
        raise Unauthorized(_REASONS.get(reason if key is None else key.state(), _REASONS["unknown"]))

    async def _lookup(self, token: str) -> tuple[ApiKey | None, str]:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1], hit[2]
        key, reason = await asyncio.to_thread(self.keys.authenticate, token)
        self._cache[digest] = (now + self.cache_s, key, reason)
        self._cache.move_to_end(digest)
        if len(self._cache) > MAX_ENTRIES:
            self._cache.popitem(last=False)
        return key, reason


def bearer(authorization: str | None) -> str | None:
    """The token of ``Bearer <token>``; None when absent or another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 512:
        return None
    return token
