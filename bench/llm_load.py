"""The LLM benchmark's clients: the fixed chat requests, sent through the real ``openai`` package (``AsyncOpenAI``,
one task per stream) and stamped chunk by chunk, and what one concurrency level measured from them."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from openai import APIError, AsyncOpenAI

MAX_TOKENS = 64
LOAD_TIMEOUT_S = 600.0  # the first request: GGUF conversion (maas), warm-up (transformers serve), on a busy machine
REQUEST_TIMEOUT_S = 300.0
BURST = 16  # requests sent at once in the warm-up
#: Short chat prompts that SmolLM2-135M-Instruct answers at length: greedy, nearly all run to ``MAX_TOKENS``.
PROMPTS = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy market in a big city, with all the sounds and smells.",
    "Write a detailed recipe for baking bread at home, with every step.",
    "Tell me everything you know about the history of the bicycle.",
    "Write a long letter to a friend describing your summer holiday by the sea.",
    "Explain how the water cycle works, in detail, for a school class.",
    "Write a long essay about why people everywhere enjoy music.",
    "Write a story about a robot who learns to paint.",
    "Give detailed advice on how to start running as a beginner.",
    "Explain how computers store numbers and text, in detail.",
    "Describe the life of a honey bee from egg to adult.",
    "Write a long poem about autumn in the mountains.",
    "Explain in detail how to plant and care for a vegetable garden.",
    "Tell a long adventure story about a pirate searching for treasure.",
    "Describe how a city changes from early morning to late at night.",
)
Say = Callable[[str], None]


def messages(prompt: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[prompt % len(PROMPTS)]}]


@dataclass
class Stream:
    """One streamed request as the client saw it: when it was sent, when each content chunk arrived."""

    prompt: int
    started: float
    arrivals: list[float] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    finish: str | None = None
    usage_tokens: int | None = None
    error: str | None = None


async def one(
    client: AsyncOpenAI, model: str, prompt: int, close_at: float, usage: bool, max_tokens: int = MAX_TOKENS
) -> Stream:
    """Stream one request, closing it once a chunk arrives after ``close_at``."""
    record = Stream(prompt, time.perf_counter())
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if usage else {}
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages(prompt),  # type: ignore[arg-type]
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            **extra,
        )
        async with stream:
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    record.usage_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta.content:
                        record.arrivals.append(now)
                        record.parts.append(choice.delta.content)
                    if choice.finish_reason:
                        record.finish = choice.finish_reason
                if now >= close_at:
                    break
    except APIError as exc:
        record.error = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    return record


@dataclass(frozen=True)
class Warm:
    """What the warm-up found: whether the server sends a usage chunk, one request's time alone, and the TTFT p95
    of :data:`BURST` requests sent at once."""

    usage: bool
    spread_s: float
    burst_ttft_p95_s: float | None


async def warm_up(client: AsyncOpenAI, model: str, say: Say) -> Warm:
    """The first answer (which waits while the server loads the model), one full request alone, then a burst."""
    began = time.perf_counter()
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while True:
        try:
            await client.chat.completions.create(model=model, messages=messages(0), max_tokens=4, temperature=0)  # type: ignore[arg-type]
            break
        except APIError as exc:
            if time.monotonic() > deadline or getattr(exc, "status_code", None) not in (503, None):
                raise
            say(f"waiting for the model ({' '.join(str(exc).split())[:120]})")
            await asyncio.sleep(2.0)
    say(f"first answer after {time.perf_counter() - began:.1f} s; warming up")
    probe = await one(client, model, 0, float("inf"), usage=True)
    usage = probe.error is None  # a peer may refuse stream_options: then chunks are counted without a check
    if not usage:
        probe = await one(client, model, 0, float("inf"), usage=False)
    spread = time.perf_counter() - probe.started
    burst = await asyncio.gather(*(one(client, model, i, float("inf"), usage, 8) for i in range(BURST)))
    ttft = [r.arrivals[0] - r.started for r in burst if r.arrivals]
    return Warm(usage, spread, float(np.percentile(ttft, 95)) if ttft else None)


async def level(
    client: AsyncOpenAI, model: str, streams: int, seconds: float, warm: Warm
) -> tuple[float, list[Stream]]:
    """``streams`` clients sending requests back to back; (when the window of ``seconds`` opened, every request).

    Client ``i`` starts ``i / streams`` of one request's time alone after the first: answers of one length would
    otherwise keep all prefills in lockstep, round after round. The window opens as the last client starts.
    """
    began = time.perf_counter()
    opens = began + warm.spread_s * (streams - 1) / streams
    close_at = opens + seconds
    records: list[Stream] = []

    async def client_loop(i: int) -> None:
        await asyncio.sleep(max(0.0, began + warm.spread_s * i / streams - time.perf_counter()))
        for k in itertools.count(i, streams):
            if time.perf_counter() >= close_at:
                return
            record = await one(client, model, k, close_at, warm.usage)
            records.append(record)
            if record.error is not None:
                await asyncio.sleep(0.1)  # a refusing server is not hammered

    timeout = warm.spread_s + seconds + REQUEST_TIMEOUT_S
    await asyncio.wait_for(asyncio.gather(*(client_loop(i) for i in range(streams))), timeout)
    return opens, records


def summarize(streams: int, opens: float, seconds: float, records: list[Stream]) -> dict[str, Any]:
    """The level's figures over its window: content chunks that arrived inside it per second (a chunk is a token:
    the ratio is checked on finished requests against the server's usage count), time to first token of the
    requests sent inside it, the gaps between a request's chunks that ended inside it."""
    end = opens + seconds
    inside = [r for r in records if r.started >= opens]
    tokens = sum(1 for r in records for t in r.arrivals if opens <= t <= end)
    ttft = [r.arrivals[0] - r.started for r in inside if r.arrivals]
    gaps = [b - a for r in records for a, b in itertools.pairwise(r.arrivals) if opens <= b <= end]
    finished = [r for r in records if r.finish is not None]
    counted = [r for r in finished if r.usage_tokens]
    errors = [r.error for r in records if r.error is not None]

    def pct(values: list[float], q: float, scale: float = 1.0) -> float | None:
        return float(np.percentile(values, q)) * scale if values else None

    return {
        "streams": streams,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p95_s": pct(ttft, 95),
        "itl_p50_ms": pct(gaps, 50, 1000),
        "itl_p95_ms": pct(gaps, 95, 1000),
        "requests": len(inside),
        "finished": sum(r.finish is not None for r in inside),
        "finished_at_eos": sum(r.finish == "stop" for r in finished),
        "mean_completion_chunks": float(np.mean([len(r.arrivals) for r in finished])) if finished else None,
        "chunks_per_token": (
            sum(len(r.arrivals) for r in counted) / sum(r.usage_tokens or 0 for r in counted) if counted else None
        ),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def texts(records: list[Stream], into: dict[int, str]) -> None:
    """The completions of finished requests, by prompt (the first of each), to compare across servers."""
    for r in records:
        if r.finish is not None and r.error is None:
            into.setdefault(r.prompt % len(PROMPTS), "".join(r.parts))
