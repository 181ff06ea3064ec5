"""The decoder's numerics on a CPU: float32 linear layers run by oneDNN, linear layers whose matrices are held in a
lower precision than the activations (see ``DecoderLM.with_weights``), and denormals flushed during a pass."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class LowPrecisionLinear(nn.Module):
    """A linear layer whose matrix is held in a lower precision: inputs are cast to it, outputs back."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(dtype).clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return out if self.bias is None else out + self.bias


class OneDnnLinear(nn.Module):
    """A float32 linear layer run by oneDNN's inner product on a copy of the matrix in oneDNN's own tensor type.

    Same float32 arithmetic as ``F.linear`` (only the summation order differs), but for the few rows of a decoding
    step it is the faster kernel here: measured (torch 2.13, one thread, EPYC, SmolLM2-135M's layers with their
    matrices read from memory) 571 against 883 us for a 576 -> 3072 projection of 8 rows, and a whole decoding step
    of 8 sequences 51 against 73 ms (1 sequence: 39 against 60 ms). Use :func:`onednn_linear`, which checks the
    kernel on this machine first."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.matrix: torch.Tensor
        self.register_buffer("matrix", linear.weight.detach().float().contiguous().to_mkldnn(), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def __deepcopy__(self, memo: dict[int, object]) -> OneDnnLinear:
        # oneDNN's tensors have no storage to copy: rebuild from the dense matrix
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(self.matrix.to_dense())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return OneDnnLinear(dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        out = torch._C._nn.mkldnn_linear(rows.contiguous().to_mkldnn(), self.matrix, None).to_dense()
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def onednn_linear(linear: nn.Linear) -> nn.Module:
    """``linear`` as a :class:`OneDnnLinear` where this machine's oneDNN gives close results and gives a row the same
    bits wherever it sits in a batch of :data:`~maas.runtimes.causal_lm.model.ROW_TILE`-padded rows (what the
    engine's batch invariance rests on); otherwise ``linear`` unchanged."""
    if linear.weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return linear
    try:
        fast = OneDnnLinear(linear)
        g = torch.Generator().manual_seed(0)
        batch = torch.randn(16, linear.in_features, generator=g)
        with torch.inference_mode():
            want, got = F.linear(batch, linear.weight, linear.bias), fast(batch)
            steady = all(torch.equal(fast(batch[at : at + rows]), got[at : at + rows]) for at, rows in _PROBES)
    except RuntimeError as exc:  # a torch built without a usable oneDNN
        log.info("oneDNN linear layers unavailable (%s); using torch's default kernel", exc)
        return linear
    if not steady or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        log.info("oneDNN's linear kernel is not batch-invariant here; using torch's default kernel")
        return linear
    return fast


#: (first row, rows) of the sub-batches :func:`onednn_linear` checks against the same rows in a batch of 16.
_PROBES = ((0, 4), (4, 8), (8, 4), (12, 4), (0, 12))


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
