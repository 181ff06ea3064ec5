"""What a generation engine takes and gives: token ids in, token events out. Text, chat templates, stop strings
and the wire protocol belong to the API family (:mod:`maas.serving.api.openai`); an engine sees only ids."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

#: Alternatives a request may ask for per token (OpenAI's ``top_logprobs`` limit).
MAX_TOP_LOGPROBS = 20

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` is greedy (ties go to the lowest id)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    #: The same seed (with the same prompt and parameters) gives the same tokens; None: a fresh random stream.
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: None: no log-probabilities; k >= 0: the chosen token's log-probability and the k most likely alternatives.
    logprobs: int | None = None
    #: Token ids that end the generation (the model's end-of-sequence ids); the stop id itself is not emitted.
    stop_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    #: For logs and metrics only.
    request_id: str = ""


@dataclass(frozen=True)
class TokenEvent:
    """One step of a generation: a token (``token_id`` is None only on a final event that carries no token, e.g.
    when an end-of-sequence id was drawn), and ``finish_reason`` on the last event."""

    token_id: int | None
    logprob: float | None = None
    #: (token id, log-probability), most likely first; only when the request asked for logprobs.
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: FinishReason | None = None


@dataclass
class Usage:
    """Tokens a generation consumed, counted as they happen (a stream abandoned half-way counts what it used)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class Generation(Protocol):
    """A submitted request: iterate it for its events (the last has ``finish_reason``); cancel it to free its slot
    and KV cache at once. Iterating after cancel ends the iteration."""

    usage: Usage

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...

    def cancel(self) -> None: ...


class GenerationEngine(Protocol):
    """A continuous-batching engine for one loaded causal language model."""

    #: Longest prompt plus completion, in tokens.
    context_length: int

    def submit(self, request: GenerationRequest) -> Generation:
        """Queue ``request``. Raises :class:`~maas.errors.RateLimited` (429) when the queue is full, and
        :class:`~maas.errors.InvalidInput` when the prompt does not fit the context."""
        ...

    @property
    def running(self) -> int: ...

    @property
    def queued(self) -> int: ...

    async def close(self) -> None: ...


@dataclass
class EngineStats:
    running: int = 0
    queued: int = 0
    steps: int = 0
    extra: dict[str, float] = field(default_factory=dict)
