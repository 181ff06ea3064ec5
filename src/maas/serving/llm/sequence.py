"""One generation request inside the engine (:mod:`.engine`), and the handle its caller iterates and cancels."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from maas.serving.llm.sampling import Sampler
from maas.serving.llm.types import GenerationRequest, TokenEvent, Usage


class Sequence:
    """One request inside the engine, and the handle its caller holds (a :class:`~.types.Generation`)."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, vocab: int, wake: Any) -> None:
        self.request = request
        self.prompt = list(request.prompt_ids)
        self.sampler = Sampler(request.params, vocab)
        self.usage = Usage()
        self.cache: Any = None
        #: What the next prefill runs: the prompt, or after a preemption the prompt and every token produced.
        self.feed = self.prompt
        self.prefilled = 0
        self.generated: list[int] = []
        self.produced = 0
        self.submitted = time.perf_counter()
        self.last_at = 0.0
        self.cancelled = False
        self.done = False
        #: Events handed over and taken by the reader (each written by one side only): the reader's lag.
        self.emitted = 0
        self.consumed = 0
        self.stalled_since: float | None = None
        self._loop = loop
        self._events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self._wake = wake

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.feed)

    # --- the caller's side (event loop) --------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TokenEvent]:
        while True:
            item = await self._events.get()
            self.consumed += 1
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def cancel(self) -> None:
        """Leave the batch at the next step boundary; the cache goes with it. Iterating ends at once."""
        if not self.cancelled and not self.done:
            self.cancelled = True
            self.emitted += 1
            self._events.put_nowait(TokenEvent(None, finish_reason="cancelled"))
            self._wake()

    # --- the engine's side (its thread) ---------------------------------------------------------------------------
    def emit(self, item: TokenEvent | BaseException) -> None:
        self.emitted += 1
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass
