"""The times people type: ``30m``, ``12h``, ``7d``, ``2w`` (from now, back or ahead), or an ISO date or time (UTC
when it names no zone). One parser for keys' expiry, usage and the audit log, on the CLI and the admin API."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from maas.errors import InvalidInput

_DURATION = re.compile(r"\s*(\d{1,7})\s*([smhdw])\s*")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, option: str, ahead: bool = False, now: datetime | None = None) -> datetime:
    """``text`` as an aware UTC time: a duration counts back from ``now`` (ahead with ``ahead``). :class:`InvalidInput`
    names ``option`` and the forms it takes."""
    m = _DURATION.fullmatch(text.lower())
    try:
        if m:
            span = timedelta(seconds=int(m[1]) * _SECONDS[m[2]])
            at = now or datetime.now(UTC)
            return at + span if ahead else at - span
        parsed = datetime.fromisoformat(text.strip())
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidInput(
            f"{option} {text!r} is neither a duration (90m, 12h, 7d, 2w) nor a date or time (2027-01-31, "
            "2027-01-31T12:00)"
        ) from None


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A time in the past: ``--since 1h``."""
    return parse_time(text, option="--since", now=now)


def parse_expiry(text: str, *, at: datetime | None = None) -> datetime:
    """A time ahead: ``--expires 30d``."""
    return parse_time(text, option="--expires", ahead=True, now=at)
