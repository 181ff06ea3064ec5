"""Request bytes held in flight by one server process, whichever API family received them (REST bodies, gRPC
messages): one budget, ``MAAS_MAX_INFLIGHT_BYTES``, so no mix of transports can hold more. Used from the event loop
only, so it needs no lock."""

from __future__ import annotations


class InflightBytes:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes stay within the budget."""
        return self.held + size <= self.limit

    def take(self, size: int) -> None:
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size

    def busy_message(self) -> str:
        return (
            f"the server holds {self.limit:,} bytes of requests in flight already (MAAS_MAX_INFLIGHT_BYTES); "
            "retry shortly"
        )
