"""Choosing the next token of one sequence from its logits: penalties, temperature, nucleus, seeded draws, and the
log-probabilities a request asked for. Each sequence has its own :class:`Sampler` and random stream, so what one
request draws never depends on what else runs beside it."""

from __future__ import annotations

import secrets

import torch

from maas.serving.llm.types import SamplingParams

#: Temperatures below this are greedy: dividing logits by less overflows to inf and NaN probabilities.
MIN_TEMPERATURE = 1e-5


class Sampler:
    """The sampling state of one sequence: its random generator and the counts of the tokens it produced."""

    def __init__(self, params: SamplingParams, vocab_size: int) -> None:
        self.params = params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        penalised = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self.counts = torch.zeros(vocab_size) if penalised else None

    def pick(self, logits: torch.Tensor) -> tuple[int, float | None, tuple[tuple[int, float], ...]]:
        """``logits`` ``[vocab]`` -> (token, its log-probability, top alternatives) — the last two only if asked."""
        p = self.params
        logits = logits.float()
        if self.counts is not None:
            seen = (self.counts > 0).float()
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * seen
        if p.temperature < MIN_TEMPERATURE:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / p.temperature, dim=-1)
            if p.top_p < 1.0:
                probs = _nucleus(probs, p.top_p)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.counts is not None:
            self.counts[token] += 1
        if p.logprobs is None:
            return token, None, ()
        logprobs = torch.log_softmax(logits, dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if p.logprobs > 0:
            values, ids = torch.topk(logprobs, p.logprobs)
            top = tuple((int(i), float(v)) for i, v in zip(ids, values, strict=True))
        return token, float(logprobs[token]), top


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (at least one)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely tokens
    drop = before >= top_p
    drop[0] = False  # the most likely token always stays (top_p 0 is greedy)
    sorted_probs[drop] = 0.0
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return kept / kept.sum()
