"""Chat and text completions: a request's prompt in token ids, one generation per choice on the model's engine, and
their events turned into text (detokenised, stop strings applied) and log-probabilities, choice by choice.

:func:`prepare` does everything that can refuse a request (model, parameters, prompt length) before any
generation starts, so a refusal is an HTTP error even on a stream; :meth:`Job.submit` queues the choices;
:func:`pieces` merges their events as they come. Whoever consumes the pieces cancels the job when done or gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, cast

from maas.errors import Unavailable
from maas.serving.access.context import RequestMeter, current_meter
from maas.serving.api.openai.models import GENERATIVE, ModelDirectory, require_format, served_at
from maas.serving.api.openai.prompt import ChatTokenizer, chat_prompt_ids, check_fits
from maas.serving.api.openai.protocol import BadParam, ChatRequest, CompletionRequest
from maas.serving.context import ServingContext
from maas.serving.llm.text import TextStream
from maas.serving.llm.types import Generation, GenerationEngine, GenerationRequest, SamplingParams, TokenEvent
from maas.serving.manager import LoadedModel

#: Prompts up to this many characters are rendered and tokenised on the event loop; longer ones in a thread.
INLINE_CHARS = 16_384
#: The most log-probability entries one request may ask for: n x max_tokens x (alternatives + 1), max_tokens as
#: clamped to the context. Each costs a decoded token and ~100 bytes of answer.
MAX_LOGPROB_ENTRIES = 1 << 20


@dataclass(frozen=True)
class TokenRecord:
    """One generated token's log-probability, its alternatives, and where its text starts in the choice's text."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    offset: int


@dataclass
class Piece:
    """What one choice adds: text (possibly empty), the tokens it came from (when logprobs were asked for), and the
    finish reason on its last piece."""

    index: int
    text: str
    tokens: list[TokenRecord] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Job:
    """A request ready to run (see :func:`prepare`)."""

    model: str
    engine: GenerationEngine
    tokenizer: ChatTokenizer
    prompt_ids: tuple[int, ...]
    params: list[SamplingParams]
    stops: list[str]
    #: None: no log-probabilities; else the number of alternatives per token.
    logprobs: int | None
    request_id: str = ""
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))
    generations: list[Generation] = field(default_factory=list)
    #: Tokens of each choice taken from its generation: up to the stop string, for a choice one ended.
    produced: list[int] = field(default_factory=list)
    #: The request's meter (usage and token limits): the same counts as :meth:`usage`.
    meter: RequestMeter | None = None

    @property
    def n(self) -> int:
        return len(self.params)

    def submit(self) -> None:
        """Queue one generation per choice (all or none: a refusal of one cancels those already queued)."""
        try:
            for i, params in enumerate(self.params):
                request = GenerationRequest(self.prompt_ids, params, f"{self.request_id}/{i}")
                self.generations.append(self.engine.submit(request))
                self.produced.append(0)
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Free every generation's slot now (a no-op for those already finished)."""
        for generation in self.generations:
            generation.cancel()

    def usage(self) -> dict[str, int]:
        """The prompt counted once, the completion tokens of every choice: those it produced up to its end (a stop
        string's end for a choice one ended, not what its generation made before it was cancelled)."""
        completion = sum(self.produced)
        prompt = len(self.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def tokenizer_of(loaded: LoadedModel) -> ChatTokenizer:
    return cast(ChatTokenizer, loaded.runtime.tokenizer)  # type: ignore[attr-defined]


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of a request seeded ``seed``: choices differ from each other, and the same
    request gives the same choices again."""
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any generator takes it


async def prepare(
    ctx: ServingContext, directory: ModelDirectory, req: ChatRequest | CompletionRequest, request_id: str = ""
) -> Job:
    """Everything that can refuse ``req``, done: the model found, the prompt rendered and tokenised and checked
    against the context, each choice's sampling parameters."""
    loaded = await directory.acquire(req.model)
    require_format(loaded, GENERATIVE)
    engine: GenerationEngine = ctx.generators.get(loaded)
    tokenizer = tokenizer_of(loaded)
    context = engine.context_length
    prompt_ids = await _prompt_ids(ctx, tokenizer, req, context)
    room = context - len(prompt_ids)
    limit = req.token_limit
    max_tokens = room if limit is None else min(limit, room)
    n = req.n or 1
    _check_logprobs(req, n, max_tokens)
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0:  # only the most likely token is left: greedy
        temperature, top_p = 0.0, 1.0
    params = [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=choice_seed(req.seed, i),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logprobs=req.top_k_logprobs,
            stop_token_ids=frozenset(tokenizer.eos_token_ids),
        )
        for i in range(n)
    ]
    meter = current_meter()
    if meter is not None:
        meter.model, meter.version = loaded.name, loaded.version
        meter.items += n
        meter.prompt_tokens += len(prompt_ids)
    return Job(
        served_at(loaded),
        engine,
        tokenizer,
        prompt_ids,
        params,
        list(req.stop or []),
        req.top_k_logprobs,
        request_id,
        meter=meter,
    )


