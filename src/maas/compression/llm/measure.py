"""Measuring a causal LM against its parent: decoding speed, perplexity, greedy agreement, size.

- Speed: greedy decoding as the serving engine runs it (each prompt prefilled into its own cache, then one
  :meth:`decode` step for all sequences at a time), with 1 sequence and with 8, a fixed number of new tokens (end
  tokens do not stop it, so both models do the same work), on one thread (the serving default). Parent and child
  take turns round by round, so a busy machine slows both alike; the medians are reported.
- Perplexity: teacher-forced over fixed texts, ``exp`` of the mean negative log-likelihood of each next token.
- Greedy agreement: both models read the same text (a prompt and the parent's greedy answer) and at each answer
  position pick their most likely next token; the share of positions where the picks are the same. Unlike
  comparing free-running answers, one early difference does not make every later token differ. The free-running
  view is reported too: answers identical in full, and the mean share before the first difference.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from maas.runtimes.causal_lm.model import DecoderLM
from maas.runtimes.causal_lm.precision import flushed_denormals
from maas.runtimes.causal_lm.quantized import SCALE_SUFFIX

#: Sequences decoded together in the batched measurement.
BATCH = 8


@dataclass
class Speed:
    tokens_per_s_b1: float
    tokens_per_s_b8: float
    ms_per_token_b1: float
    prefill_tokens_per_s: float
    #: Each batched sequence's new tokens (the first len(prompts) are the prompts' answers, unstopped).
    tokens: list[list[int]]


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's tensors hold in memory (a storage shared by tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_mkldnn:  # oneDNN's own tensor type (float32 layers): no shared storage to look at
            total += t.numel() * t.element_size()
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def parameter_count(directory: Path) -> int:
    """Weights in a Hugging Face directory, as elements (an int8 weight counts once; its scales do not)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if not name.endswith(SCALE_SUFFIX):
                    total += math.prod(fh.get_slice(name).get_shape())
    return total


def all_logits(model: DecoderLM, ids: Sequence[int]) -> torch.Tensor:
    """Logits ``[len(ids), vocab]`` (float32) at every position: :meth:`DecoderLM.prefill`'s computation on an
    empty cache, keeping every row instead of the last (denormals flushed during it, as the decoder does)."""
    with flushed_denormals():
        return _all_logits(model, ids)


@torch.inference_mode()
def _all_logits(model: DecoderLM, ids: Sequence[int]) -> torch.Tensor:
    cfg = model.cfg
    n = len(ids)
    x = model.embed(torch.tensor(list(ids), dtype=torch.long))
    cos, sin = model._angles(torch.arange(n))  # the decoder's own rotary angles
    for block in model.layers:
        q, k, v = block.project(x, cos, sin)
        attn = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            is_causal=True,
            enable_gqa=cfg.num_heads != cfg.num_kv_heads,
        )
        x = x + block.o(attn[0].transpose(0, 1).reshape(n, -1))
        x = x + block.mlp(x)
    out: torch.Tensor = model.lm_head(model.norm(x))
    return out.float()


def perplexity(model: DecoderLM, texts: Sequence[Sequence[int]]) -> float:
    """``exp`` of the mean negative log-likelihood of every next token of every text (teacher-forced)."""
    nll, count = 0.0, 0
    for ids in texts:
        if len(ids) < 2:
            continue
        logits = all_logits(model, ids)[:-1]
        nll += float(F.cross_entropy(logits, torch.tensor(list(ids[1:])), reduction="sum"))
        count += len(ids) - 1
    return math.exp(nll / count) if count else float("nan")


def agreement(
    parent: DecoderLM, child: DecoderLM, prompts: Sequence[Sequence[int]], answers: Sequence[list[int]]
) -> float:
    """Share of answer positions where both models, reading the same prompt and parent answer, pick the same next
    token (the first answer token is predicted from the prompt alone)."""
    same = total = 0
    for prompt, answer in zip(prompts, answers, strict=True):
        if not answer:
            continue
        ids = [*prompt, *answer[:-1]]
        start = len(prompt) - 1
        picks = [all_logits(m, ids)[start:].argmax(dim=-1) for m in (parent, child)]
        same += int((picks[0] == picks[1]).sum())
        total += len(answer)
    return same / total if total else float("nan")


def stopped(tokens: Sequence[int], stop_ids: frozenset[int]) -> list[int]:
    """``tokens`` up to and including the first stop token."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return list(tokens[: i + 1])
    return list(tokens)


def free_running(parent: Sequence[list[int]], child: Sequence[list[int]]) -> tuple[float, float]:
    """(share of identical answers, mean share of each answer before the first difference)."""
    exact, prefix = [], []
    for a, b in zip(parent, child, strict=True):
        exact.append(a == b)
        common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix.append(common / max(len(a), len(b), 1) if a != b else 1.0)
    return statistics.fmean(exact), statistics.fmean(prefix)


def _generate(model: DecoderLM, prompts: Sequence[Sequence[int]], steps: int) -> tuple[float, float, list[list[int]]]:
    """Prefill each prompt into its own cache, then ``steps - 1`` decode steps over all of them together:
    (prefill seconds, decode seconds, new tokens of each sequence)."""
    caches = [model.new_cache(len(p) + steps) for p in prompts]
    t0 = time.perf_counter()
    last = [int(torch.argmax(model.prefill(p, c)[0])) for p, c in zip(prompts, caches, strict=True)]
    t1 = time.perf_counter()
    tokens = [[t] for t in last]
    for _ in range(steps - 1):
        logits = model.decode(last, caches)
        last = [int(t) for t in torch.argmax(logits, dim=-1)]
        for seq, t in zip(tokens, last, strict=True):
            seq.append(t)
    return t1 - t0, time.perf_counter() - t1, tokens


def speed(models: Sequence[DecoderLM], prompts: Sequence[Sequence[int]], new_tokens: int, rounds: int) -> list[Speed]:
    """Decoding speed of each model (:data:`BATCH` sequences: the prompts repeated as needed), interleaved."""
    batch = [prompts[i % len(prompts)] for i in range(BATCH)]
    b1: list[list[float]] = [[] for _ in models]
    b8: list[list[float]] = [[] for _ in models]
    prefill: list[list[float]] = [[] for _ in models]
    answers: list[list[list[int]]] = [[] for _ in models]
    with threads(1):
        for m in models:  # warm-up: first calls allocate and pick kernels
            _generate(m, batch, 4)
        for _ in range(rounds):
            for i, m in enumerate(models):
                b1[i].append(_generate(m, batch[:1], new_tokens)[1])
            for i, m in enumerate(models):
                pre, dec, tokens = _generate(m, batch, new_tokens)
                b8[i].append(dec)
                prefill[i].append(pre)
                answers[i] = answers[i] or tokens
    steps = new_tokens - 1
    prompt_tokens = sum(len(p) for p in batch)
    return [
        Speed(
            tokens_per_s_b1=steps / statistics.median(b1[i]),
            tokens_per_s_b8=BATCH * steps / statistics.median(b8[i]),
            ms_per_token_b1=statistics.median(b1[i]) / steps * 1e3,
            prefill_tokens_per_s=prompt_tokens / statistics.median(prefill[i]),
            tokens=answers[i],
        )
        for i in range(len(models))
    ]
