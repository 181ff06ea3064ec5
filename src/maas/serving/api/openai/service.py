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
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from maas.errors import MaasError, Unavailable
from maas.serving.api.openai.models import GENERATIVE, ModelDirectory, require_format, served_at
from maas.serving.api.openai.protocol import BadParam, ChatRequest, CompletionRequest
from maas.serving.context import ServingContext
from maas.serving.errors import public_message
from maas.serving.llm.text import TextStream
from maas.serving.llm.types import Generation, GenerationEngine, GenerationRequest, SamplingParams, TokenEvent
from maas.serving.manager import LoadedModel

#: Prompts up to this many characters are rendered and tokenised on the event loop; longer ones in a thread.
INLINE_CHARS = 16_384


class ChatTokenizer(Protocol):
    """What the API needs of a language model's tokenizer (``loaded.runtime.tokenizer`` of a ``causal_lm`` model)."""

    eos_token_ids: frozenset[int]
    vocab_size: int

    def encode(self, text: str, *, special: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str: ...

    def token_text(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str: ...


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

    @property
    def n(self) -> int:
        return len(self.params)

    def submit(self) -> None:
        """Queue one generation per choice (all or none: a refusal of one cancels those already queued)."""
        try:
            for i, params in enumerate(self.params):
                request = GenerationRequest(self.prompt_ids, params, f"{self.request_id}/{i}")
                self.generations.append(self.engine.submit(request))
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Free every generation's slot now (a no-op for those already finished)."""
        for generation in self.generations:
            generation.cancel()

    def usage(self) -> dict[str, int]:
        """The prompt counted once, the completion tokens of every choice (those of a cancelled one as far as it
        got)."""
        completion = sum(g.usage.completion_tokens for g in self.generations)
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
    prompt_ids = await _prompt_ids(ctx, tokenizer, req)
    where = "messages" if isinstance(req, ChatRequest) else "prompt"
    context = engine.context_length
    if not prompt_ids:
        raise BadParam(f"the {where} is empty once tokenised; send some text", where)
    if len(prompt_ids) >= context:
        raise BadParam(
            f"this model's context is {context:,} tokens, and the prompt ({where}) has {len(prompt_ids):,} tokens, "
            "which leaves no room for the completion; shorten the prompt",
            where,
            "context_length_exceeded",
        )
    room = context - len(prompt_ids)
    limit = req.token_limit
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0:  # only the most likely token is left: greedy
        temperature, top_p = 0.0, 1.0
    params = [
        SamplingParams(
            max_tokens=room if limit is None else min(limit, room),
            temperature=temperature,
            top_p=top_p,
            seed=choice_seed(req.seed, i),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logprobs=req.top_k_logprobs,
            stop_token_ids=frozenset(tokenizer.eos_token_ids),
        )
        for i in range(req.n or 1)
    ]
    return Job(
        served_at(loaded), engine, tokenizer, prompt_ids, params, list(req.stop or []), req.top_k_logprobs, request_id
    )


async def _prompt_ids(
    ctx: ServingContext, tokenizer: ChatTokenizer, req: ChatRequest | CompletionRequest
) -> tuple[int, ...]:
    if isinstance(req, CompletionRequest) and isinstance(req.prompt, list):
        bad = next((t for t in req.prompt if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise BadParam(
                f"prompt: token id {bad} is outside the vocabulary (0 to {tokenizer.vocab_size - 1})", "prompt"
            )
        return tuple(req.prompt)

    def work() -> tuple[int, ...]:
        if isinstance(req, ChatRequest):
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in req.messages
            ]
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except MaasError as exc:
                raise BadParam(f"messages: {exc}", "messages") from None
            except Exception as exc:  # the model's template refusing the conversation (raise_exception)
                raise BadParam(
                    f"messages: the model's chat template refused them: {public_message(str(exc))}", "messages"
                ) from None
            return tuple(tokenizer.encode(text, special=False))  # the template writes the special tokens itself
        assert isinstance(req.prompt, str)
        return tuple(tokenizer.encode(req.prompt, special=True))

    size = sum(len(m.content) for m in req.messages) if isinstance(req, ChatRequest) else len(str(req.prompt))
    if size <= INLINE_CHARS:
        return work()
    return await asyncio.get_running_loop().run_in_executor(ctx.executor, work)


# --- running ---------------------------------------------------------------------------------------------------------

_END = object()


async def pieces(job: Job) -> AsyncGenerator[Piece, None]:
    """The pieces of every choice of a submitted ``job``, as their events arrive (choices interleaved). A choice
    whose stop string matched is cancelled at once. The job is cancelled when this ends, however it ends."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for event in generation:
                queue.put_nowait((index, event))
            queue.put_nowait((index, _END))
        except Exception as exc:
            queue.put_nowait((index, exc))

    streams = [TextStream(job.tokenizer, job.prompt_ids, job.stops) for _ in job.generations]
    held: list[list[TokenRecord]] = [[] for _ in job.generations]
    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(job.generations)]
    running = set(range(len(tasks)))
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
        job.cancel()
        for task in tasks:
            task.cancel()  # not awaited: this may run inside a cancelled scope, where an await would not return


def _step(job: Job, index: int, event: TokenEvent, stream: TextStream, held: list[TokenRecord]) -> Piece | None:
    text, finish = "", None
    if event.token_id is not None:
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