def _check_logprobs(req: ChatRequest | CompletionRequest, n: int, max_tokens: int) -> None:
    """Refuse a request whose log-probabilities would be more than :data:`MAX_LOGPROB_ENTRIES` entries."""
    top = req.top_k_logprobs
    if top is None:
        return
    entries = n * max_tokens * (top + 1)
    if entries <= MAX_LOGPROB_ENTRIES:
        return
    chat = isinstance(req, ChatRequest)
    param = "top_logprobs" if chat else "logprobs"
    fits = MAX_LOGPROB_ENTRIES // (n * (top + 1))
    tokens = "max_completion_tokens (or max_tokens)" if chat else "max_tokens"
    raise BadParam(
        f"log-probabilities are limited to {MAX_LOGPROB_ENTRIES:,} entries per request, n x max_tokens x "
        f"({param} + 1), and this request asks for {n} x {max_tokens:,} x {top + 1} = {entries:,} (max_tokens is "
        f"what the context leaves when it is not given or larger); lower n or {param}, or set {tokens} to at "
        f"most {fits:,} with these",
        param,
    )


async def _prompt_ids(
    ctx: ServingContext, tokenizer: ChatTokenizer, req: ChatRequest | CompletionRequest, context: int
) -> tuple[int, ...]:
    """The prompt in token ids, checked: not empty, and shorter than the ``context``."""
    where = "messages" if isinstance(req, ChatRequest) else "prompt"
    if isinstance(req, CompletionRequest) and isinstance(req.prompt, list):
        listed = req.prompt
        check_fits(len(listed), context, where)  # before any work per id: the list may be millions long
        low, high = min(listed), max(listed)
        if low < 0 or high >= tokenizer.vocab_size:
            bad = low if low < 0 else high
            raise BadParam(
                f"prompt: token id {bad} is outside the vocabulary (0 to {tokenizer.vocab_size - 1})", "prompt"
            )
        return tuple(listed)

    def work() -> tuple[int, ...]:
        if isinstance(req, ChatRequest):
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in req.messages
            ]
            return tuple(chat_prompt_ids(tokenizer, messages, context=context))
        assert isinstance(req.prompt, str)
        return tuple(tokenizer.encode(req.prompt, special=True))

    size = sum(len(m.content) for m in req.messages) if isinstance(req, ChatRequest) else len(str(req.prompt))
    if size <= INLINE_CHARS:
        ids = work()
    else:
        ids = await asyncio.get_running_loop().run_in_executor(ctx.executor, work)
    check_fits(len(ids), context, where)
    return ids


# --- running ---------------------------------------------------------------------------------------------------------

_END = object()


async def pieces(job: Job) -> AsyncGenerator[Piece, None]:
    """The pieces of every choice of a submitted ``job``, as their events arrive (choices interleaved). A choice
    whose stop string matched is cancelled at once. The job is cancelled when this ends, however it ends."""
    # Bounded: a reader that falls behind stops the pumps, its generations' events pile up in the engine's count,
    # and the engine pauses those sequences (backpressure) instead of buffering the whole generation here.
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=8 * len(job.generations))

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for event in generation:
                await queue.put((index, event))
            await queue.put((index, _END))
        except Exception as exc:
            await queue.put((index, exc))

    streams = [TextStream(job.tokenizer, job.prompt_ids, job.stops) for _ in job.generations]
    held: list[list[TokenRecord]] = [[] for _ in job.generations]
    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(job.generations)]
    running = set(range(len(tasks)))
    started = time.perf_counter()
    try:
        while running:
            index, item = await queue.get()
            if index not in running:
                continue  # what a choice sends after its stop string matched
            if isinstance(item, Exception):
                raise item
            if item is _END:
                raise Unavailable("a generation ended without finishing (the server is shutting down?); retry")
            piece = _step(job, index, cast(TokenEvent, item), streams[index], held[index])
            if piece is not None:
                if piece.finish_reason is not None:
                    running.discard(index)
                yield piece
    finally:
        if job.meter is not None:
            job.meter.compute_s += time.perf_counter() - started
        job.cancel()
        for task in tasks:
            task.cancel()  # not awaited: this may run inside a cancelled scope, where an await would not return


def _step(job: Job, index: int, event: TokenEvent, stream: TextStream, held: list[TokenRecord]) -> Piece | None:
    text, finish = "", None
    if event.token_id is not None:
        job.produced[index] += 1
        if job.meter is not None:
            job.meter.completion_tokens += 1
        if job.logprobs is not None:
            logprob = event.logprob if event.logprob is not None else -9999.0
            held.append(TokenRecord(event.token_id, logprob, event.top_logprobs[: job.logprobs], stream.decoded))
        text = stream.push(event.token_id)
        if stream.stopped:
            job.generations[index].cancel()  # free its slot now, not when the engine would have stopped
            finish = "stop"
    if finish is None and event.finish_reason is not None:
        if event.finish_reason == "cancelled":
            raise Unavailable("the server cancelled this generation (it is shutting down?); retry")
        text += stream.finish()
        finish = "stop" if stream.stopped else event.finish_reason
    if not text and finish is None:
        return None  # nothing to show yet (part of a character, or text that may begin a stop string)
    piece = Piece(index, text, list(held), finish)
    held.clear()
    return piece


@dataclass
class Choice:
    index: int
    text: str = ""
    tokens: list[TokenRecord] = field(default_factory=list)
    finish_reason: str = "stop"


async def collect(job: Job) -> list[Choice]:
    """Every choice of a submitted ``job`` in full."""
    choices = [Choice(i) for i in range(job.n)]
    parts: list[list[str]] = [[] for _ in range(job.n)]
    async with contextlib.aclosing(pieces(job)) as stream:
        async for piece in stream:
            parts[piece.index].append(piece.text)
            choices[piece.index].tokens.extend(piece.tokens)
            if piece.finish_reason is not None:
                choices[piece.index].finish_reason = piece.finish_reason
    for choice, texts in zip(choices, parts, strict=True):
        choice.text = "".join(texts)
    return choices
