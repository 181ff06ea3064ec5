"""The limit store in Redis (``MAAS_REDIS_URL``), for servers that would rather not write every admission to the
metadata database. Per key: a hash of one-second buckets for each per-minute limit, a counter per UTC day and month,
and a sorted set of leases scored by their expiry, all under one hash tag (one Redis Cluster slot). An admission is
one Lua script, which Redis runs atomically: check, then count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from maas.access.limits import (
    LEASE_TTL_S,
    WINDOW_S,
    Charge,
    Counts,
    day_of,
    month_of,
    next_day,
    next_month,
    window_start,
)
from maas.access.principal import KeyLimits

_ADMIT = """
local function expire_at(key, at)
  redis.call('EXPIREAT', key, at, 'NX')
  redis.call('EXPIREAT', key, at, 'GT')
end
local function window(key, lo)
  local flat = redis.call('HGETALL', key)
  local live, total, stale = {}, 0, {}
  for i = 1, #flat, 2 do
    if tonumber(flat[i]) < lo then
      stale[#stale + 1] = flat[i]
    else
      total = total + tonumber(flat[i + 1])
      live[#live + 1] = flat[i]
      live[#live + 1] = flat[i + 1]
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  return live, total
end
local rpm, tpm, rpd, tpmo, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[5])
local lo = tonumber(ARGV[6])
local req, req_total, tok, tok_total, day, month, leases = {}, 0, {}, 0, 0, 0, 0
if rpm >= 0 then req, req_total = window(KEYS[1], lo) end
if tpm >= 0 then tok, tok_total = window(KEYS[2], lo) end
if rpd >= 0 then day = tonumber(redis.call('GET', KEYS[3]) or '0') end
if tpmo >= 0 then month = tonumber(redis.call('GET', KEYS[4]) or '0') end
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[8])
  leases = redis.call('ZCARD', KEYS[5])
end
local ok = (rpm < 0 or req_total < rpm) and (tpm < 0 or tok_total < tpm) and (rpd < 0 or day < rpd)
  and (tpmo < 0 or month < tpmo) and (conc < 0 or leases < conc)
if ok then
  if rpm >= 0 then
    redis.call('HINCRBY', KEYS[1], ARGV[7], 1)
    expire_at(KEYS[1], ARGV[11])
  end
  if rpd >= 0 then
    redis.call('INCR', KEYS[3])
    expire_at(KEYS[3], ARGV[12])
  end
  if conc >= 0 and ARGV[9] ~= '' then
    redis.call('ZADD', KEYS[5], ARGV[10], ARGV[9])
    expire_at(KEYS[5], ARGV[13])
  end
end
return {ok and 1 or 0, req, tok, day, month, leases}
"""


def _keys(key_id: str, at: float) -> list[str]:
    base = f"maas:limits:{{{key_id}}}"
    return [f"{base}:rpm", f"{base}:tpm", f"{base}:day:{day_of(at)}", f"{base}:month:{month_of(at)}", f"{base}:leases"]


def _arg(limit: int | None) -> int:
    return -1 if limit is None else limit


def _expire_at(pipe: Any, key: str, at: int) -> None:
    # A counter expires after its newest unit: never earlier than it was set to (GT), and set when it was not (NX).
    pipe.expireat(key, at, nx=True)
    pipe.expireat(key, at, gt=True)


def _buckets(flat: Sequence[Any]) -> dict[int, int]:
    return {int(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


class RedisLimitStore:
    """See the module docstring."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
        self._admit = self.client.register_script(_ADMIT)

    def admit(self, key_id: str, limits: KeyLimits, lease: str | None, at: float) -> Counts:
        second = int(at)
        lease_until = at + LEASE_TTL_S
        args: list[str | int | float] = [
            _arg(limits.rpm),
            _arg(limits.tpm),
            _arg(limits.requests_per_day),
            _arg(limits.tokens_per_month),
            _arg(limits.concurrent),
            window_start(at),
            second,
            repr(at),
            lease or "",
            repr(lease_until),
            second + WINDOW_S + 2,
            int(next_day(at)) + 3600,
            math.ceil(lease_until),
        ]
        ok, req, tok, day, month, leases = self._admit(keys=_keys(key_id, at), args=args)
        return Counts(_buckets(req), _buckets(tok), int(day), int(month), int(leases), admitted=bool(ok))

    def settle(self, charges: Sequence[Charge], releases: Sequence[tuple[str, str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for c in charges:
            if c.tokens <= 0:
                continue
            _, tpm_key, _, month_key, _ = _keys(c.key_id, c.at)
            if c.minute:
                pipe.hincrby(tpm_key, str(int(c.at)), c.tokens)
                _expire_at(pipe, tpm_key, int(c.at) + WINDOW_S + 2)
            if c.month:
                pipe.incrby(month_key, c.tokens)
                _expire_at(pipe, month_key, int(next_month(c.at)) + 3600)
        for key_id, lease in releases:
            pipe.zrem(_keys(key_id, 0.0)[4], lease)
        if len(pipe):
            pipe.execute()

    def renew(self, leases: Sequence[tuple[str, str]], at: float) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key_id, lease in leases:
            key = _keys(key_id, at)[4]
            pipe.zadd(key, {lease: at + LEASE_TTL_S}, xx=True)
            _expire_at(pipe, key, math.ceil(at + LEASE_TTL_S))
        if len(pipe):
            pipe.execute()

    def sweep(self, at: float) -> None:
        """Nothing to do: Redis expires whole counters itself, and admissions drop stale buckets and leases."""

    def close(self) -> None:
        self.client.close()
