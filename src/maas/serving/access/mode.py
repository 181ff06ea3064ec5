"""Whether a server requires API keys: ``MAAS_AUTH`` (auto, required, disabled) against the address it binds."""

from __future__ import annotations

import ipaddress
from enum import StrEnum

from maas.errors import InvalidInput


class AuthMode(StrEnum):
    AUTO = "auto"
    REQUIRED = "required"
    DISABLED = "disabled"


def parse_mode(value: str) -> AuthMode:
    try:
        return AuthMode(value.strip().lower())
    except ValueError:
        raise InvalidInput(f"auth mode {value!r} (--auth, MAAS_AUTH) is not one of auto, required, disabled") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def auth_required(mode: AuthMode | str, host: str, *, allow_unauthenticated: bool = False) -> bool:
    """Whether requests need a key; refuses (:class:`InvalidInput`) to serve a non-loopback address without auth
    unless ``allow_unauthenticated`` says the operator means it."""
    mode = parse_mode(mode) if isinstance(mode, str) else mode
    if mode is AuthMode.REQUIRED:
        return True
    if mode is AuthMode.AUTO:
        return not is_loopback(host)
    if not is_loopback(host) and not allow_unauthenticated:
        raise InvalidInput(
            f"refusing to serve {host} with MAAS_AUTH=disabled: anyone who reaches it could call and enumerate every "
            "model. Use MAAS_AUTH=auto (keys required off loopback; `maas keys create` makes one), or pass "
            "--allow-unauthenticated (MAAS_ALLOW_UNAUTHENTICATED=1) if a proxy in front does the auth."
        )
    return False
