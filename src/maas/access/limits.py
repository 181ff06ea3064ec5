"""Rate limits and quotas of API keys: the windows, the rule that admits a request, the headers that tell a client
where it stands, and the :class:`LimitStore` protocol of the counters every server process shares (the metadata
database by default, Redis with ``MAAS_REDIS_URL``).

- Requests and tokens per minute: a sliding window counted in one-second buckets. A request is admitted while the
  buckets of the last 61 seconds hold less than the limit, so no 60-second interval ever holds more than the limit
  (the price: a slot that frees is seen up to a second late).
- Requests per day, tokens per month: the UTC calendar day and month.
- Concurrent requests: a lease per request in flight, taken at admission and given back when it ends; a lease a
  crashed process left behind expires after :data:`LEASE_TTL_S` (its holder renews it every :data:`LEASE_RENEW_S`).

Requests are checked and counted in one atomic step of the store, so all processes together never admit more than
the limit. Tokens are known only when a request ends: admission needs the tokens already charged in the window to be
under the limit, so a request in flight can overshoot it by its own tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from maas.access.principal import KeyLimits
from maas.errors import RateLimited
from maas.imports import load_entry
from maas.registry.sql.engine import Database

#: The span of a per-minute limit, in seconds; its window holds WINDOW_S + 1 one-second buckets.
WINDOW_S = 60
LEASE_TTL_S = 120.0
LEASE_RENEW_S = 30.0

#: Limit-store implementations by name, imported on first use.
STORES = {"sql": "maas.access.limits_sql:SqlLimitStore", "redis": "maas.access.limits_redis:RedisLimitStore"}


@dataclass(frozen=True)
class Counts:
    """What a store saw of one key in one atomic step, before counting the request: per-minute buckets (second ->
    count, only those at or after the window's start), this UTC day's requests, this UTC month's tokens, leases."""

    minute_requests: Mapping[int, int] = field(default_factory=dict)
    minute_tokens: Mapping[int, int] = field(default_factory=dict)
    day_requests: int = 0
    month_tokens: int = 0
    leases: int = 0
    admitted: bool = False


@dataclass(frozen=True)
class Charge:
    """Tokens a finished request used, charged to its key's per-minute and per-month counters (those it has)."""

    key_id: str
    tokens: int
    at: float
    minute: bool
    month: bool


class LimitStore(Protocol):
    """Counters of rate limits and quotas shared by every server process."""

    def admit(self, key_id: str, limits: KeyLimits, lease: str | None, at: float) -> Counts:
        """Atomically: read ``key_id``'s counters; when :func:`passes` them, count one request (per minute, per
        day, those of ``limits`` that are set) and take ``lease`` (with ``limits.concurrent``)."""
        ...

    def settle(self, charges: Sequence[Charge], releases: Sequence[tuple[str, str]]) -> None:
        """Charge tokens of finished requests and give back leases (key id, lease id)."""
        ...

    def renew(self, leases: Sequence[tuple[str, str]], at: float) -> None:
        """Extend the leases of requests still in flight to ``at + LEASE_TTL_S``."""
        ...

    def sweep(self, at: float) -> None:
        """Delete counters and leases that expired."""
        ...

    def close(self) -> None: ...


def open_limit_store(db: Database, redis_url: str | None) -> LimitStore:
    """The limit store of a server: Redis at ``redis_url`` when given, else the SQL database ``db``."""
    if redis_url:
        store: LimitStore = load_entry(STORES["redis"])(redis_url)
    else:
        store = load_entry(STORES["sql"])(db)
    return store


# --- windows --------------------------------------------------------------------------------------------------------


def window_start(at: float) -> int:
    """The oldest one-second bucket a per-minute limit counts at ``at``."""
    return int(at) - WINDOW_S


def day_of(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")


def month_of(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m")


def next_day(at: float) -> float:
    """When the UTC day of ``at`` ends (epoch seconds)."""
    return (int(at) // 86400 + 1) * 86400.0


def next_month(at: float) -> float:
    """When the UTC month of ``at`` ends (epoch seconds)."""
    d = datetime.fromtimestamp(at, UTC)
    first = datetime(d.year + d.month // 12, d.month % 12 + 1, 1, tzinfo=UTC)
    return first.timestamp()


def passes(limits: KeyLimits, counts: Counts) -> bool:
    """The admission rule: every limit that is set is not yet reached."""
    checks = (
        (limits.rpm, sum(counts.minute_requests.values())),
        (limits.tpm, sum(counts.minute_tokens.values())),
        (limits.requests_per_day, counts.day_requests),
        (limits.tokens_per_month, counts.month_tokens),
        (limits.concurrent, counts.leases),
    )
    return all(limit is None or used < limit for limit, used in checks)


# --- where a key stands ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LimitState:
    """One limit of a key at one time: ``retry_at`` is when its use drops under the limit (now, when it already
    is), ``reset_at`` when its use drops to nothing, ``own_reset`` when a unit counted now would leave it."""

    name: str
    kind: str  # requests, tokens, concurrent
    limit: int
    used: int
    retry_at: float
    reset_at: float
    own_reset: float

    @property
    def spent(self) -> bool:
        return self.used >= self.limit


def _sliding(name: str, kind: str, limit: int, buckets: Mapping[int, int], at: float) -> LimitState:
    live = sorted((b, c) for b, c in buckets.items() if b >= window_start(at) and c > 0)
    used = sum(c for _, c in live)
    own = int(at) + WINDOW_S + 1.0
    retry, left = at, used
    for second, count in live:
        if left < limit:
            break
        left -= count
        retry = second + WINDOW_S + 1.0  # when this bucket leaves the window
    if limit <= 0:
        retry = own
    reset = live[-1][0] + WINDOW_S + 1.0 if live else at
    return LimitState(name, kind, limit, used, retry, reset, own)


def _calendar(name: str, kind: str, limit: int, used: int, at: float, end: float) -> LimitState:
    return LimitState(name, kind, limit, used, at if used < limit else end, end if used else at, end)


def states(limits: KeyLimits, counts: Counts, at: float) -> list[LimitState]:
    """The state of every limit of ``limits`` that is set."""
    out = []
    if limits.rpm is not None:
        out.append(_sliding("rpm", "requests", limits.rpm, counts.minute_requests, at))
    if limits.requests_per_day is not None:
        out.append(
            _calendar("requests_per_day", "requests", limits.requests_per_day, counts.day_requests, at, next_day(at))
        )
    if limits.tpm is not None:
        out.append(_sliding("tpm", "tokens", limits.tpm, counts.minute_tokens, at))
    if limits.tokens_per_month is not None:
        end = next_month(at)
        out.append(_calendar("tokens_per_month", "tokens", limits.tokens_per_month, counts.month_tokens, at, end))
    if limits.concurrent is not None:
        out.append(LimitState("concurrent", "concurrent", limits.concurrent, counts.leases, at + 1.0, at, at))
    return out


def duration(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it: ``250ms``, ``1s``, ``6m0s``, ``1h2m3.5s``."""
    if seconds <= 0:
        return "0s"
    ms = max(1, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs


def rate_headers(current: list[LimitState], at: float, *, counted: bool) -> dict[str, str]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` of the tightest request limit and the tightest token
    limit (the one with the least left); ``counted``: the request was just counted against its request limits."""
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        of_kind = [s for s in current if s.kind == kind]
        if not of_kind:
            continue
        own = 1 if counted and kind == "requests" else 0
        tight = min(of_kind, key=lambda s: s.limit - s.used)
        reset = max(tight.reset_at, tight.own_reset) if own else tight.reset_at
        headers[f"x-ratelimit-limit-{kind}"] = str(tight.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, tight.limit - tight.used - own))
        headers[f"x-ratelimit-reset-{kind}"] = duration(reset - at)
    return headers


class LimitReached(RateLimited):
    """A key's rate limit or quota is spent: 429 with ``Retry-After`` and the ``x-ratelimit-*`` headers."""

    def __init__(self, message: str, headers: dict[str, str], limit: str) -> None:
        super().__init__(message)
        self.headers = headers
        #: The limit that refused (rpm, tpm, requests_per_day, tokens_per_month, concurrent).
        self.limit = limit


_WHAT = {
    "rpm": "{limit} requests per minute",
    "tpm": "{limit} tokens per minute",
    "requests_per_day": "a quota of {limit} requests per UTC day",
    "tokens_per_month": "a quota of {limit} tokens per UTC month",
    "concurrent": "{limit} requests in flight at once",
}


def refusal(limits: KeyLimits, counts: Counts, at: float) -> LimitReached | None:
    """The error refusing a request of a key with ``limits`` that saw ``counts`` at ``at``; None when it passes."""
    current = states(limits, counts, at)
    spent = [s for s in current if s.spent]
    if not spent:
        return None
    worst = max(spent, key=lambda s: s.retry_at)
    wait = max(1, math.ceil(worst.retry_at - at))
    headers = {"Retry-After": str(wait), **rate_headers(current, at, counted=False)}
    what = _WHAT[worst.name].format(limit=worst.limit)
    if worst.name == "concurrent":
        advice = "wait for one of them to finish"
    elif worst.limit <= 0:
        advice = "it admits nothing; ask an admin to raise it (`maas keys`)"
    else:
        advice = f"retry in {duration(wait)}"
    return LimitReached(f"this API key is limited to {what} and has reached it; {advice}", headers, worst.name)
