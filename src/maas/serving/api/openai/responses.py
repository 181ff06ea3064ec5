"""The OpenAI API's response objects: ``chat.completion`` and ``text_completion`` (whole, and as stream chunks), and
the two log-probability objects (chat's ``content`` list; completions' ``tokens`` / ``token_logprobs`` /
``top_logprobs`` / ``text_offset``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import orjson

from maas.serving.api.openai.prompt import ChatTokenizer, Tokens
from maas.serving.api.openai.service import Choice, Job, Piece, TokenRecord

#: Log-probability entries serialised per call when a whole answer is built (:func:`response_body`): one long call
#: would hold the interpreter's lock, and stall the event loop, for the whole answer.
ENTRIES_PER_CALL = 512

#: How a list of log-probability items is made: ``list``, or :func:`_serialised` (already JSON, in parts).
Pack = Callable[[Iterable[Any]], list[Any]]


def _chat_entries(tokens: Tokens, records: Iterable[TokenRecord]) -> Iterator[dict[str, Any]]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": tokens.text(token_id), "logprob": logprob, "bytes": tokens.bytes(token_id)}

    for t in records:
        yield entry(t.token_id, t.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in t.top]}


def chat_logprobs(tokenizer: ChatTokenizer, records: Sequence[TokenRecord]) -> dict[str, Any]:
    return {"content": list(_chat_entries(Tokens.of(tokenizer), records)), "refusal": None}


def completion_logprobs(tokenizer: ChatTokenizer, records: Sequence[TokenRecord], length: int) -> dict[str, Any]:
    """``length``: the choice's text as sent (a token after a stop string starts at its end)."""
    return _completion_logprobs(Tokens.of(tokenizer), records, length, list)


def _completion_logprobs(tokens: Tokens, records: Sequence[TokenRecord], length: int, pack: Pack) -> dict[str, Any]:
    def top(t: TokenRecord) -> dict[str, float]:
        # OpenAI: the most likely alternatives and always the sampled token (up to logprobs + 1 entries).
        alternatives = {tokens.text(i): lp for i, lp in t.top}
        alternatives.setdefault(tokens.text(t.token_id), t.logprob)
        return alternatives

    return {
        "tokens": pack(tokens.text(t.token_id) for t in records),
        "token_logprobs": pack(t.logprob for t in records),
        "top_logprobs": pack(top(t) for t in records),
        "text_offset": pack(min(t.offset, length) for t in records),
    }


def _serialised(items: Iterable[Any]) -> list[orjson.Fragment]:
    """``items`` as a JSON array in parts (each a fragment of up to :data:`ENTRIES_PER_CALL` items)."""
    parts, it = [], iter(items)
    while batch := list(itertools.islice(it, ENTRIES_PER_CALL)):
        parts.append(orjson.Fragment(orjson.dumps(batch)[1:-1]))
    return parts


def _head(job: Job, kind: str) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{job.id}", "object": kind, "created": job.created, "model": job.model}


def chat_response(job: Job, choices: Sequence[Choice], *, pack: Pack = list) -> dict[str, Any]:
    """``pack``: how lists of log-probabilities are made (:func:`response_body` serialises them in parts)."""
    tokens = Tokens.of(job.tokenizer)
    return _head(job, "chat.completion") | {
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": (
                    {"content": pack(_chat_entries(tokens, c.tokens)), "refusal": None}
                    if job.logprobs is not None
                    else None
                ),
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": job.usage(),
    }


def completion_response(job: Job, choices: Sequence[Choice], *, pack: Pack = list) -> dict[str, Any]:
    tokens = Tokens.of(job.tokenizer)
    return _head(job, "text_completion") | {
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": (
                    _completion_logprobs(tokens, c.tokens, len(c.text), pack) if job.logprobs is not None else None
                ),
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": job.usage(),
    }


def response_body(job: Job, choices: Sequence[Choice], *, chat: bool) -> bytes:
    """The whole answer as JSON. With log-probabilities it may be large (up to ~100 MB): call it in a thread; its
    log-probabilities are serialised a few hundred at a time, so the event loop runs in between."""
    build = chat_response if chat else completion_response
    pack: Pack = _serialised if job.logprobs is not None else list
    return orjson.dumps(build(job, choices, pack=pack))


class Chunks:
    """The stream chunks of one request: all with the same ``id``, ``created`` and ``model``; with ``"usage": null``
    on each when the client asked for a usage chunk at the end (``stream_options.include_usage``)."""

    def __init__(self, job: Job, *, chat: bool, include_usage: bool) -> None:
        self.job = job
        self.chat = chat
        self.include_usage = include_usage
        self._head = _head(job, "chat.completion.chunk" if chat else "text_completion") | {"system_fingerprint": None}
        self._sent = [0] * job.n  # characters sent per choice (completions' text_offset)

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = self._head | {"choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def roles(self) -> list[dict[str, Any]]:
        """Chat's first chunk of each choice: the role."""
        delta = {"role": "assistant", "content": ""}
        return [
            self._chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
            for i in range(self.job.n)
        ]

    def content(self, piece: Piece) -> dict[str, Any]:
        logprobs = None
        self._sent[piece.index] += len(piece.text)
        if self.job.logprobs is not None:
            tokenizer = self.job.tokenizer
            logprobs = (
                chat_logprobs(tokenizer, piece.tokens)
                if self.chat
                else completion_logprobs(tokenizer, piece.tokens, self._sent[piece.index])
            )
        body = {"delta": {"content": piece.text}} if self.chat else {"text": piece.text}
        return self._chunk([{"index": piece.index, **body, "logprobs": logprobs, "finish_reason": None}])

    def finish(self, piece: Piece) -> dict[str, Any]:
        body: dict[str, Any] = {"delta": {}} if self.chat else {"text": ""}
        return self._chunk([{"index": piece.index, **body, "logprobs": None, "finish_reason": piece.finish_reason}])

    def usage(self) -> dict[str, Any]:
        """The last chunk when asked for: no choices, the usage of the whole request."""
        return self._head | {"choices": [], "usage": self.job.usage()}
