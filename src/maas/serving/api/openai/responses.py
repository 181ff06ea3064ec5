"""The OpenAI API's response objects: ``chat.completion`` and ``text_completion`` (whole, and as stream chunks), and
the two log-probability objects (chat's ``content`` list; completions' ``tokens`` / ``token_logprobs`` /
``top_logprobs`` / ``text_offset``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from maas.serving.api.openai.service import ChatTokenizer, Choice, Job, Piece, TokenRecord


def chat_logprobs(tokenizer: ChatTokenizer, tokens: Sequence[TokenRecord]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token": tokenizer.token_text(token_id),
            "logprob": logprob,
            "bytes": list(tokenizer.token_bytes(token_id)),
        }

    content = [entry(t.token_id, t.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in tokens]
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: ChatTokenizer, tokens: Sequence[TokenRecord], length: int) -> dict[str, Any]:
    """``length``: the choice's text as sent (a token after a stop string starts at its end)."""
    top = []
    for t in tokens:
        # OpenAI: the most likely alternatives and always the sampled token (up to logprobs + 1 entries).
        alternatives = {tokenizer.token_text(i): lp for i, lp in t.top}
        alternatives.setdefault(tokenizer.token_text(t.token_id), t.logprob)
        top.append(alternatives)
    return {
        "tokens": [tokenizer.token_text(t.token_id) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": top,
        "text_offset": [min(t.offset, length) for t in tokens],
    }


def _head(job: Job, kind: str) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{job.id}", "object": kind, "created": job.created, "model": job.model}


def chat_response(job: Job, choices: Sequence[Choice]) -> dict[str, Any]:
    return _head(job, "chat.completion") | {
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": chat_logprobs(job.tokenizer, c.tokens) if job.logprobs is not None else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": job.usage(),
    }


def completion_response(job: Job, choices: Sequence[Choice]) -> dict[str, Any]:
    return _head(job, "text_completion") | {
        "system_fingerprint": None,
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": (
                    completion_logprobs(job.tokenizer, c.tokens, len(c.text)) if job.logprobs is not None else None
                ),
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": job.usage(),
    }


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
