"""The decoder's numerics on a CPU: linear layers whose matrices are held in a lower precision than the activations
(see ``DecoderLM.with_weights``), and denormals flushed during a pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class LowPrecisionLinear(nn.Module):
    """A linear layer whose matrix is held in a lower precision: inputs are cast to it, outputs back."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(dtype).clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return out if self.bias is None else out + self.bias


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), read from /proc/cpuinfo (Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@contextlib.contextmanager
def flushed_denormals() -> Iterator[None]:
    """Denormal floats take a slow path in the CPU (measured: 1.8x a decoding step), so a decoder pass flushes them to
    zero: a flag of the calling thread's CPU state, set for the pass whichever thread runs it and cleared after (other
    code in that thread, e.g. hypothesis, expects IEEE subnormals)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
