"""One sequence's KV cache: keys and values of every layer, grown in chunks, dropped with the sequence."""

from __future__ import annotations

from typing import Protocol

import torch


class Shape(Protocol):
    """What a cache needs of the model's configuration (:class:`maas.runtimes.causal_lm.model.LMConfig`)."""

    @property
    def num_layers(self) -> int: ...

    @property
    def num_kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...


#: Cache growth step, in tokens: a sequence's cache is reallocated about once per this many tokens.
CACHE_CHUNK = 128


class KVCache:
    """One sequence's keys and values: ``[layers, kv_heads, capacity, head_dim]`` each, ``length`` of them filled."""

    def __init__(self, cfg: Shape, capacity: int, dtype: torch.dtype = torch.float32) -> None:
        self.cfg = cfg
        self.length = 0
        shape = (cfg.num_layers, cfg.num_kv_heads, _round_up(max(capacity, 1)), cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)

    @property
    def capacity(self) -> int:
        return int(self.k.shape[2])

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` more tokens (grown in :data:`CACHE_CHUNK` steps)."""
        need = self.length + tokens
        if need <= self.capacity:
            return
        shape = (*self.k.shape[:2], _round_up(need), self.k.shape[3])
        k, v = torch.zeros(shape, dtype=self.k.dtype), torch.zeros(shape, dtype=self.k.dtype)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v


def _round_up(n: int) -> int:
    return -(-n // CACHE_CHUNK) * CACHE_CHUNK
