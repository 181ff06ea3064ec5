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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from maas.errors import InvalidInput, MaasError, RateLimited, Unavailable
from maas.serving.llm.sequence import Sequence
from maas.serving.llm.types import FinishReason, GenerationRequest, TokenEvent

log = logging.getLogger(__name__)

#: Prompt tokens prefilled per step.
PREFILL_CHUNK = 256
#: Tokens of KV cache a sequence gets beyond its prompt when it joins (it grows as it goes).
FIRST_STRETCH = 128
#: How much a cache grows when it is full (the decoder's CACHE_CHUNK), for the KV budget.
CACHE_GROWTH = 128
#: Events a reader may leave unread before its sequence pauses (backpressure).
MAX_UNREAD = 64
#: How often the engine looks again when every sequence waits for its reader.
IDLE_POLL_S = 0.01


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
    #: A sequence whose reader takes nothing for this long is cancelled (MAAS_WRITE_TIMEOUT_S).
    stall_timeout_s: float = 30.0


class Observer(Protocol):
    """Where the engine reports (the server's metrics)."""

    def tokens(self, prompt: int, completion: int) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def finished(self, reason: str) -> None: ...

    def load(self, running: int, queued: int) -> None: ...


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
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # prefilling first, then decoding, in arrival order
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

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (it stops only when closed; anything else is a bug, logged)."""
        return self._thread.is_alive() and not self._closed

    def submit(self, request: GenerationRequest) -> Sequence:
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
        seq = Sequence(request, asyncio.get_running_loop(), self.vocab_size, self._notify)
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
            try:
                self._admit()
                self._report()
                if not self._step():
                    with self._cond:  # every sequence waits for its reader (or memory): look again shortly
                        self._cond.wait(IDLE_POLL_S)
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

    def _kv_used(self) -> int:
        return sum(s.cache.nbytes for s in self._running if s.cache is not None)

    def _admit(self) -> None:
        """Move waiting sequences into the batch while there is room: a slot, and KV memory for the prompt and a
        first stretch of tokens (a sequence runs whatever its size when nothing else does)."""
        used = self._kv_used()
        while len(self._running) < self.limits.max_running:
            with self._cond:
                if not self._waiting:
                    return
                seq = self._waiting[0]  # only this thread takes from the queue
            remaining = seq.request.params.max_tokens - seq.produced
            try:
                cache = self.model.new_cache(len(seq.feed) + min(remaining, FIRST_STRETCH))
            except Exception as exc:  # e.g. out of memory for a long prompt: this request fails, not the engine
                log.warning("no KV cache for a %d-token prompt: %s", len(seq.feed), exc)
                with self._cond:
                    self._waiting.popleft()
                self._finish(
                    seq,
                    Unavailable(
                        f"the KV cache for a {len(seq.feed):,}-token prompt could not be allocated "
                        f"({type(exc).__name__}); retry later or shorten the prompt"
                    ),
                )
                continue
            if self._running and used + cache.nbytes > self.limits.kv_cache_bytes:
                return  # waits for memory (MAAS_LLM_KV_CACHE_MB)
            with self._cond:
                self._waiting.popleft()
            seq.cache = cache
            used += cache.nbytes
            self._running.append(seq)

    def _step(self) -> bool:
        """One chunk of one prompt and one token for every running sequence whose reader keeps up, in one forward
        pass where the model offers one (the weights are read once). False when there was nothing to do."""
        prefilling = next((s for s in self._running if s.prefilling), None)
        decoding = self._decodable()
        fused = getattr(self.model, "step", None)
        if prefilling is not None and decoding and fused is not None:
            chunk = prefilling.feed[prefilling.prefilled : prefilling.prefilled + PREFILL_CHUNK]
            logits, last = fused([s.last_token for s in decoding], [s.cache for s in decoding], chunk, prefilling.cache)
            self.steps += 1
            for row, seq in enumerate(decoding):
                self._take(seq, logits[row])
            self._prefilled(prefilling, len(chunk), last)
        else:
            if prefilling is not None:
                self._prefill_chunk(prefilling)
            if decoding:
                logits = self.model.decode([s.last_token for s in decoding], [s.cache for s in decoding])
                self.steps += 1
                for row, seq in enumerate(decoding):
                    self._take(seq, logits[row])
        with self._cond:
            self._running = [s for s in self._running if not s.done]
        return prefilling is not None or bool(decoding)

    def _decodable(self) -> list[Sequence]:
        """The sequences to decode this step: prefilled, not waiting for their reader (one whose reader has taken
        nothing for ``stall_timeout_s`` is cancelled), and within the KV budget (the latest admitted are preempted
        until the rest fit: their caches are freed and they wait to be prefilled again, prompt and tokens so far)."""
        now = time.monotonic()
        ready = []
        for seq in self._running:
            if seq.done or seq.cancelled or seq.prefilling or not seq.generated:
                continue
            if seq.emitted - seq.consumed > MAX_UNREAD:
                seq.stalled_since = seq.stalled_since or now
                if now - seq.stalled_since > self.limits.stall_timeout_s:
                    log.info("a generation's reader took nothing for %.0f s; cancelling it", now - seq.stalled_since)
                    seq.cancelled = True
                    self._finish(seq, TokenEvent(None, finish_reason="cancelled"))
                continue
            seq.stalled_since = None
            ready.append(seq)
        if not self._kv_per_token:
            return ready
        used = self._kv_used()

        def growth() -> int:
            return sum(CACHE_GROWTH * self._kv_per_token for s in ready if s.cache.length + 1 > s.cache.capacity)

        while len(ready) > 1 and used + growth() > self.limits.kv_cache_bytes:
            victim = ready.pop()
            used -= victim.cache.nbytes
            self._preempt(victim)
        return ready

    def _preempt(self, seq: Sequence) -> None:
        seq.cache = None
        seq.feed = [*seq.prompt, *seq.generated]
        seq.prefilled = 0
        with self._cond:
            self._running.remove(seq)
            self._waiting.appendleft(seq)
        log.info("KV cache budget reached: a sequence of %d tokens waits to resume", len(seq.feed))

    def _prefill_chunk(self, seq: Sequence) -> None:
        chunk = seq.feed[seq.prefilled : seq.prefilled + PREFILL_CHUNK]
        try:
            logits = self.model.prefill(chunk, seq.cache)
        except Exception as exc:  # this prompt's failure is its own
            log.warning("prefill failed: %s", exc)
            self._finish(seq, Unavailable(f"the prompt could not be processed ({type(exc).__name__}); retry"))
            return
        self._prefilled(seq, len(chunk), logits)

    def _prefilled(self, seq: Sequence, n: int, logits: torch.Tensor | None) -> None:
        seq.prefilled += n
        if not seq.prefilling and logits is not None:
            if not seq.generated:  # not a sequence resumed after a preemption
                seq.usage.prompt_tokens = len(seq.prompt)
                self._observe("tokens", len(seq.prompt), 0)
            self._take(seq, logits[0])

    def _take(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Pick ``seq``'s next token from ``logits`` and hand it over; finish the sequence when it ends."""
        if seq.cancelled:
            return
        try:
            token, logprob, top = seq.sampler.pick(logits)
        except Exception as exc:  # this request's parameters, not its neighbours' problem
            log.warning("sampling failed: %s", exc)
            self._finish(seq, Unavailable(f"sampling failed ({type(exc).__name__}); retry"))
            return
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
        seq.generated.append(token)
        seq.emit(event)

    def _finish(self, seq: Sequence, last: TokenEvent | MaasError) -> None:
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
