"""The principal and the meter of the request being served, carried in context variables so that the engine and
every API family check and record the same thing without threading them through each call.

The front doors (the REST gate, the gRPC servicer) set both before any handler runs. Work handed to a thread with
``run_in_executor`` does not see them: check in the coroutine first (:func:`require_model`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from maas.access.principal import LOCAL, Principal
from maas.errors import NotFound


@dataclass
class RequestMeter:
    """What one request used, filled in by whoever learns it (the engine: model, version, items; the language-model
    service: tokens) and recorded once, when the request ends."""

    model: str | None = None
    version: int = 0
    items: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    compute_s: float = 0.0
    error: bool = False

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# LOCAL is the default only for in-process callers (tests, the Python API); a server's front doors always set one.
_principal: ContextVar[Principal] = ContextVar("maas_principal", default=LOCAL)
_meter: ContextVar[RequestMeter | None] = ContextVar("maas_meter", default=None)


def current_principal() -> Principal:
    return _principal.get()


def current_meter() -> RequestMeter | None:
    return _meter.get()


@contextlib.contextmanager
def acting_as(principal: Principal, meter: RequestMeter | None = None) -> Iterator[None]:
    """Run the enclosed request as ``principal``, metering into ``meter``."""
    p, m = _principal.set(principal), _meter.set(meter)
    try:
        yield
    finally:
        _meter.reset(m)
        _principal.reset(p)


def not_registered(name: str) -> NotFound:
    """The error for a model that does not exist, word for word the registry's: a model a key may not see must
    read exactly like one that is not there."""
    return NotFound(f"model {name!r} is not registered; see `maas models list`")


def require_model(name: str) -> None:
    """Refuse ``name`` as missing unless the current principal may use it."""
    if not _principal.get().sees(name):
        raise not_registered(name)


def meter_model(name: str, version: int | None = None, items: int = 0) -> None:
    """Note the model (and version, and rows or items) the current request used."""
    meter = _meter.get()
    if meter is not None:
        meter.model = name
        if version is not None:
            meter.version = version
        meter.items += items
