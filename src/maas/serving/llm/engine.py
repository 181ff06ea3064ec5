"""maas's continuous-batching engine for one causal language model.

One thread per model runs the steps. Between steps, cancelled sequences leave (their KV caches are dropped at once)
and waiting ones join: a joining sequence's prompt is prefilled in chunks of :data:`PREFILL_CHUNK` tokens, one chunk
per step, so a long prompt never stalls the others for long. Each step then decodes one token for every running
sequence in one batch (:meth:`DecoderLM.decode`). Tokens go to the asyncio side as they are produced.

Admission is bounded: at most ``max_running`` sequences in the batch, ``max_queue`` waiting (more: 429 at once), and
the KV caches of the running sequences within ``kv_cache_bytes`` (a sequence waits until its prompt fits; one runs
whatever its size when nothing else does).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from maas.errors import InvalidInput, MaasError, RateLimited, Unavailable
from maas.serving.llm.sampling import Sampler
from maas.serving.llm.types import FinishReason, GenerationRequest, TokenEvent, Usage

log = logging.getLogger(__name__)

#: Prompt tokens prefilled per step.
PREFILL_CHUNK = 256


class Model(Protocol):
    """What the engine needs of a model (:class:`maas.runtimes.causal_lm.model.DecoderLM`)."""

    context_length: int

    def new_cache(self, capacity: int) -> Any: ...

    def prefill(self, ids: list[int], cache: Any) -> torch.Tensor: ...

    def decode(self, tokens: list[int], caches: list[Any]) -> torch.Tensor: ...


@dataclass(frozen=True)
class EngineLimits:
    max_running: int = 16
    max_queue: int = 64
    kv_cache_bytes: int = 1 << 30
    threads: int = 1


class Observer(Protocol):
    """Where the engine reports (the server's metrics)."""

    def tokens(self, prompt: int, completion: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def finished(self, reason: str) -> None: ...

    def load(self, running: int, queued: int) -> None: ...


class _Sequence:
    """One request inside the engine, and the handle its caller holds (a :class:`~.types.Generation`)."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, vocab: int, wake: Any) -> None:
        self.request = request
        self.prompt = list(request.prompt_ids)
        self.sampler = Sampler(request.params, vocab)
        self.usage = Usage()
        self.cache: Any = None
        self.prefilled = 0
        self.last_token = -1
        self.produced = 0
        self.submitted = time.perf_counter()
        self.last_at = 0.0
        self.cancelled = False
        self.done = False
        self._loop = loop
        self._events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self._wake = wake

    # --- the caller's side (event loop) --------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[TokenEvent]:
        while True:
            item = await self._events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def cancel(self) -> None:
        """Leave the batch at the next step boundary; the cache goes with it. Iterating ends at once."""
        if not self.cancelled and not self.done:
            self.cancelled = True
            self._events.put_nowait(TokenEvent(None, finish_reason="cancelled"))
            self._wake()

    # --- the engine's side (its thread) ---------------------------------------------------------------------------
    def emit(self, item: TokenEvent | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass


class BatchingEngine:
    """A :class:`~.types.GenerationEngine` over one model; ``close`` stops its thread."""

    def __init__(
        self,
        model: Model,
        vocab_size: int,
        *,
        limits: EngineLimits = EngineLimits(),
        kv_bytes_per_token: int = 0,
        observer: Observer | None = None,
        name: str = "model",
    ) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.context_length = int(model.context_length)
        self.limits = limits
        self._kv_per_token = kv_bytes_per_token
        self._observer = observer
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # prefilling first, then decoding, in arrival order
        self._closed = False
        self.steps = 0
        self._thread = threading.Thread(target=self._main, name=f"maas-llm-{name}", daemon=True)
        self._thread.start()

    # --- the protocol ------------------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, request: GenerationRequest) -> _Sequence:
        n, max_tokens = len(request.prompt_ids), request.params.max_tokens
        if n == 0:
            raise InvalidInput("the prompt is empty; give at least one token")
        if max_tokens < 1:
            raise InvalidInput("max_tokens must be at least 1")
        if n + max_tokens > self.context_length:
            raise InvalidInput(
                f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds the model's context of "
                f"{self.context_length} tokens"
            )
        if any(not 0 <= t < self.vocab_size for t in request.prompt_ids):
            raise InvalidInput(f"prompt token ids must lie in 0..{self.vocab_size - 1}")
        seq = _Sequence(request, asyncio.get_running_loop(), self.vocab_size, self._notify)
        with self._cond:
            if self._closed:
                raise Unavailable("the model is being unloaded; retry shortly")
            if len(self._waiting) >= self.limits.max_queue:
                raise RateLimited(
                    f"{len(self._waiting)} requests are already waiting for this model (MAAS_LLM_MAX_QUEUE); "
                    "retry shortly"
                )
            self._waiting.append(seq)
            self._report()
            self._cond.notify()
        return seq

    def stop(self) -> None:
        """Stop taking requests; the thread ends after its current step, failing what is left with 503."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    async def close(self) -> None:
        self.stop()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify()

    # --- the engine thread ----------------------------------------------------------------------------------------
    def _main(self) -> None:
        torch.set_num_threads(max(1, self.limits.threads))
        while True:
            with self._cond:
                self._drop_cancelled()
                while not self._closed and not self._running and not self._waiting:
                    self._report()  # idle: the gauges say so
                    self._cond.wait()
                    self._drop_cancelled()
                if self._closed:
                    break
                self._admit()
                self._report()
            try:
                self._step()
            except Exception as exc:  # a bug or an out-of-memory: fail the batch, keep serving
                log.exception("generation step failed; %d sequences end with an error", len(self._running))
                error = Unavailable(f"generation failed ({type(exc).__name__}); retry")
                with self._cond:
                    failed, self._running = self._running, []
                for seq in failed:
                    self._finish(seq, error)
        with self._cond:
            leftover = [*self._running, *self._waiting]
            self._running, self._waiting = [], deque()
        for seq in leftover:
            self._finish(seq, Unavailable("the model was unloaded; retry"))

    def _drop_cancelled(self) -> None:
        kept = [s for s in self._running if not s.cancelled]
        for seq in self._running:
            if seq.cancelled:
                seq.cache = None
                seq.done = True
                self._observe("finished", "cancelled")
        self._running = kept
        if any(s.cancelled for s in self._waiting):
            self._waiting = deque(s for s in self._waiting if not s.cancelled)

    def _admit(self) -> None:
        used = sum(s.cache.nbytes for s in self._running if s.cache is not None)
        while self._waiting and len(self._running) < self.limits.max_running:
            seq = self._waiting[0]
            need = (len(seq.prompt) + min(seq.request.params.max_tokens, 128)) * self._kv_per_token
            if self._running and used + need > self.limits.kv_cache_bytes:
                break
            self._waiting.popleft()
            seq.cache = self.model.new_cache(len(seq.prompt) + min(seq.request.params.max_tokens, 128))
            used += seq.cache.nbytes
            self._running.append(seq)

    def _step(self) -> None:
        prefilling = next((s for s in self._running if s.prefilled < len(s.prompt)), None)
        if prefilling is not None:
            self._prefill_chunk(prefilling)
        decoding = [s for s in self._running if s.prefilled == len(s.prompt) and s.produced > 0 and not s.done]
        if decoding:
            logits = self.model.decode([s.last_token for s in decoding], [s.cache for s in decoding])
            self.steps += 1
            for row, seq in enumerate(decoding):
                self._take(seq, logits[row])
        with self._cond:
            self._running = [s for s in self._running if not s.done]

    def _prefill_chunk(self, seq: _Sequence) -> None:
        start = seq.prefilled
        chunk = seq.prompt[start : start + PREFILL_CHUNK]
        logits = self.model.prefill(chunk, seq.cache)
        seq.prefilled += len(chunk)
        if seq.prefilled == len(seq.prompt):
            seq.usage.prompt_tokens = len(seq.prompt)
            self._observe("tokens", len(seq.prompt), 0)
            self._take(seq, logits[0])

    def _take(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Pick ``seq``'s next token from ``logits`` and hand it over; finish the sequence when it ends."""
        if seq.cancelled:
            return
        token, logprob, top = seq.sampler.pick(logits)
        now = time.perf_counter()
        if seq.produced == 0:
            self._observe("first_token", now - seq.submitted)
        else:
            self._observe("inter_token", now - seq.last_at)
        seq.last_at = now
        params = seq.request.params
        if token in params.stop_token_ids:
            self._finish(seq, TokenEvent(None, finish_reason="stop"))
            return
        seq.produced += 1
        seq.usage.completion_tokens += 1
        self._observe("tokens", 0, 1)
        reason: FinishReason | None = "length" if seq.produced >= params.max_tokens else None
        event = TokenEvent(token, logprob, top, reason)
        if reason is not None:
            self._finish(seq, event)
            return
        seq.last_token = token
        seq.emit(event)

    def _finish(self, seq: _Sequence, last: TokenEvent | MaasError) -> None:
        seq.done = True
        seq.cache = None
        seq.emit(last)
        self._observe("finished", last.finish_reason if isinstance(last, TokenEvent) else "error")

    def _report(self) -> None:
        self._observe("load", len(self._running), len(self._waiting))

    def _observe(self, what: str, *args: Any) -> None:
        if self._observer is None:
            return
        hook: Callable[..., None] = getattr(self._observer, what)
        try:
            hook(*args)
        except Exception:  # metrics never break generation
            log.debug("observer %s failed", what, exc_info=True)
